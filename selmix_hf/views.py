"""Weak and strong views of a batch for FixMatch: the protocol, and ready image views built on timm's RandAugment.

A view is a callable ``view(batch, seeds) -> batch``: ``batch`` is a collated dict of model inputs on the
training device, ``seeds`` one int64 per sample. A view must draw every random choice for sample i from
``seeds[i]`` alone, so a run is the same with or without gradient accumulation and resumes exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

View = Callable[[dict[str, Any], torch.Tensor], dict[str, Any]]
# FixMatch's RandAugment operations in timm's names (no Invert); posterize keeps 4 - 8 bits, as in FixMatch (timm's
# plain "Posterize" reaches 0 bits at low magnitude, which Pillow refuses)
FIXMATCH_OPS = [
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "PosterizeOriginal",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateXRel",
    "TranslateYRel",
]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Views:
    """The two views FixMatch takes of a batch: ``weak`` (pseudo-labels, labelled loss) and ``strong`` (its target)."""

    weak: View
    strong: View


def identity_view(batch: dict[str, Any], seeds: torch.Tensor) -> dict[str, Any]:
    """The batch unchanged (e.g. a weak view for inputs that are already augmented by the dataset)."""
    return batch


def _generator(seed: torch.Tensor) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def flip_and_crop(images: torch.Tensor, seeds: torch.Tensor, padding: float = 0.125) -> torch.Tensor:
    """Per sample: a horizontal flip with probability 1/2, then a random crop of the reflect-padded image."""
    out = torch.empty_like(images)
    height, width = images.shape[-2:]
    pad_h, pad_w = max(1, round(height * padding)), max(1, round(width * padding))
    padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    for i, seed in enumerate(seeds):
        g = _generator(seed)
        flip = torch.rand(1, generator=g)
        top, left = (
            torch.randint(0, 2 * pad_h + 1, (1,), generator=g),
            torch.randint(0, 2 * pad_w + 1, (1,), generator=g),
        )
        crop = padded[i, :, int(top) : int(top) + height, int(left) : int(left) + width]
        out[i] = crop.flip(-1) if float(flip) < 0.5 else crop
    return out


def cutout(images: torch.Tensor, seeds: torch.Tensor, max_fraction: float = 0.5, fill: float = 0.5) -> torch.Tensor:
    """Per sample: one square of side up to ``max_fraction`` of the image set to ``fill`` (in [0, 1] pixel space)."""
    out = images.clone()
    height, width = images.shape[-2:]
    for i, seed in enumerate(seeds):
        g = _generator(int(seed) ^ 0xC07)
        side = int(float(torch.rand(1, generator=g)) * max_fraction * min(height, width))
        if side < 1:
            continue
        cy, cx = int(torch.randint(0, height, (1,), generator=g)), int(torch.randint(0, width, (1,), generator=g))
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        out[i, :, top : top + side, left : left + side] = fill
    return out


class ImageViews(Views):
    """FixMatch's image views on ``pixel_values`` normalised by (mean, std): weak = flip + padded crop; strong =
    weak, then timm's RandAugment (``ops`` random operations at random magnitude up to ``magnitude``), then Cutout."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        key: str = "pixel_values",
        padding: float = 0.125,
        ops: int = 2,
        magnitude: int = 10,
        cutout_fraction: float = 0.5,
    ) -> None:
        from timm.data.auto_augment import rand_augment_transform

        mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        if mean_t.numel() != std_t.numel() or (std_t <= 0).any():
            raise ValueError(f"mean {list(mean)} and std {list(std)} must have one positive std per channel")
        # mstd > 100: timm draws each operation's magnitude uniformly in [0, magnitude], as FixMatch's RandAugment
        self._augment = rand_augment_transform(f"rand-n{ops}-m{magnitude}-mstd101", {}, transforms=FIXMATCH_OPS)
        self.key, self.padding, self.cutout_fraction = key, padding, cutout_fraction
        self.mean, self.std = mean_t, std_t
        super().__init__(weak=self._weak, strong=self._strong)

    def _weak(self, batch: dict[str, Any], seeds: torch.Tensor) -> dict[str, Any]:
        images = self._images(batch)
        return {**batch, self.key: flip_and_crop(images, seeds, self.padding)}

    def _strong(self, batch: dict[str, Any], seeds: torch.Tensor) -> dict[str, Any]:
        images = flip_and_crop(self._images(batch), seeds, self.padding)
        mean, std = self.mean.to(images), self.std.to(images)
        pixels = (images * std + mean).clamp(0, 1)
        augmented = torch.stack([self._rand_augment(p, int(s)) for p, s in zip(pixels, seeds)])
        augmented = cutout(augmented, seeds, self.cutout_fraction)
        return {**batch, self.key: ((augmented - mean) / std).to(images.dtype)}

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.key not in batch or batch[self.key].dim() != 4:
            raise ValueError(
                f"ImageViews augments batch[{self.key!r}] of shape (batch, channels, height, width); the batch has "
                f"{sorted(batch)}. For other inputs pass FixMatchTrainer(views=Views(weak=..., strong=...))"
            )
        return batch[self.key]

    def _rand_augment(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandAugment on one [0, 1] image through PIL; the Python and NumPy RNGs it draws from are seeded by
        the sample and restored afterwards, so the global streams of the run are untouched."""
        from PIL import Image

        channels = pixels.shape[0]
        array = (pixels.detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(array[..., 0] if channels == 1 else array).convert("RGB")
        state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            image = self._augment(image)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        result = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (result[:1] if channels == 1 else result).to(pixels)


class TokenMasking(Views):
    """Views of a tokenised text batch: weak = the text as is; strong = a ``fraction`` of its real tokens (not
    padding, not special tokens) replaced by the mask token (the unknown token without one). Not published with
    FixMatch (which is for images); a cheap strong view in the spirit of UDA's word replacement."""

    def __init__(self, tokenizer: Any, fraction: float = 0.2, key: str = "input_ids") -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        mask = getattr(tokenizer, "mask_token_id", None)
        mask = mask if mask is not None else getattr(tokenizer, "unk_token_id", None)
        if mask is None:
            raise ValueError("the tokenizer has neither a mask nor an unknown token to mask with; pass your own views")
        self.mask_id, self.fraction, self.key = int(mask), fraction, key
        self.special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
        super().__init__(weak=identity_view, strong=self._strong)

    def _strong(self, batch: dict[str, Any], seeds: torch.Tensor) -> dict[str, Any]:
        if self.key not in batch:
            raise ValueError(f"TokenMasking masks batch[{self.key!r}]; the batch has {sorted(batch)}")
        ids = batch[self.key]
        real = ~torch.isin(ids, self.special.to(ids.device))
        if "attention_mask" in batch:
            real &= batch["attention_mask"].bool()
        # draws numbered from each text's first token, so left padding does not change which tokens are masked
        first = torch.where(real.any(1), real.float().argmax(1), torch.zeros_like(real[:, 0], dtype=torch.long))
        u = torch.stack(
            [torch.rand(ids.shape[1], generator=_generator(s)).roll(int(f)) for s, f in zip(seeds, first.cpu())]
        ).to(ids.device)
        return {**batch, self.key: torch.where(real & (u < self.fraction), torch.full_like(ids, self.mask_id), ids)}


def image_views_for(processor: Any = None) -> ImageViews:
    """ImageViews with the normalisation of an image processor (ImageNet's when it has none)."""
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    return ImageViews(mean, std)


__all__ = [
    "ImageViews",
    "TokenMasking",
    "View",
    "Views",
    "cutout",
    "flip_and_crop",
    "identity_view",
    "image_views_for",
]
