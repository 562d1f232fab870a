"""The head read whole under each sharding engine equals the unsharded head, bitwise (FSDP1 / FSDP2: two CPU ranks)."""

from __future__ import annotations

import contextlib
import os
import sys
import types

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from tiny import two_cpu_ranks  # noqa: E402

from selmix_hf.sharding import sharding_engine, whole_head  # noqa: E402

ROWS, FEATURES = 5, 8  # 5 rows over two ranks: an uneven shard


def reference_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, FEATURES), nn.ReLU(), nn.Linear(FEATURES, ROWS))


def test_an_unsharded_head_is_read_as_it_is():
    model = reference_model()
    assert sharding_engine(model[2], model) is None
    with whole_head(model[2], model) as (weight, bias):
        assert weight.data_ptr() == model[2].weight.data_ptr() and not weight.requires_grad
        assert torch.equal(bias, model[2].bias)


def test_deepspeed_zero3_gathers_the_heads_parameters_only_and_writes_nothing_back(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        calls.append(([id(p) for p in params], modifier_rank))
        yield

    fake = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = reference_model()
    for p in model[2].parameters():
        p.ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    assert sharding_engine(model[2], model) == "deepspeed"
    with whole_head(model[2], model) as (weight, bias):
        torch.testing.assert_close(weight, reference_model()[2].weight, rtol=0, atol=0)
    assert calls == [([id(model[2].weight), id(model[2].bias)], None)]  # the head's two tensors, no modifier rank


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_the_head_read_under_fsdp_on_two_ranks_is_the_unsharded_head(engine, tmp_path):
    result = two_cpu_ranks(__file__, engine, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.txt") as fh:
            assert fh.read() == f"{engine} sharded whole-equal"


def _rank_main(engine: str, folder: str) -> None:
    """One rank: shard the reference model with ``engine``, read the head whole, compare bitwise."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model, reference = reference_model(), reference_model()
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        local = model[2].weight.numel()
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[2])
        wrapped = fully_shard(model)
        local = model[2].weight.to_local().numel()
    state = "sharded" if local < ROWS * FEATURES else "whole"  # each rank must hold only part of the head
    assert sharding_engine(model[2], wrapped) == engine
    with whole_head(model[2], wrapped) as (weight, bias):
        equal = torch.equal(weight, reference[2].weight.detach()) and torch.equal(bias, reference[2].bias.detach())
    out = wrapped(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))  # the wrapper still runs
    assert out.shape == (3, ROWS)
    with open(os.path.join(folder, f"rank{dist.get_rank()}.txt"), "w") as fh:
        fh.write(f"{engine} {state} whole-{'equal' if equal else 'differs'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
