"""Long-tailed subsampling and balanced per-class splits of a `datasets.Dataset`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict

PROFILES = ("exponential", "step")


def _labels(dataset: Dataset, label_column: str, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """The integer label column as an array, and the number of classes (from ClassLabel when present)."""
    if label_column not in dataset.column_names:
        raise ValueError(
            f"dataset has no label column {label_column!r}; its columns are {dataset.column_names}. "
            "Pass label_column=<name> or rename the column."
        )
    labels = np.asarray(dataset[label_column])
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label column {label_column!r} must hold integer class ids, got dtype {labels.dtype}; "
            "encode it first, e.g. dataset.class_encode_column(label_column)"
        )
    if num_classes is None:
        feature = dataset.features.get(label_column)
        if isinstance(feature, ClassLabel):
            num_classes = feature.num_classes
        else:
            num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels in {label_column!r} fall outside [0, {num_classes}); check num_classes")
    return labels, num_classes


def class_counts(dataset: Dataset, label_column: str = "label", num_classes: int | None = None) -> list[int]:
    """Number of samples of each class (classes with no sample count 0)."""
    labels, num_classes = _labels(dataset, label_column, num_classes)
    return np.bincount(labels, minlength=num_classes).tolist()


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exponential") -> list[int]:
    """Per-class sizes: exponential n_k = floor(n_max rho^(-k/(K-1))), or step (first half n_max, rest n_max/rho)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles are: {', '.join(PROFILES)}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes < 2 or n_max < 1:
        raise ValueError("need num_classes >= 2 and n_max >= 1")
    if profile == "exponential":
        return [int(math.floor(n_max * imbalance_ratio ** (-k / (num_classes - 1)) + 1e-9)) for k in range(num_classes)]
    tail = int(math.floor(n_max / imbalance_ratio + 1e-9))
    return [n_max if k < num_classes // 2 else tail for k in range(num_classes)]


def _select_per_class(
    labels: np.ndarray, wanted: Sequence[int], rng: np.random.Generator, purpose: str
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of wanted[k] indices of each class k; returns (chosen, rest), both sorted."""
    chosen = []
    for k, n in enumerate(wanted):
        pool = np.flatnonzero(labels == k)
        if n > pool.size:
            raise ValueError(
                f"class {k} has {pool.size} samples, fewer than the {n} needed for {purpose}; "
                "lower the per-class size (or imbalance n_max) or drop the class"
            )
        chosen.append(rng.choice(pool, size=n, replace=False) if n else pool[:0])
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[picked] = False
    return picked, np.flatnonzero(mask)


def make_long_tailed(
    dataset: Dataset,
    imbalance_ratio: float,
    *,
    profile: str = "exponential",
    n_max: int | None = None,
    label_column: str = "label",
    class_order: Sequence[int] | None = None,
    seed: int = 0,
) -> Dataset:
    """A long-tailed subset: class class_order[r] keeps the r-th profile size (default order 0..K-1).

    ``n_max`` defaults to the size of the smallest class, so that every class can supply its share.
    """
    labels, num_classes = _labels(dataset, label_column)
    available = np.bincount(labels, minlength=num_classes)
    if n_max is None:
        n_max = int(available.min())
    sizes = long_tailed_counts(n_max, num_classes, imbalance_ratio, profile)
    order = list(range(num_classes)) if class_order is None else list(class_order)
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of range({num_classes})")
    wanted = [0] * num_classes
    for rank, k in enumerate(order):
        wanted[k] = sizes[rank]
    picked, _ = _select_per_class(
        labels, wanted, np.random.default_rng(seed), f"a {profile} profile with n_max={n_max}"
    )
    return dataset.select(picked)


def balanced_split(
    dataset: Dataset, per_class: int, *, label_column: str = "label", seed: int = 0, num_classes: int | None = None
) -> tuple[Dataset, Dataset]:
    """(balanced part with per_class samples of every class, the rest), seeded and disjoint."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels, num_classes = _labels(dataset, label_column, num_classes)
    picked, rest = _select_per_class(
        labels, [per_class] * num_classes, np.random.default_rng(seed), f"a balanced split of {per_class} per class"
    )
    return dataset.select(picked), dataset.select(rest)


def long_tailed_splits(
    dataset: Dataset,
    *,
    validation_per_class: int,
    test_per_class: int,
    max_train_per_class: int | None = None,
    label_column: str = "label",
    seed: int = 0,
) -> DatasetDict:
    """Balanced validation and test splits held out per class; the rest is the (naturally long-tailed) train split.

    ``max_train_per_class`` caps each class of the train split (a seeded subset), keeping its imbalance natural.
    """
    validation, rest = balanced_split(dataset, validation_per_class, label_column=label_column, seed=seed)
    num_classes = _labels(dataset, label_column)[1]
    test, train = balanced_split(
        rest, test_per_class, label_column=label_column, seed=seed + 1, num_classes=num_classes
    )
    if max_train_per_class is not None:
        labels = np.asarray(train[label_column])
        wanted = np.minimum(np.bincount(labels, minlength=num_classes), max_train_per_class)
        picked, _ = _select_per_class(labels, wanted.tolist(), np.random.default_rng(seed + 2), "the train cap")
        train = train.select(picked)
    return DatasetDict(train=train, validation=validation, test=test)


# The label columns `Trainer`'s collators accept (``label`` and ``label_ids`` are renamed to ``labels``).
LABEL_COLUMNS = ("labels", "label", "label_ids")


def dataset_groups(dataset, group_column: str, what: str = "training") -> np.ndarray:
    """The integer group id of every sample: a `datasets.Dataset` column (read bypassing any transform), or the
    ``group_column`` key of each example of a torch dataset."""
    if isinstance(dataset, Dataset):
        if group_column not in dataset.column_names:
            raise ValueError(
                f"the {what} set has no group column {group_column!r} (group_column in the config); its columns are "
                f"{dataset.column_names}"
            )
        groups = np.asarray(dataset.with_format("numpy", columns=[group_column])[group_column])
    else:
        groups = []
        for i in range(len(dataset)):
            example = dataset[i]
            if not isinstance(example, dict) or group_column not in example:
                raise ValueError(f"example {i} of the {what} set has no {group_column!r} key (group_column)")
            groups.append(np.asarray(example[group_column]).item())
        groups = np.asarray(groups)
    if groups.size and not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(
            f"group column {group_column!r} of the {what} set must hold integer group ids 0 .. G-1, got dtype "
            f"{groups.dtype}; encode it first, e.g. dataset.class_encode_column({group_column!r})"
        )
    if groups.size and groups.min() < 0:
        raise ValueError(
            f"group column {group_column!r} of the {what} set holds negative ids "
            f"{sorted(set(groups[groups < 0].tolist()))[:10]}; number the groups 0 .. G-1"
        )
    return groups.astype(np.int64)


def dataset_labels(dataset, label_names: Sequence[str] = LABEL_COLUMNS) -> np.ndarray:
    """The integer labels of a `datasets.Dataset` (read from the column, bypassing any transform) or a torch dataset.

    A torch dataset may expose them as a ``targets`` or ``labels`` attribute (torchvision's convention); otherwise
    every example is read once.
    """
    if isinstance(dataset, Dataset):
        for name in label_names:
            if name in dataset.column_names:
                return _labels(dataset.with_format("numpy", columns=[name]), name)[0]
        raise ValueError(
            f"dataset has none of the label columns {list(label_names)}; its columns are {dataset.column_names}"
        )
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "selmix-hf reads the labels of map-style datasets (with __len__), not iterable ones; LongTailTrainer "
            "trains on an iterable dataset when LongTailConfig(class_counts=[...]) gives the counts"
        )
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64)
    out = []
    for i in range(len(dataset)):
        example = dataset[i]
        name = next((n for n in label_names if n in example), None)
        if name is None:
            raise ValueError(f"example {i} has none of the label keys {list(label_names)}")
        out.append(int(example[name]))
    return np.asarray(out, dtype=np.int64)
