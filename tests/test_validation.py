"""The refreshes' validation sample: stratified, redrawn per step, the same for the same (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selmix_hf.validation import StratifiedSample

STRATA = np.array([0] * 6 + [1] * 5 + [2] * 2 + [0])  # stratum 0 also at the end: members need not be contiguous


class Items(torch.utils.data.Dataset):
    """Item i is {"i": i}; with ``batched``, also a `__getitems__` that records the batches it served."""

    def __init__(self, n: int, batched: bool) -> None:
        self.n, self.batches = n, []
        if batched:
            self.__getitems__ = lambda rows: self.batches.append(list(rows)) or [{"i": r} for r in rows]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"i": i}


def test_a_stratified_sample_keeps_n_per_stratum_every_stratum_and_redraws_per_step():
    sample = StratifiedSample(Items(len(STRATA), batched=False), STRATA, per_stratum=3)
    assert len(sample) == 3 + 3 + 2  # a stratum smaller than n is taken whole
    draws = {}
    for seed, step in [(0, 0), (0, 2), (1, 0), (0, 0)]:
        chosen = sample.draw(seed, step).numpy()
        assert np.array_equal(chosen, np.unique(chosen)) and len(chosen) == len(sample)
        assert np.bincount(STRATA[chosen]).tolist() == [3, 3, 2]
        draws.setdefault((seed, step), []).append(chosen.tolist())
    assert draws[(0, 0)][0] == draws[(0, 0)][1]  # the same refresh on another rank, or after a resume
    assert draws[(0, 0)][0] != draws[(0, 2)][0] and draws[(0, 0)][0] != draws[(1, 0)][0]
    assert sorted({i for d in (draws[(0, 0)][0], draws[(0, 2)][0]) for i in d}) != draws[(0, 0)][0]


@pytest.mark.parametrize("batched", [False, True])
def test_a_sample_reads_its_members_one_by_one_or_through_the_sources_batched_read(batched):
    source = Items(len(STRATA), batched=batched)
    sample = StratifiedSample(source, STRATA, per_stratum=2)
    chosen = sample.draw(0, 5).tolist()
    assert [sample[p]["i"] for p in range(len(sample))] == chosen
    assert [item["i"] for item in sample.__getitems__([0, 2])] == [chosen[0], chosen[2]]
    assert [sample.source_index(p) for p in (0, 2)] == [chosen[0], chosen[2]]
    assert source.batches == ([[chosen[0], chosen[2]]] if batched else [])
