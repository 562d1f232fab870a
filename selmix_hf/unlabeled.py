"""The unlabelled pool of semi-supervised SelMix: a label-free view of a dataset, and its pseudo-labels.

A label column the pool may carry is dropped before anything reads an item, so no code path can see it (the
reference implementation picked partners by the pool's true labels; see docs/semi_supervised.md).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import datasets
import numpy as np
import torch

from .validation import RedrawnSubset, refresh_key

PLACEHOLDER_LABEL = -100  # what a pool item carries in the label column, so the user's collator sees one schema
UNCONFIDENT = -1  # the pseudo-label of a pool sample below the confidence threshold: never drawn


def item_keys(dataset: Any, what: str) -> list[str]:
    """The keys of a dataset's first item: what the collator gets, after any transform the dataset applies."""
    return keys_of(dataset[0], what)


def keys_of(item: Any, what: str) -> list[str]:
    """The keys of one item of the ``what`` set, or a clear error when it is not a dict of model inputs."""
    if not hasattr(item, "keys"):
        raise TypeError(
            f"the {what}'s items are {type(item).__name__}, not dicts of model inputs (e.g. pixel_values, or "
            "input_ids and attention_mask)"
        )
    return list(item.keys())


class UnlabeledView(torch.utils.data.Dataset):
    """A dataset's items without any label column, with ``label_column`` set to a placeholder the loss never reads.

    A `datasets.Dataset`'s label columns are replaced by the placeholder before its own transform runs (a
    transform that reads them still finds them, but not their values)."""

    def __init__(
        self,
        dataset: Any,
        label_columns: Sequence[str],
        label_column: str,
        placeholder: Any = PLACEHOLDER_LABEL,
        keep: set[str] | None = None,
    ) -> None:
        if isinstance(dataset, datasets.Dataset):
            for name in [c for c in label_columns if c in dataset.column_names]:
                dataset = dataset.remove_columns(name).add_column(name, [PLACEHOLDER_LABEL] * len(dataset))
        self.dataset, self.dropped, self.label_column = dataset, tuple(label_columns), label_column
        self.placeholder = placeholder
        self.keep = keep  # the columns an item keeps (None: all but the labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v for k, v in self.dataset[index].items() if k not in self.dropped}
        if self.keep is not None:
            item = {k: v for k, v in item.items() if k in self.keep}
        item[self.label_column] = self.placeholder
        return item

    def columns(self) -> list[str]:
        """The inputs a pool item carries (the placeholder label left out)."""
        return [name for name in item_keys(self, "unlabeled dataset") if name != self.label_column]


class PoolSample(RedrawnSubset):
    """``size`` samples of the pool, re-drawn by `draw` at each refresh (one object for the run)."""

    def __init__(self, pool: UnlabeledView, size: int) -> None:
        super().__init__(pool, min(size, len(pool)))

    def draw(self, seed: int, step: int) -> torch.Tensor:
        """A random subset of the pool for the refresh at ``step``: the same on every rank and on resume."""
        generator = torch.Generator().manual_seed(refresh_key(seed, step, 0x5E1))
        self.indices = torch.randperm(len(self.source), generator=generator)[: len(self.indices)].sort().values
        return self.indices


def unlabeled_view(
    dataset: Any, labelled: Any, label_columns: Sequence[str], model_columns: set[str] | None = None
) -> UnlabeledView:
    """Check the pool against the labelled training set (non-empty; its items give the model the same inputs:
    among ``model_columns`` when the Trainer drops the others, else all keys) and return its view."""
    if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"unlabeled_dataset must be a map-style dataset (len and [i]), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("unlabeled_dataset is empty; pass a pool with samples, or leave unlabeled_dataset unset")
    labelled_item = labelled[0]
    labelled_keys = keys_of(labelled_item, "labelled training set")
    label_column = next((name for name in label_columns if name in labelled_keys), label_columns[0])
    columns = sorted(k for k in item_keys(dataset, "unlabeled dataset") if k not in label_columns)
    placeholder = _placeholder_like(labelled_item.get(label_column))
    # the pool keeps what the Trainer keeps of the labelled set (model_columns; None: everything)
    view = UnlabeledView(dataset, label_columns, label_column, placeholder, keep=model_columns)
    wanted, got = set(labelled_keys) - set(label_columns), set(columns)
    if model_columns is not None:  # the Trainer drops the others from both sets
        wanted, got = wanted & model_columns, got & model_columns
    if wanted != got:
        missing, extra = sorted(wanted - got), sorted(got - wanted)
        raise ValueError(
            f"the unlabeled dataset's columns {columns} do not give the model the labelled training set's inputs "
            f"{sorted(wanted)}{f' (missing: {missing})' if missing else ''}"
            f"{f' (not in the labelled set: {extra})' if extra else ''}; preprocess both with the same transform so "
            "a batch can hold samples of both"
        )
    return view


def _placeholder_like(label: Any) -> Any:
    """PLACEHOLDER_LABEL in the type of a labelled sample's label (a collator stacks them together)."""
    if isinstance(label, torch.Tensor):
        return torch.full_like(label, PLACEHOLDER_LABEL)
    if isinstance(label, np.ndarray | np.generic):
        return np.full_like(label, PLACEHOLDER_LABEL)
    return PLACEHOLDER_LABEL


def pseudo_labels(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """argmax of the logits, UNCONFIDENT where the top softmax probability is below ``threshold``."""
    labels = logits.argmax(dim=1)
    if threshold is None:
        return labels
    confidence = torch.softmax(logits.float(), dim=1).max(dim=1).values
    return torch.where(confidence >= threshold, labels, torch.full_like(labels, UNCONFIDENT))


def pool_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The pool's estimated class distribution: pseudo-label frequencies among its confident samples."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).double()
    return counts / counts.sum().clamp_min(1.0)


def pool_precision(confusion_counts: torch.Tensor, pseudo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pseudo-class j, the estimated share of the pool's samples labelled j that are of class j, and the pool's
    class prior pi behind it, by black-box shift estimation (Lipton et al., 2018): the pseudo-label shares q are
    R^T pi, with R the validation confusion (rows normalised), so pi solves it (least squares, clipped at 0) and
    precision_j = pi_j R_jj / (R^T pi)_j. The pool's own labels are not needed."""
    counts = torch.as_tensor(confusion_counts, dtype=torch.float64).cpu()
    num_classes = counts.shape[0]
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1.0)  # R[i, j] = P(predicted j | class i)
    shares = pool_distribution(torch.as_tensor(pseudo).cpu(), num_classes)
    prior = (torch.linalg.pinv(rates.T) @ shares).clamp_min(0.0)
    prior = prior / prior.sum() if prior.sum() > 0 else shares
    predicted = rates.T @ prior
    precision = torch.where(predicted > 0, prior * rates.diagonal() / predicted.clamp_min(1e-12), 0.0)
    return precision.clamp(0.0, 1.0), prior


__all__ = ["UNCONFIDENT", "UnlabeledView", "pool_distribution", "pool_precision", "pseudo_labels", "unlabeled_view"]
