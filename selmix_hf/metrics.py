"""Confusion-matrix metrics: the non-decomposable quantities SelMix optimises and reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[int] | Sequence[float]

MANY_SHOT_MIN = 100  # a class with more training samples than this is "many-shot"
FEW_SHOT_MAX = 20  # a class with fewer training samples than this is "few-shot"


def _as_tensor(values: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Accept torch tensors, numpy arrays and sequences alike."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor if dtype is None else tensor.to(dtype)


def uniform_prior(num_classes: int, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """The default class prior: a balanced test distribution."""
    return torch.full((num_classes,), 1.0 / num_classes, dtype=dtype, device=device)


def check_labels(labels: torch.Tensor, num_classes: int, what: str = "labels") -> None:
    """Raise a ValueError naming the offending values when labels fall outside [0, num_classes)."""
    if labels.numel() == 0:
        return
    if labels.dtype.is_floating_point:
        raise ValueError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        values = sorted(set(bad.tolist()))[:10]
        raise ValueError(
            f"{what} contain values outside [0, {num_classes}): {values}. "
            f"Check num_labels / num_classes (= {num_classes}) against the data's label column."
        )


def confusion_counts(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> torch.Tensor:
    """Counts N[k, l] of samples with true class k predicted as l (int64, K x K)."""
    y = _as_tensor(labels).reshape(-1)
    yhat = _as_tensor(predictions).reshape(-1)
    if y.shape != yhat.shape:
        raise ValueError(f"labels and predictions differ in length: {y.numel()} vs {yhat.numel()}")
    check_labels(y, num_classes, "labels")
    check_labels(yhat, num_classes, "predictions")
    flat = y.long() * num_classes + yhat.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def normalized_confusion(
    counts: ArrayLike, class_prior: ArrayLike | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """C[k, l] = pi_k N[k, l] / N_k: rows sum to the class prior (uniform by default).

    A class with no sample has no row to normalise, so it is an error rather than a silent zero.
    """
    counts_t = _as_tensor(counts).to(dtype)
    if counts_t.ndim != 2 or counts_t.shape[0] != counts_t.shape[1]:
        raise ValueError(f"confusion counts must be a square K x K matrix, got shape {tuple(counts_t.shape)}")
    num_classes = counts_t.shape[0]
    row_totals = counts_t.sum(dim=1)
    missing = torch.nonzero(row_totals == 0).flatten().tolist()
    if missing:
        raise ValueError(
            f"classes {missing} have no sample in the evaluation data, so their recall is undefined. "
            "Every class needs at least one validation sample: rebuild the split with "
            "selmix_hf.data.balanced_split (or pass a validation set that covers all classes)."
        )
    prior = (
        uniform_prior(num_classes, dtype, counts_t.device) if class_prior is None else _as_tensor(class_prior, dtype)
    )
    prior = check_prior(prior, num_classes).to(counts_t.device)
    return counts_t * (prior / row_totals).unsqueeze(1)


def check_prior(prior: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validate a class prior: K positive finite entries summing to one."""
    if prior.shape != (num_classes,):
        raise ValueError(f"class_prior must have {num_classes} entries, got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all() or (prior <= 0).any():
        raise ValueError("class_prior entries must be finite and positive")
    if abs(float(prior.sum()) - 1.0) > 1e-6:
        raise ValueError(f"class_prior must sum to 1, sums to {float(prior.sum()):.6g}")
    return prior


def recalls(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class recall C_kk / sum_l C_kl (independent of the prior)."""
    return torch.diagonal(confusion) / confusion.sum(dim=1)


def coverages(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class coverage sum_k C_kl: the share of predictions that go to class l."""
    return confusion.sum(dim=0)


def mean_recall(confusion: torch.Tensor) -> float:
    return float(recalls(confusion).mean())


def min_recall(confusion: torch.Tensor) -> float:
    return float(recalls(confusion).min())


def accuracy(confusion: torch.Tensor) -> float:
    """Accuracy under the prior the confusion matrix was normalised with."""
    return float(torch.trace(confusion) / confusion.sum())


def g_mean(confusion: torch.Tensor) -> float:
    """Geometric mean of recalls (0 when any class is never recalled)."""
    r = recalls(confusion)
    if (r <= 0).any():
        return 0.0
    return float(torch.exp(torch.log(r).mean()))


def h_mean(confusion: torch.Tensor) -> float:
    """Harmonic mean of recalls (0 when any class is never recalled)."""
    r = recalls(confusion)
    if (r <= 0).any():
        return 0.0
    return float(r.numel() / (1.0 / r).sum())


def min_coverage(confusion: torch.Tensor) -> float:
    return float(coverages(confusion).min())


@dataclass(frozen=True)
class HeadTailSplit:
    """Disjoint head and tail class index lists."""

    head: tuple[int, ...]
    tail: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.head or not self.tail:
            raise ValueError("head and tail must both contain at least one class")
        if set(self.head) & set(self.tail):
            raise ValueError(f"head and tail overlap: {sorted(set(self.head) & set(self.tail))}")

    @property
    def num_classes(self) -> int:
        return len(self.head) + len(self.tail)

    def check(self, num_classes: int) -> HeadTailSplit:
        """Raise unless head and tail partition range(num_classes)."""
        if sorted(self.head + self.tail) != list(range(num_classes)):
            raise ValueError(f"head and tail must partition the {num_classes} classes exactly")
        return self


def head_tail_split(
    class_counts: ArrayLike | None = None,
    tail_fraction: float = 0.1,
    *,
    head: Sequence[int] | None = None,
    tail: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> HeadTailSplit:
    """Tail = the ceil(tail_fraction * K) classes with the fewest training samples, head = the rest.

    Explicit ``head`` / ``tail`` lists take precedence (give one and the other is its complement).
    """
    if head is not None or tail is not None:
        if num_classes is None:
            num_classes = len(class_counts) if class_counts is not None else None
        if num_classes is None:
            if head is None or tail is None:
                raise ValueError("give num_classes (or class_counts) when only one of head / tail is given")
            num_classes = len(head) + len(tail)
        everything = set(range(num_classes))
        head_set = set(head) if head is not None else everything - set(tail or ())
        tail_set = set(tail) if tail is not None else everything - head_set
        return HeadTailSplit(tuple(sorted(head_set)), tuple(sorted(tail_set))).check(num_classes)
    if class_counts is None:
        raise ValueError(
            "head/tail metrics need the training class counts (class_counts=...) or explicit head/tail lists"
        )
    if not 0.0 < tail_fraction < 1.0:
        raise ValueError(f"tail_fraction must lie in (0, 1), got {tail_fraction}")
    counts = _as_tensor(class_counts).reshape(-1)
    num = counts.numel()
    if num < 2:
        raise ValueError("a head/tail split needs at least two classes")
    num_tail = min(max(1, int(np.ceil(tail_fraction * num - 1e-9))), num - 1)
    order = sorted(range(num), key=lambda k: (float(counts[k]), k))  # stable: ties go to lower index first
    tail_idx = tuple(sorted(order[:num_tail]))
    head_idx = tuple(sorted(order[num_tail:]))
    return HeadTailSplit(head_idx, tail_idx)


def head_tail_recall(confusion: torch.Tensor, split: HeadTailSplit) -> tuple[float, float]:
    """Mean recall over the head classes and over the tail classes."""
    r = recalls(confusion)
    return float(r[list(split.head)].mean()), float(r[list(split.tail)].mean())


def min_head_tail_recall(confusion: torch.Tensor, split: HeadTailSplit) -> float:
    return min(head_tail_recall(confusion, split))


def shot_groups(class_counts: ArrayLike) -> dict[str, list[int]]:
    """Many (> 100), medium (20..100) and few (< 20) shot classes by training count."""
    counts = _as_tensor(class_counts).reshape(-1).tolist()
    return {
        "many": [k for k, n in enumerate(counts) if n > MANY_SHOT_MIN],
        "medium": [k for k, n in enumerate(counts) if FEW_SHOT_MAX <= n <= MANY_SHOT_MIN],
        "few": [k for k, n in enumerate(counts) if n < FEW_SHOT_MAX],
    }


def shot_accuracy(confusion: torch.Tensor, class_counts: ArrayLike) -> dict[str, float]:
    """Mean recall of the many/medium/few-shot groups; a group with no class is left out."""
    r = recalls(confusion)
    return {name: float(r[idx].mean()) for name, idx in shot_groups(class_counts).items() if idx}


def classification_report(
    labels: ArrayLike,
    predictions: ArrayLike,
    num_classes: int,
    *,
    class_counts: ArrayLike | None = None,
    class_prior: ArrayLike | None = None,
    tail_fraction: float = 0.1,
    split: HeadTailSplit | None = None,
    class_names: Sequence[str] | None = None,
    per_class: bool = False,
) -> dict[str, float]:
    """Every scalar metric of the library for one set of predictions.

    Head/tail and shot metrics appear only when the training ``class_counts`` (or a ``split``) are known.
    """
    confusion = normalized_confusion(confusion_counts(labels, predictions, num_classes), class_prior)
    report = {
        "accuracy": accuracy(confusion),
        "mean_recall": mean_recall(confusion),
        "min_recall": min_recall(confusion),
        "g_mean": g_mean(confusion),
        "h_mean": h_mean(confusion),
        "min_coverage": min_coverage(confusion),
    }
    if split is None and class_counts is not None:
        split = head_tail_split(class_counts, tail_fraction)
    if split is not None:
        head, tail = head_tail_recall(confusion, split.check(num_classes))
        report.update(head_recall=head, tail_recall=tail, min_head_tail_recall=min(head, tail))
    if class_counts is not None:
        report.update({f"{name}_shot_recall": value for name, value in shot_accuracy(confusion, class_counts).items()})
    if per_class:
        names = _class_names(class_names, num_classes)
        for name, r, c in zip(names, recalls(confusion).tolist(), coverages(confusion).tolist()):
            report[f"recall_{name}"] = r
            report[f"coverage_{name}"] = c
    return report


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries for {num_classes} classes")
    return [str(name).replace(" ", "_") for name in class_names]


def make_compute_metrics(
    num_classes: int,
    *,
    class_counts: ArrayLike | None = None,
    class_prior: ArrayLike | None = None,
    tail_fraction: float = 0.1,
    split: HeadTailSplit | None = None,
    class_names: Sequence[str] | None = None,
    per_class: bool = False,
    positive_class: int | None = None,
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: logits in, scalar metrics out. When the eval set has the
    trainer's ``group_column``, label_ids is (labels, group ids) and the group metrics are added
    (`selmix_hf.groups.group_report`; ``positive_class`` names the class of the equal-opportunity gap)."""

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        from .groups import group_report

        logits = eval_prediction.predictions
        if isinstance(logits, tuple):  # models that also return hidden states
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        labels, groups = eval_prediction.label_ids, None
        if isinstance(labels, (tuple, list)):  # (labels, group ids): the eval set has the group column
            labels, groups = labels
        report = classification_report(
            np.asarray(labels),
            predictions,
            num_classes,
            class_counts=class_counts,
            class_prior=class_prior,
            tail_fraction=tail_fraction,
            split=split,
            class_names=class_names,
            per_class=per_class,
        )
        if groups is not None:
            group_metrics = group_report(
                np.asarray(labels),
                predictions,
                np.asarray(groups),
                num_classes,
                class_prior=class_prior,
                positive_class=positive_class,
            )
            report.update(group_metrics)
        return report

    return compute_metrics


def metric_path() -> str:
    """The file of the `evaluate` module of these metrics: ``evaluate.load(metric_path())`` works offline."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_metric.py")
