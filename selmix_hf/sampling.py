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


class PairBatchSampler:
    """Yields batches of 2B dataset indices: B samples of classes i ~ sum_j P_ij, then partners j ~ P_ij / sum_j P_ij.

    Samples are uniform within a class. Every draw is a function of one uniform stream consumed pair by pair, so
    B pairs in one batch are the same pairs as in B/m batches of m (gradient accumulation). ``set_distribution``
    swaps P in place: the DataLoader and the dataset are never rebuilt.
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
    ) -> None:
        labels_t = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        check_labels(labels_t, num_classes, "training labels")
        if pairs_per_batch < 1:
            raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
        self.num_classes, self.pairs_per_batch = num_classes, pairs_per_batch
        self.class_sizes = torch.bincount(labels_t, minlength=num_classes)
        if int((self.class_sizes > 0).sum()) < 1:
            raise ValueError("the training set is empty")
        self._order = torch.argsort(labels_t, stable=True)  # indices grouped by class
        self._offsets = torch.cumsum(self.class_sizes, 0) - self.class_sizes
        batches = num_batches or max(1, labels_t.numel() // (2 * pairs_per_batch * world_size))
        self.num_batches = -(-batches // accumulation_steps) * accumulation_steps  # whole optimiser steps per epoch
        self.generator = torch.Generator().manual_seed(rank_seed(seed, rank))
        self.batches_drawn = 0
        # batch number -> (generator state, P) just before it was drawn: DataLoader workers draw batches ahead of
        # training, and a checkpoint must hold the position of the batches actually trained on
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_distribution(torch.ones(num_classes, num_classes, dtype=torch.float64))

    def set_distribution(self, probabilities: torch.Tensor) -> None:
        """Use P (K x K, non-negative) from now on; classes with no training sample get no mass."""
        p = torch.as_tensor(probabilities, dtype=torch.float64).detach().cpu().clone()
        if p.shape != (self.num_classes, self.num_classes):
            raise ValueError(
                f"sampling distribution must be {self.num_classes} x {self.num_classes}, got {tuple(p.shape)}"
            )
        if not torch.isfinite(p).all() or (p < 0).any():
            raise ValueError("sampling distribution must be finite and non-negative")
        present = (self.class_sizes > 0).double()
        p = p * present.unsqueeze(1) * present.unsqueeze(0)
        if p.sum() <= 0:
            raise ValueError(
                "the sampling distribution puts no mass on any pair of classes present in the training set"
            )
        self.probabilities = p / p.sum()
        marginal = self.probabilities.sum(1)
        self._first_cdf = torch.cumsum(marginal, 0)
        self._first_cdf[-1] = 1.0
        rows = torch.where(marginal.unsqueeze(1) > 0, self.probabilities, present.unsqueeze(0))
        self._second_cdf = torch.cumsum(rows / rows.sum(1, keepdim=True), 1)
        self._second_cdf[:, -1] = 1.0

    def draw(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset indices of the first and second members of ``pairs`` pairs."""
        u = torch.rand(pairs, 4, generator=self.generator, dtype=torch.float64)
        first_class = torch.searchsorted(self._first_cdf, u[:, 0].contiguous(), right=True).clamp_max(
            self.num_classes - 1
        )
        second_class = torch.searchsorted(self._second_cdf[first_class], u[:, 1:2].contiguous(), right=True).squeeze(1)
        second_class = second_class.clamp_max(self.num_classes - 1)
        return self._member(first_class, u[:, 2]), self._member(second_class, u[:, 3])

    def _member(self, classes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        sizes = self.class_sizes[classes]
        within = torch.minimum((u * sizes).long(), sizes - 1)
        return self._order[self._offsets[classes] + within]

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            self._before[self.batches_drawn] = (self.generator.get_state(), self.probabilities)
            self._before.pop(self.batches_drawn - KEPT_POSITIONS, None)
            first, second = self.draw(self.pairs_per_batch)
            self.batches_drawn += 1
            yield torch.cat([first, second]).tolist()

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self, batches_used: int | None = None) -> dict[str, Any]:
        """The position after ``batches_used`` batches (default: all drawn): batches drawn ahead are given back."""
        if batches_used is None or batches_used == self.batches_drawn:
            generator, probabilities = self.generator.get_state(), self.probabilities
        elif batches_used in self._before:
            generator, probabilities = self._before[batches_used]
        else:
            raise ValueError(
                f"the sampler has drawn {self.batches_drawn} batches and cannot go back to batch {batches_used} "
                f"(it keeps the last {KEPT_POSITIONS} positions); lower dataloader_prefetch_factor"
            )
        return {
            "generator": generator.clone(),
            "probabilities": probabilities.clone(),
            "batches_drawn": batches_used if batches_used is not None else self.batches_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.set_distribution(state["probabilities"])
        self.batches_drawn = int(state["batches_drawn"])
