"""The objective-driven pair sampler: batches of (i, j) pairs drawn from the sampling distribution P."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import check_labels

KEPT_POSITIONS = 256  # positions a sampler can go back to: more than DataLoader workers draw ahead


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from one run seed, so ranks draw different but reproducible streams."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ClassMembers:
    """Dataset indices grouped by class (label -1: never drawn), with ``offset`` added to every index."""

    def __init__(self, labels: torch.Tensor, num_classes: int, offset: int = 0) -> None:
        drawable = torch.nonzero(labels >= 0).flatten()
        kept = labels[drawable]
        self.sizes = torch.bincount(kept, minlength=num_classes)
        self.indices = drawable[torch.argsort(kept, stable=True)] + offset  # grouped by class
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.present = (self.sizes > 0).double()

    def pick(self, classes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One member of each given class, the ``u``-quantile of its members (uniform within the class)."""
        sizes = self.sizes[classes]
        within = torch.minimum((u * sizes).long(), sizes - 1)
        return self.indices[self.offsets[classes] + within]


class PairBatchSampler:
    """Yields batches of 2B dataset indices: B samples of classes i ~ sum_j P_ij, then partners j ~ P_ij / sum_j P_ij
    (with pool anchors, each first member as ``(index, class drawn as)``).

    Samples are uniform within a class. Every draw is a function of one uniform stream consumed pair by pair, so
    B pairs in one batch are the same pairs as in B/m batches of m (gradient accumulation). ``set_distribution``
    swaps P in place: the DataLoader and the dataset are never rebuilt.

    Semi-supervised SelMix adds a pool of ``pool_size`` unlabelled samples, indexed after the labelled ones
    (``len(labels) + k``) and grouped by the pseudo-labels `set_pool` gives: a pair's partner class j is drawn from
    P(j | i) over the classes either source has, and the partner comes from the pool with probability
    ``pool_fraction`` (one number, 1: always, as published; or one per class, which `set_pool` may update), from the
    labelled set otherwise (always the source that has class j when only one does). With ``pool_anchors`` the first
    members are drawn from the labelled samples and the pool's confident ones together.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        num_classes: int,
        pairs_per_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
        accumulation_steps: int = 1,
        pool_size: int = 0,
        pool_fraction: float | Sequence[float] | torch.Tensor = 0.0,
        pool_anchors: bool = False,
    ) -> None:
        labels_t = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        check_labels(labels_t[labels_t != -1], num_classes, "training labels")  # -1: never drawn
        if pairs_per_batch < 1:
            raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
        fraction = self._fractions(pool_fraction, num_classes)
        if pool_size == 0 and (bool((fraction > 0).any()) or pool_anchors):
            raise ValueError(f"pool_fraction={pool_fraction} / pool_anchors={pool_anchors} need a pool of samples")
        self.num_classes, self.pairs_per_batch = num_classes, pairs_per_batch
        self.labelled = ClassMembers(labels_t, num_classes)
        self.class_sizes = self.labelled.sizes
        if int((self.class_sizes > 0).sum()) < 1:
            raise ValueError("the training set is empty")
        self.pool_size, self.pool_fraction, self.pool_anchors = pool_size, fraction, pool_anchors
        self._labelled_labels = labels_t
        self.pool_labels: torch.Tensor | None = None
        self.anchors, self.pool = self.labelled, None
        self.first_classes = torch.zeros(0, dtype=torch.long)
        batches = num_batches or max(1, labels_t.numel() // (2 * pairs_per_batch * world_size))
        self.num_batches = -(-batches // accumulation_steps) * accumulation_steps  # whole optimiser steps per epoch
        self.generator = torch.Generator().manual_seed(rank_seed(seed, rank))
        self.batches_drawn = 0
        # batch number -> (generator state, P, pool labels) just before it was drawn: DataLoader workers draw batches
        # ahead of training, and a checkpoint must hold the position of the batches actually trained on
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.set_distribution(torch.ones(num_classes, num_classes, dtype=torch.float64))

    @staticmethod
    def _fractions(pool_fraction: float | Sequence[float] | torch.Tensor, num_classes: int) -> torch.Tensor:
        """The pool's share of partners per class (K, float64), checked to lie in [0, 1]."""
        fraction = torch.as_tensor(pool_fraction, dtype=torch.float64).detach().cpu().clone()
        fraction = fraction.expand(num_classes).clone() if fraction.dim() == 0 else fraction
        if fraction.shape != (num_classes,) or not torch.isfinite(fraction).all():
            raise ValueError(f"pool_fraction must be one number or {num_classes} finite ones, got {pool_fraction}")
        if (fraction < 0).any() or (fraction > 1).any():
            raise ValueError(f"pool_fraction must lie in [0, 1], got {pool_fraction}")
        return fraction

    def set_pool(
        self, pseudo_labels: torch.Tensor, fraction: float | Sequence[float] | torch.Tensor | None = None
    ) -> None:
        """Group the pool by these pseudo-labels (-1: not drawn) from now on, with the pool's share of partners per
        class ``fraction`` if given (else kept); P is kept."""
        if fraction is not None:
            self.pool_fraction = self._fractions(fraction, self.num_classes)
        pseudo = torch.as_tensor(pseudo_labels).long().reshape(-1).cpu()
        if pseudo.numel() != self.pool_size:
            raise ValueError(f"{pseudo.numel()} pseudo-labels for a pool of {self.pool_size} samples")
        if (pseudo >= self.num_classes).any() or (pseudo < -1).any():
            raise ValueError(f"pseudo-labels must lie in [-1, {self.num_classes})")
        if bool((self.pool_fraction > 0).any()) and not (pseudo >= 0).any():
            raise ValueError(
                "no unlabelled sample has a pseudo-label (none passed pseudo_label_threshold); lower the threshold"
            )
        self.pool_labels = pseudo
        offset = self._labelled_labels.numel()
        self.pool = ClassMembers(pseudo, self.num_classes, offset)
        if self.pool_anchors:
            self.anchors = ClassMembers(torch.cat([self._labelled_labels, pseudo]), self.num_classes)
        self.set_distribution(self.raw_probabilities)

    def set_distribution(self, probabilities: torch.Tensor) -> None:
        """Use P (K x K, non-negative) from now on; classes with no sample to draw get no mass."""
        p = torch.as_tensor(probabilities, dtype=torch.float64).detach().cpu().clone()
        if p.shape != (self.num_classes, self.num_classes):
            raise ValueError(
                f"sampling distribution must be {self.num_classes} x {self.num_classes}, got {tuple(p.shape)}"
            )
        if not torch.isfinite(p).all() or (p < 0).any():
            raise ValueError("sampling distribution must be finite and non-negative")
        self.raw_probabilities = p
        self._pool_share, partners = self._partner_shares()
        p = p * self.anchors.present.unsqueeze(1) * partners.double().unsqueeze(0)
        if p.sum() <= 0:
            raise ValueError(
                "the sampling distribution puts no mass on any pair of classes present in the training set"
            )
        self.probabilities = p / p.sum()
        marginal = self.probabilities.sum(1)
        self._first_cdf = torch.cumsum(marginal, 0)
        self._first_cdf[-1] = 1.0
        # rows with no mass on the partners' classes: uniform over those classes
        rows = torch.where(self.probabilities.sum(1, keepdim=True) > 0, self.probabilities, partners.double())
        self._second_cdf = torch.cumsum(rows / rows.sum(1, keepdim=True), 1)
        self._second_cdf[:, -1] = 1.0

    def _partner_shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class j: the probability that a partner comes from the pool (``pool_fraction`` where both sources may
        give class j, else whichever may) and whether either may (before `set_pool`: the labelled set alone)."""
        labelled = self.labelled.present > 0
        if self.pool is None:
            return torch.zeros(self.num_classes, dtype=torch.float64), labelled
        pool = (self.pool_fraction > 0) & (self.pool.present > 0)
        labelled = labelled & (self.pool_fraction < 1)
        return torch.where(pool & labelled, self.pool_fraction, pool.double()), pool | labelled

    def draw(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset indices of the first and second members of ``pairs`` pairs (the first members' classes are kept
        in ``first_classes``)."""
        if bool((self.pool_fraction > 0).any()) and self.pool is None:
            raise RuntimeError("the sampler draws partners from the unlabelled pool before set_pool was called")
        share = self._pool_share
        mixed = bool(((share > 0) & (share < 1)).any())  # a fifth uniform chooses the source only when one is mixed
        u = torch.rand(pairs, 5 if mixed else 4, generator=self.generator, dtype=torch.float64)
        first_class = torch.searchsorted(self._first_cdf, u[:, 0].contiguous(), right=True).clamp_max(
            self.num_classes - 1
        )
        first = self.anchors.pick(first_class, u[:, 2])
        self.first_classes = first_class
        second_class = torch.searchsorted(self._second_cdf[first_class], u[:, 1:2].contiguous(), right=True)
        second_class = second_class.squeeze(1).clamp_max(self.num_classes - 1)
        from_pool = u[:, 4] < share[second_class] if mixed else share[second_class] >= 1
        second = torch.empty_like(first)
        for members, rows in ((self.pool, from_pool), (self.labelled, ~from_pool)):
            rows = torch.nonzero(rows).flatten()
            if rows.numel():
                second[rows] = members.pick(second_class[rows], u[rows, 3])
        return first, second

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            self._before[self.batches_drawn] = (
                self.generator.get_state(),
                self.raw_probabilities,
                self.pool_labels,
                self.pool_fraction,
            )
            self._before.pop(self.batches_drawn - KEPT_POSITIONS, None)
            first, second = self.draw(self.pairs_per_batch)
            self.batches_drawn += 1
            if self.pool_anchors:  # a pool anchor's label is the pseudo-class it was drawn as: it travels with it
                yield [*zip(first.tolist(), self.first_classes.tolist()), *second.tolist()]
            else:
                yield torch.cat([first, second]).tolist()

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self, batches_used: int | None = None) -> dict[str, Any]:
        """The position after ``batches_used`` batches (default: all drawn): batches drawn ahead are given back."""
        if batches_used is None or batches_used == self.batches_drawn:
            generator, probabilities = self.generator.get_state(), self.raw_probabilities
            pool, fraction = self.pool_labels, self.pool_fraction
        elif batches_used in self._before:
            generator, probabilities, pool, fraction = self._before[batches_used]
        else:
            raise ValueError(
                f"the sampler has drawn {self.batches_drawn} batches and cannot go back to batch {batches_used} "
                f"(it keeps the last {KEPT_POSITIONS} positions); lower dataloader_prefetch_factor"
            )
        state = {
            "generator": generator.clone(),
            "probabilities": probabilities.clone(),
            "batches_drawn": batches_used if batches_used is not None else self.batches_drawn,
        }
        if pool is not None:
            state["pool_labels"] = pool.clone()
            state["pool_fraction"] = fraction.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "pool_labels" in state:
            self.set_pool(state["pool_labels"], state.get("pool_fraction"))
        self.set_distribution(state["probabilities"])
        self.batches_drawn = int(state["batches_drawn"])


class SampleStream:
    """Random samples of a dataset, drawn with replacement one at a time, each with two seeds (its weak and strong
    views): B draws are the same samples as B/m draws of m, so accumulation and resume see the same stream."""

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0) -> None:
        if size < 1:
            raise ValueError("the dataset to draw from is empty")
        self.size = size
        self.generator = torch.Generator().manual_seed(rank_seed(seed, rank) ^ 0x5A3)
        self.drawn = 0

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` dataset indices, and their (count, 2) view seeds."""
        u = torch.rand(count, 3, generator=self.generator, dtype=torch.float64)
        self.drawn += count
        indices = torch.minimum((u[:, 0] * self.size).long(), torch.tensor(self.size - 1))
        return indices, (u[:, 1:] * 2.0**53).long()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])
