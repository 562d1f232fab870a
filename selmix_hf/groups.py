"""Groups of samples: the (class, group) cells, their confusion matrix and the group metrics.

A group is an integer attribute of each sample (``group_column``). As in GroupDRO and SubpopBench, the units the
worst-group metrics range over are the (class, group) cells present in the data: group ids that already encode
the class (e.g. Waterbirds' four label x place groups) and plain attribute ids give the same cells. Row c of a
cell confusion matrix is cell c; its columns are the predicted classes; its rows sum to the cell prior
pi_c = pi_k n_c / n_k, so summing the rows of each class gives back the class confusion matrix exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import ArrayLike, _as_tensor, check_labels, check_prior, uniform_prior

MAX_GROUP_ENTRIES = 16  # per-group accuracies reported one by one up to this many groups


def check_groups(groups: torch.Tensor, num_groups: int, what: str = "group ids") -> None:
    """Raise a ValueError naming the offending values when group ids are not integers in [0, num_groups)."""
    if groups.numel() and groups.dtype.is_floating_point:
        raise ValueError(f"{what} must be integers, got dtype {groups.dtype}")
    bad = groups[(groups < 0) | (groups >= num_groups)]
    if bad.numel():
        raise ValueError(
            f"{what} contain values outside [0, {num_groups}): {sorted(set(bad.tolist()))[:10]}. Number the groups "
            f"0 .. {num_groups - 1} in the group column, or raise num_groups"
        )


@dataclass(frozen=True)
class CellLayout:
    """The (class, group) cells present in a data set; cell c is (``classes[c]``, ``groups[c]``), ``counts[c]``
    samples, ordered by class then group."""

    num_classes: int
    num_groups: int
    classes: tuple[int, ...]
    groups: tuple[int, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_labels(
        cls, labels: ArrayLike, groups: ArrayLike, num_classes: int, num_groups: int | None = None
    ) -> CellLayout:
        """The cells that hold at least one of the given samples."""
        y, g = _checked(labels, groups, num_classes, num_groups)
        num_groups = int(g.max()) + 1 if num_groups is None and g.numel() else int(num_groups or 1)
        counts = torch.bincount(y * num_groups + g, minlength=num_classes * num_groups)
        present = torch.nonzero(counts).flatten()
        return cls(
            num_classes,
            num_groups,
            tuple((present // num_groups).tolist()),
            tuple((present % num_groups).tolist()),
            tuple(counts[present].tolist()),
        )

    @classmethod
    def one_group(cls, num_classes: int, class_counts: Sequence[int] | None = None) -> CellLayout:
        """One group: the cells are the classes (class-only objectives are this case)."""
        counts = tuple(class_counts) if class_counts is not None else (1,) * num_classes
        return cls(num_classes, 1, tuple(range(num_classes)), (0,) * num_classes, counts)

    @property
    def num_cells(self) -> int:
        return len(self.classes)

    def cell_classes(self) -> torch.Tensor:
        """The class of each cell (int64, M)."""
        return torch.tensor(self.classes, dtype=torch.long)

    def cell_of(self, labels: ArrayLike, groups: ArrayLike) -> torch.Tensor:
        """The cell index of each sample, -1 for a sample whose cell is not in the layout."""
        y, g = _checked(labels, groups, self.num_classes, self.num_groups)
        lookup = torch.full((self.num_classes * self.num_groups,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes) * self.num_groups + torch.tensor(self.groups)] = torch.arange(self.num_cells)
        return lookup[y * self.num_groups + g]

    def prior(self, class_prior: ArrayLike | None = None) -> torch.Tensor:
        """pi_c = pi_k n_c / n_k: the class prior shared among a class's cells as the layout's data shares it."""
        k = self.num_classes
        class_prior_t = (
            uniform_prior(k) if class_prior is None else check_prior(_as_tensor(class_prior, torch.float64), k)
        )
        classes, counts = self.cell_classes(), torch.tensor(self.counts, dtype=torch.float64)
        per_class = torch.zeros(k, dtype=torch.float64).index_add_(0, classes, counts)
        missing = torch.nonzero(per_class == 0).flatten().tolist()
        if missing:
            raise ValueError(
                f"classes {missing[:20]} have no cell in this layout; every class needs a sample (rebuild the split "
                "with selmix_hf.data.balanced_split)"
            )
        return class_prior_t[classes] * counts / per_class[classes]

    def describe(self, cell: int) -> str:
        return self.describe_pair(self.classes[cell], self.groups[cell])

    @staticmethod
    def describe_pair(label: int, group: int) -> str:
        return f"(class {label}, group {group})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "num_groups": self.num_groups,
            "classes": list(self.classes),
            "groups": list(self.groups),
            "counts": list(self.counts),
        }


def _checked(
    labels: ArrayLike, groups: ArrayLike, num_classes: int, num_groups: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    y, g = _as_tensor(labels).reshape(-1), _as_tensor(groups).reshape(-1)
    if y.shape != g.shape:
        raise ValueError(f"labels and group ids differ in length: {y.numel()} vs {g.numel()}")
    check_labels(y, num_classes)
    if num_groups is not None:
        check_groups(g, num_groups)
    elif g.numel():
        check_groups(g, int(g.max()) + 1)
    return y.long(), g.long()


def cell_confusion_counts(
    labels: ArrayLike, predictions: ArrayLike, groups: ArrayLike, layout: CellLayout
) -> torch.Tensor:
    """Counts N[c, l] of the samples of cell c predicted as class l (int64, M x K); samples outside the layout's
    cells are an error (their cell has no row)."""
    cells = layout.cell_of(labels, groups)
    yhat = _as_tensor(predictions).reshape(-1)
    if yhat.numel() != cells.numel():
        raise ValueError(f"labels and predictions differ in length: {cells.numel()} vs {yhat.numel()}")
    check_labels(yhat, layout.num_classes, "predictions")
    outside = torch.nonzero(cells < 0).flatten()
    if outside.numel():
        raise ValueError(
            f"{outside.numel()} samples fall in cells the layout lacks, e.g. sample {int(outside[0])}; build the "
            "layout from the same data (CellLayout.from_labels)"
        )
    k = layout.num_classes
    flat = cells * k + yhat.long()
    return torch.bincount(flat, minlength=layout.num_cells * k).reshape(layout.num_cells, k)


def normalized_cell_confusion(
    counts: ArrayLike, layout: CellLayout, class_prior: ArrayLike | None = None
) -> torch.Tensor:
    """C[c, l] = pi_c N[c, l] / N_c (float64, M x K): rows sum to the cell prior (`CellLayout.prior`)."""
    counts_t = _as_tensor(counts).to(torch.float64)
    if tuple(counts_t.shape) != (layout.num_cells, layout.num_classes):
        raise ValueError(
            f"cell confusion counts have shape {tuple(counts_t.shape)}, expected "
            f"({layout.num_cells}, {layout.num_classes}) (cells x classes)"
        )
    totals = counts_t.sum(dim=1)
    empty = torch.nonzero(totals == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"cells {[layout.describe(c) for c in empty[:10]]} have no sample, so their recall is undefined"
        )
    return counts_t * (layout.prior(class_prior) / totals).unsqueeze(1)


def aggregate_cells(confusion: torch.Tensor, cell_classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The K x K class confusion matrix of a cell confusion matrix: the rows of each class summed."""
    out = confusion.new_zeros(num_classes, confusion.shape[1])
    return out.index_add(0, cell_classes.to(confusion.device), confusion)


