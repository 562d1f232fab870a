"""Image datasets from split files ("relative/path label" per line), the format of ImageNet-LT and Places-LT."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from datasets import Dataset, DatasetDict

IMAGENET_LT_FILES = {
    "train": "ImageNet_LT_train.txt",
    "validation": "ImageNet_LT_val.txt",
    "test": "ImageNet_LT_test.txt",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def id_ranges(ids: Sequence[int], limit: int = 10) -> str:
    """Sorted class ids as short text, runs joined: ``0 .. 3, 7, 9 .. 12``; beyond ``limit`` runs, ``...``."""
    runs: list[list[int]] = []
    for k in sorted(ids):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    text = [str(a) if a == b else f"{a}, {b}" if b == a + 1 else f"{a} .. {b}" for a, b in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")


def check_class_ids(
    labels: dict[str, Sequence[int]], num_labels: int | None = None, origin: str | None = None, data: str = "the data"
) -> int:
    """The number of classes (``num_labels``, else the largest label + 1), checked against the labels of all splits:
    every class id 0 .. K-1 needs a sample somewhere and no label may reach K. ``origin`` (where num_labels was set
    and how to change it) goes into the error, so that a stale num_labels is found where it was set."""
    seen = sorted({int(v) for values in labels.values() for v in values})
    if not seen:
        raise ValueError(f"{data} has no labels")
    if seen[0] < 0:
        raise ValueError(f"label {seen[0]} in {data} is negative; class ids must be 0 .. K-1")
    given = num_labels is not None
    n = num_labels if given else seen[-1] + 1
    stated = f"num_labels is {n}" + (f" ({origin})" if origin else "") if given else f"the labels go up to {seen[-1]}"
    has = f"{data} has {len(seen)} class{'es' if len(seen) > 1 else ''} (ids {id_ranges(seen)})"
    outside = [k for k in seen if k >= n]
    if outside:
        where = next(name for name, values in labels.items() if outside[0] in set(values))
        raise ValueError(
            f"{stated}, but {has}: label(s) {id_ranges(outside)} (the first in {where}) are outside "
            f"0 .. {n - 1}; set num_labels to {seen[-1] + 1} or fix the labels"
        )
    present = set(seen)
    missing = [k for k in range(n) if k not in present]
    if missing:
        if not given:
            fix = f"renumber the labels to 0 .. {len(seen) - 1} without gaps, or add samples of the missing class(es)"
        elif seen == list(range(len(seen))):
            fix = f"set num_labels to {len(seen)}, or add samples of the missing class(es)"
        else:
            fix = (
                f"add samples of the missing class(es), or renumber the labels to 0 .. {len(seen) - 1} and set "
                f"num_labels to {len(seen)}"
            )
        raise ValueError(
            f"{stated}, but {has}: class id(s) {id_ranges(missing)} ({len(missing)} of {n}) have no "
            f"sample in any split; {fix}"
        )
    return n


def read_split_file(
    path: str,
    image_root: str,
    num_labels: int | None = None,
    check_images: bool = True,
    num_labels_origin: str | None = None,
) -> Dataset:
    """A Dataset with columns ``image_path`` (absolute) and ``label`` from one split file; every line checked
    (``num_labels_origin``, where num_labels was set, is named when a label is out of range)."""
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
                change = f"change num_labels ({num_labels_origin})" if num_labels_origin else "set num_labels"
                raise ValueError(f"{path}:{number}: label {label} is outside {bound}; fix the file or {change}")
            image = os.path.join(image_root, parts[0])
            if check_images and not os.path.isfile(image):
                raise FileNotFoundError(
                    f"{path}:{number}: image {image} does not exist (paths are relative to {image_root})"
                )
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
    num_labels_origin: str | None = None,
) -> DatasetDict:
    """train / validation / test from split files in ``splits_dir`` (default ``image_root``); ImageNet-LT's names by
    default. A num_labels that disagrees with the labels is an error naming ``num_labels_origin`` (where it was set)."""
    files = split_files or IMAGENET_LT_FILES
    folder = splits_dir or image_root
    splits = DatasetDict(
        {
            name: read_split_file(os.path.join(folder, file), image_root, num_labels, check_images, num_labels_origin)
            for name, file in files.items()
        }
    )
    num_labels = check_class_ids(
        {files[name]: split["label"] for name, split in splits.items()},
        num_labels,
        num_labels_origin,
        data=f"the data (split files in {folder})",
    )
    for name, split in splits.items():
        missing = sorted(set(range(num_labels)) - set(split["label"]))
        if name != "train" and missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"the {name} split ({files[name]}) has no sample of class(es) {shown}; every class must "
                "be present for per-class recall (SelMix's gains need them on validation too)"
            )
    return splits


def image_folder(folder: str) -> Dataset:
    """Every image file under ``folder`` (recursively, sorted) as an ``image_path`` column: an unlabelled pool."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the unlabelled image folder {folder} does not exist")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return Dataset.from_dict({"image_path": paths})


def with_image_transform(
    dataset: Dataset, transform: Callable[[Any], Any], image_column: str = "image_path"
) -> Dataset:
    """Decode (a path or a PIL image) to RGB and apply ``transform`` lazily; the model input is ``pixel_values``
    (with ``label`` when the dataset has one: an unlabelled pool has none)."""
    from PIL import Image

    def apply(batch: dict[str, list]) -> dict[str, list]:
        images = []
        for item in batch[image_column]:
            image = Image.open(item) if isinstance(item, str) else item
            images.append(transform(image.convert("RGB")))
        return {"pixel_values": images, **({"label": batch["label"]} if "label" in batch else {})}

    return dataset.with_transform(apply)


__all__ = [
    "IMAGENET_LT_FILES",
    "check_class_ids",
    "id_ranges",
    "image_folder",
    "load_split_files",
    "read_split_file",
    "with_image_transform",
]
