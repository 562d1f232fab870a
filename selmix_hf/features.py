"""Where the pooled embedding meets the classifier: find the final linear layer and hook its input."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _compat

logger = logging.getLogger(__name__)

# Model class name -> dotted path of the final linear layer, for the families whose head is not the obvious one.
HEAD_PATHS: dict[str, str] = {
    "BertForSequenceClassification": "classifier",
    "RobertaForSequenceClassification": "classifier.out_proj",
    "XLMRobertaForSequenceClassification": "classifier.out_proj",
    "CamembertForSequenceClassification": "classifier.out_proj",
    "DistilBertForSequenceClassification": "classifier",
    "DebertaV2ForSequenceClassification": "classifier",
    "ViTForImageClassification": "classifier",
    "DeiTForImageClassification": "classifier",
    "SwinForImageClassification": "classifier",
    "ConvNextForImageClassification": "classifier",
}

UNSUPPORTED = {
    "DeiTForImageClassificationWithTeacher": "it averages two heads and cannot be trained with labels; "
    "fine-tune DeiTForImageClassification instead",
}


def register_head(model_class: type | str, path: str) -> None:
    """Tell selmix-hf where the final linear layer of a model class lives (dotted module path)."""
    HEAD_PATHS[model_class if isinstance(model_class, str) else model_class.__name__] = path


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def headless_hint(model: nn.Module) -> str:
    """The advice for a model without a classification head: which classifier class to load instead."""
    model = _compat.base_model_of(unwrap(model))
    classes = _compat.classifier_classes(getattr(getattr(model, "config", None), "model_type", None))
    suggestion = (
        " or ".join(classes)
        if classes
        else "an ...ForSequenceClassification (text) or ...ForImageClassification (images) class"
    )
    return (
        f"{type(model).__name__} has no classification head (it returns hidden states, not logits): load the "
        f"checkpoint with {suggestion} (e.g. AutoModelForSequenceClassification.from_pretrained(name, "
        "num_labels=K)), or register your own head with selmix_hf.register_head"
    )


def num_labels_of(model: nn.Module) -> int:
    """num_labels from the model's config, which every classifier the trainers accept must have."""
    inner = _compat.base_model_of(unwrap(model))
    if _compat.is_headless(inner):
        raise ValueError(headless_hint(inner))
    num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"cannot read num_labels (>= 2) from {type(inner).__name__}.config")
    return num_labels


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a forward's output: a ModelOutput / object with ``.logits``, a dict with "logits", or a tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model's forward returned a {type(outputs).__name__}; selmix-hf trainers need the logits: return a "
        "transformers ModelOutput with .logits (e.g. SequenceClassifierOutput(logits=...)), a dict with a 'logits' "
        "entry, or the logits tensor itself"
    )


def find_head(model: nn.Module, num_labels: int | None = None) -> tuple[str, nn.Linear]:
    """(dotted name, module) of the linear layer producing the logits: registry, timm wrapper, then the fallback.

    The fallback is the last ``nn.Linear`` with ``out_features == num_labels``.
    """
    model = _compat.base_model_of(unwrap(model))
    cls_name = type(model).__name__
    if cls_name in UNSUPPORTED:
        raise ValueError(f"{cls_name} is not supported: {UNSUPPORTED[cls_name]}")
    if num_labels is None:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    names = {id(module): name for name, module in model.named_modules()}
    inactive = _compat.peft_inactive_modules(model)  # a PEFT-trained head: only its active copy runs
    if cls_name in HEAD_PATHS:
        head = _compat.peft_active_copy(model.get_submodule(HEAD_PATHS[cls_name]))
        name = names.get(id(head), HEAD_PATHS[cls_name])
    elif hasattr(model, "timm_model") and hasattr(model.timm_model, "get_classifier"):
        head = _compat.peft_active_copy(model.timm_model.get_classifier())
        name = names.get(id(head), "")
    else:
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (num_labels is None or module.out_features == num_labels)
            and id(module) not in inactive
        ]
        if not candidates:
            raise ValueError(
                f"cannot find the classification head of {cls_name}: no nn.Linear with out_features == num_labels "
                f"({num_labels}). Register it with "
                f"selmix_hf.features.register_head({cls_name!r}, '<dotted.path.to.linear>')"
            )
        name, head = candidates[-1]
        if len(candidates) > 1:
            logger.warning(
                "%s: %d linear layers have num_labels=%d outputs (%s); using the last, %r, as the classification head. "
                "If that is wrong, call selmix_hf.register_head(%r, '<dotted.path.to.linear>').",
                cls_name,
                len(candidates),
                num_labels,
                ", ".join(repr(n) for n, _ in candidates),
                name,
                cls_name,
            )
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the head of {cls_name} at {name!r} is a {type(head).__name__}, not nn.Linear; register the final "
            f"linear layer with selmix_hf.features.register_head({cls_name!r}, '<dotted.path.to.linear>')"
        )
    if num_labels is not None and head.out_features != num_labels:
        raise ValueError(
            f"the head {name!r} of {cls_name} has {head.out_features} outputs but num_labels is {num_labels}"
        )
    return name, head


class PooledFeatures:
    """A forward pre-hook on the head: captures the pooled embedding, or mixes the two halves of the batch.

    While mixing with weights ``lam`` (B,), a head input of 2B rows becomes lam * first half + (1 - lam) * second
    half, so one forward over both halves yields the B logits of the mixed embeddings.
    """

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.captured: torch.Tensor | None = None
        self._capturing = False
        self._lam: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    @contextmanager
    def capture(self) -> Iterator[PooledFeatures]:
        """Record the head's input of each forward in ``self.captured`` (detached)."""
        self._capturing, self.captured = True, None
        try:
            yield self
        finally:
            self._capturing = False

    @contextmanager
    def mixing(self, lam: torch.Tensor) -> Iterator[None]:
        """Mix the head input's halves with per-pair weights ``lam`` for the forwards inside the block."""
        self._lam = lam
        try:
            yield
        finally:
            self._lam = None

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        features, *rest = args
        if self._lam is not None:
            pairs = self._lam.numel()
            if features.ndim != 2 or features.shape[0] != 2 * pairs:
                raise RuntimeError(
                    f"SelMix expects the head input to be (2 x {pairs}, dim) pooled embeddings, "
                    f"got {tuple(features.shape)}"
                )
            lam = self._lam.to(device=features.device, dtype=features.dtype).unsqueeze(1)
            features = lam * features[:pairs] + (1.0 - lam) * features[pairs:]
        if self._capturing:
            self.captured = features.detach()
        return (features, *rest)

    def remove(self) -> None:
        self._handle.remove()
