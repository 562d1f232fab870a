"""The validation set of a run: its choice, its every-class check, and the gathered pass over it."""

from __future__ import annotations

from collections.abc import Sized
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from . import _compat
from .features import PooledFeatures, logits_of
from .nonfinite import NonFiniteError, first_bad, inputs_finite, row_is_finite
from .sharding import model_to_call


class RedrawnSubset(torch.utils.data.Dataset):
    """A fixed number of a dataset's samples, re-chosen at each refresh: one object for the whole run, because the
    validation pass caches its loader per dataset object (and the fixed length keeps the loader's shards)."""

    def __init__(self, source: Any, size: int) -> None:
        self.source, self.indices = source, torch.arange(size)

    def source_index(self, position: int) -> int:
        """The index in the whole dataset of the subset's ``position``-th sample (what errors name)."""
        return int(self.indices[position])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Any:
        return self.source[self.source_index(position)]

    def __getitems__(self, positions: list[int]) -> list[Any]:
        """A batch at once, through the source's own batched read when it has one (a `datasets.Dataset` does)."""
        rows = [self.source_index(p) for p in positions]
        batched = getattr(self.source, "__getitems__", None)
        return list(batched(rows)) if batched is not None else [self.source[r] for r in rows]


def refresh_key(seed: int, step: int, stream: int) -> int:
    """The seed of a refresh's random subset: the same on every rank and on resume, distinct per stream."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


class StratifiedSample(RedrawnSubset):
    """At most ``per_stratum`` samples of each stratum (class, or (class, group) cell) of a validation set, redrawn
    at random at each refresh: a refresh then passes over ~K x per_stratum samples instead of the whole set, and
    every class (cell) keeps at least one sample."""

    def __init__(self, source: Any, strata: np.ndarray, per_stratum: int) -> None:
        self.members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
        self.per_stratum = per_stratum
        super().__init__(source, sum(min(per_stratum, len(m)) for m in self.members))

    def draw(self, seed: int, step: int) -> torch.Tensor:
        """The subset of the refresh at ``step`` (sorted indices into the whole set)."""
        generator = torch.Generator().manual_seed(refresh_key(seed, step, 0x7A1))
        chosen = [m[torch.randperm(len(m), generator=generator)[: self.per_stratum].numpy()] for m in self.members]
        self.indices = torch.from_numpy(np.sort(np.concatenate(chosen)))
        return self.indices


def pick_validation_set(validation_dataset: Any, eval_dataset: Any, purpose: str) -> Any:
    """The labelled validation set a trainer estimates on (validation_dataset, else eval_dataset), checked."""
    dataset = validation_dataset if validation_dataset is not None else eval_dataset
    if dataset is None:
        raise ValueError(f"{purpose} needs a labelled validation set: pass validation_dataset= or eval_dataset=")
    if isinstance(dataset, dict):
        raise ValueError("eval_dataset is a dict of datasets; pass the one to estimate on as validation_dataset=")
    if not isinstance(dataset, Sized) or len(dataset) == 0:
        raise ValueError(f"the validation set is empty; {purpose} needs every class in it")
    return dataset


def counts_with_every_class(labels: np.ndarray, num_labels: int, what: str) -> list[int]:
    """Samples per class of checked labels, after checking every class has one (its recall, its prototype)."""
    counts = np.bincount(labels, minlength=num_labels)
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise ValueError(
            f"classes {missing[:20]} have no sample in the {what} set; every class is needed there (its recall, "
            "its prototype). Build the split with selmix_hf.data.balanced_split."
        )
    return counts.tolist()


def gathered_validation_pass(
    trainer: Any,
    dataset: Any,
    pooled: PooledFeatures | None = None,
    *,
    purpose: str = "validation pass",
    labelled: bool = True,
    with_groups: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """(pooled features or None, logits, labels) of a whole dataset in eval mode, gathered across processes; with
    ``with_groups``, the samples' group ids (``trainer.group_column``) as a fourth tensor.

    `gather_for_metrics` inside the loop drops the duplicates that pad the last round, so every rank ends with
    the same tensors and every sample counted once, in dataset order. A NaN or inf in a sample's inputs, features
    or logits stops the run on every rank alike, naming the sample's index in the set. An unlabelled pool
    (``labelled=False``) carries a placeholder in the label column, which is dropped unread.
    """
    cache = trainer.__dict__.setdefault("_validation_loaders", {})
    if id(dataset) not in cache:
        cache[id(dataset)] = _compat.validation_dataloader(trainer, dataset)
    loader = cache[id(dataset)]
    model = model_to_call(trainer.model)  # FSDP1's wrapper stays: its forward gathers the parameters
    label_key = getattr(trainer, "label_key", "labels")
    group_key = getattr(trainer, "group_column", None)
    was_training = model.training
    model.eval()
    features, logits, labels, finite_inputs, groups, input_names = [], [], [], [], [], set()
    capture = pooled.capture() if pooled is not None else nullcontext()
    try:
        with torch.no_grad(), capture:
            for batch in loader:
                batch = _compat.prepare_inputs(trainer, batch)
                batch_labels = batch.pop(label_key)
                batch_groups = batch.pop(group_key) if group_key and group_key in batch else None
                if with_groups and batch_groups is None:
                    raise KeyError(f"the {purpose} batch has no {group_key!r} entry (group_column)")
                input_names.update(k for k, v in batch.items() if torch.is_tensor(v) and v.dtype.is_floating_point)
                inputs_ok = inputs_finite(batch, len(batch_labels)).to(batch_labels.device)
                with trainer.compute_loss_context_manager():
                    batch_logits = logits_of(model(**batch))
                batch_features = (
                    pooled.captured.float() if pooled is not None else batch_logits.new_zeros(len(batch_labels), 0)
                )
                rows = (batch_features, batch_logits.float(), batch_labels, inputs_ok)
                gathered = trainer.accelerator.gather_for_metrics(rows + ((batch_groups,) if with_groups else ()))
                for store, tensor in zip((features, logits, labels, finite_inputs, groups), gathered):
                    store.append(tensor)
    finally:
        model.train(was_training)
    features_t, logits_t, labels_t = torch.cat(features), torch.cat(logits), torch.cat(labels).long()
    where = f"the {purpose} at step {trainer.state.global_step}"
    for what, ok in (
        (f"inputs ({', '.join(sorted(input_names)) or 'none floating'})", torch.cat(finite_inputs)),
        ("pooled features", row_is_finite(features_t)),
        ("logits", row_is_finite(logits_t)),
    ):
        position = first_bad(ok)
        if position is not None:
            index = dataset.source_index(position) if isinstance(dataset, RedrawnSubset) else position
            count = int((~ok.bool()).sum())
            name, label = ("validation", f"label {int(labels_t[position])}") if labelled else ("unlabeled", "no label")
            raise NonFiniteError(
                f"NaN or inf in the {what} of {name} sample {index} ({label}"
                f"{f', and {count - 1} more samples' if count > 1 else ''}) during {where}: fix or drop that sample "
                f"of the {name} set. Nothing was saved after the last checkpoint."
            )
    out = (features_t if pooled is not None else None), logits_t, labels_t
    return (*out, torch.cat(groups).long()) if with_groups else out


__all__ = [
    "RedrawnSubset",
    "StratifiedSample",
    "counts_with_every_class",
    "gathered_validation_pass",
    "pick_validation_set",
    "refresh_key",
]