def row_recalls(confusion: torch.Tensor, row_classes: torch.Tensor) -> torch.Tensor:
    """Recall of each row's own class within the row, C[c, k(c)] / sum_l C[c, l] (cells or classes alike)."""
    rows = torch.arange(confusion.shape[0], device=confusion.device)
    return confusion[rows, row_classes.to(confusion.device)] / confusion.sum(dim=1)


def worst_group_accuracy(confusion: torch.Tensor, layout: CellLayout) -> float:
    """The lowest accuracy over the (class, group) cells."""
    return float(row_recalls(confusion, layout.cell_classes()).min())


def group_balanced_accuracy(confusion: torch.Tensor, layout: CellLayout) -> float:
    """The mean accuracy over the (class, group) cells (each cell weighs the same)."""
    return float(row_recalls(confusion, layout.cell_classes()).mean())


def spreads(cell_values: torch.Tensor, cell_classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, max - min of a per-cell value over the class's cells (0 for a class with one cell)."""
    values, classes = cell_values.detach(), cell_classes.to(cell_values.device)
    high = torch.full((num_classes,), -torch.inf, dtype=values.dtype).scatter_reduce(0, classes, values, "amax")
    low = torch.full((num_classes,), torch.inf, dtype=values.dtype).scatter_reduce(0, classes, values, "amin")
    return high - low


def equal_opportunity_gaps(confusion: torch.Tensor, layout: CellLayout) -> torch.Tensor:
    """Per class, the spread (max - min) of its true-positive rate over the groups it has (0 with one group)."""
    return spreads(row_recalls(confusion, layout.cell_classes()), layout.cell_classes(), layout.num_classes)


def equal_opportunity_gap(confusion: torch.Tensor, layout: CellLayout, positive_class: int | None = None) -> float:
    """The equal-opportunity gap: of the named positive class, or the largest over the classes."""
    gaps = equal_opportunity_gaps(confusion, layout)
    if positive_class is None:
        return float(gaps.max())
    if not 0 <= positive_class < layout.num_classes:
        raise ValueError(f"positive_class={positive_class} is not a class index in [0, {layout.num_classes})")
    return float(gaps[positive_class])


def group_report(
    labels: ArrayLike,
    predictions: ArrayLike,
    groups: ArrayLike,
    num_classes: int,
    *,
    num_groups: int | None = None,
    class_prior: ArrayLike | None = None,
    positive_class: int | None = None,
) -> dict[str, float]:
    """The group metrics of one set of predictions: worst-group and group-balanced accuracy over the cells present,
    the equal-opportunity gap, and each group id's accuracy over its samples (up to 16 groups)."""
    layout = CellLayout.from_labels(labels, groups, num_classes, num_groups)
    confusion = normalized_cell_confusion(
        cell_confusion_counts(labels, predictions, groups, layout), layout, class_prior
    )
    report = {
        "worst_group_accuracy": worst_group_accuracy(confusion, layout),
        "group_balanced_accuracy": group_balanced_accuracy(confusion, layout),
        "equal_opportunity_gap": equal_opportunity_gap(confusion, layout, positive_class),
    }
    if layout.num_groups <= MAX_GROUP_ENTRIES:
        y = np.asarray(_as_tensor(labels).reshape(-1))
        g = np.asarray(_as_tensor(groups).reshape(-1))
        hit = y == np.asarray(_as_tensor(predictions).reshape(-1))
        for group in range(layout.num_groups):
            members = g == group
            if members.any():
                report[f"group_{group}_accuracy"] = float(hit[members].mean())
    return report


__all__ = [
    "CellLayout",
    "aggregate_cells",
    "cell_confusion_counts",
    "check_groups",
    "equal_opportunity_gap",
    "equal_opportunity_gaps",
    "group_balanced_accuracy",
    "group_report",
    "normalized_cell_confusion",
    "row_recalls",
    "spreads",
    "worst_group_accuracy",
]
