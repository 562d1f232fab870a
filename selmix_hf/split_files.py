"""Image datasets from split files ("relative/path label" per line), the format of ImageNet-LT and Places-LT."""

from __future__ import annotations

import os
from typing import Any, Callable

from datasets import Dataset, DatasetDict

IMAGENET_LT_FILES = {"train": "ImageNet_LT_train.txt", "validation": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}


def read_split_file(path: str, image_root: str, num_labels: int | None = None, check_images: bool = True) -> Dataset:
    """A Dataset with columns ``image_path`` (absolute) and ``label`` from one split file; every line checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} does not exist (expected lines 'relative/path label')")
    paths, labels = [], []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
            label = int(parts[1])
            if label < 0 or (num_labels is not None and label >= num_labels):
                bound = f"0 .. {num_labels - 1}" if num_labels is not None else ">= 0"
                raise ValueError(f"{path}:{number}: label {label} is outside {bound}; fix the file or set num_labels")
            image = os.path.join(image_root, parts[0])
            if check_images and not os.path.isfile(image):
                raise FileNotFoundError(f"{path}:{number}: image {image} does not exist (paths are relative to {image_root})")
            paths.append(image)
            labels.append(label)
    if not paths:
        raise ValueError(f"split file {path} has no samples")
    return Dataset.from_dict({"image_path": paths, "label": labels})


def load_split_files(
    image_root: str,
    split_files: dict[str, str] | None = None,
    splits_dir: str | None = None,
    num_labels: int | None = None,
    check_images: bool = True,
) -> DatasetDict:
    """train / validation / test from split files in ``splits_dir`` (default ``image_root``); ImageNet-LT's names by default."""
    files = split_files or IMAGENET_LT_FILES
    folder = splits_dir or image_root
    splits = DatasetDict({name: read_split_file(os.path.join(folder, file), image_root, num_labels, check_images)
                          for name, file in files.items()})
    if num_labels is None:  # the classes are the labels seen anywhere
        top = max(max(split["label"]) for split in splits.values())
        num_labels = top + 1
    for name, split in splits.items():
        missing = sorted(set(range(num_labels)) - set(split["label"]))
        if name != "train" and missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"the {name} split ({files[name]}) has no sample of class(es) {shown}; every class must "
                             "be present for per-class recall (SelMix's gains need them on validation too)")
    return splits


def with_image_transform(dataset: Dataset, transform: Callable[[Any], Any], image_column: str = "image_path") -> Dataset:
    """Decode (a path or a PIL image) to RGB and apply ``transform`` lazily; the model input is ``pixel_values``."""
    from PIL import Image

    def apply(batch: dict[str, list]) -> dict[str, list]:
        images = []
        for item in batch[image_column]:
            image = Image.open(item) if isinstance(item, str) else item
            images.append(transform(image.convert("RGB")))
        return {"pixel_values": images, "label": batch["label"]}

    return dataset.with_transform(apply)


__all__ = ["IMAGENET_LT_FILES", "load_split_files", "read_split_file", "with_image_transform"]
