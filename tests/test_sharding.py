"""The head under each sharding engine: read whole it equals the unsharded head bitwise, the feature hook captures and
mixes through the wrapper, a training step and a bias edit land as without sharding (FSDP1 / FSDP2: two CPU ranks)."""

from __future__ import annotations

import contextlib
import os
import sys
import types

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from tiny import run_rank, two_cpu_ranks  # noqa: E402

from selmix_hf.features import PooledFeatures  # noqa: E402
from selmix_hf.sharding import add_to_head_bias, sharding_engine, whole_head  # noqa: E402

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


def test_deepspeed_zero3_edits_the_bias_through_a_gather_whose_rank_0_writes_back(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        calls.append(([id(p) for p in params], modifier_rank))
        yield

    monkeypatch.setitem(
        sys.modules, "deepspeed", types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered))
    )
    model = reference_model()
    for p in model[2].parameters():
        p.ds_id = 0
    add_to_head_bias(model[2], model, torch.arange(ROWS, dtype=torch.float32))
    torch.testing.assert_close(model[2].bias, reference_model()[2].bias + torch.arange(ROWS), rtol=0, atol=0)
    assert calls == [([id(model[2].bias)], 0)]  # the bias only; rank 0's edit is the one partitioned back


def test_a_head_without_bias_cannot_take_offsets():
    head = nn.Linear(FEATURES, ROWS, bias=False)
    with pytest.raises(ValueError, match="no bias to fold the offsets into"):
        add_to_head_bias(head, head, torch.zeros(ROWS))


ENGINES = ["fsdp1", "fsdp1-head-unit", "fsdp2"]  # fsdp1-head-unit: the head auto-wrapped as its own FSDP unit


@pytest.mark.parametrize("engine", ENGINES)
def test_the_head_under_fsdp_on_two_ranks_reads_hooks_steps_and_edits_as_unsharded(engine, tmp_path):
    result = two_cpu_ranks(__file__, engine, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.txt") as fh:
            assert fh.read() == f"{engine} failed: []"


def _shard(model: nn.Sequential, engine: str) -> tuple[nn.Module, int]:
    """The model wrapped by ``engine``, and how many head weights this rank holds."""
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({nn.Linear}) if engine == "fsdp1-head-unit" else None
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=policy
        )
        return wrapped, model[2].weight.numel()
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[2])
    return fully_shard(model), model[2].weight.to_local().numel()


def _mixed_step(model: nn.Module, pooled: PooledFeatures, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SelMix's step in miniature: capture the features, then one SGD step on the logits of mixed pairs."""
    with torch.no_grad(), pooled.capture():
        model(x)
    lam = torch.tensor([0.9, 0.7, 0.6])
    with pooled.mixing(lam):
        logits = model(x)
    nn.functional.cross_entropy(logits, labels).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return logits.detach()


def _rank_main(engine: str, folder: str) -> None:
    """One rank: shard the reference model with ``engine``; check the read, the hook, a step and a bias edit."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model, reference = reference_model(), reference_model()
    pooled, reference_pooled = PooledFeatures(model[2]), PooledFeatures(reference[2])  # hooked before wrapping
    wrapped, local = _shard(model, engine)
    checks = {"sharded": local < ROWS * FEATURES}  # each rank must hold only part of the head
    checks["engine"] = sharding_engine(model[2], wrapped) == engine.split("-")[0]
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))  # the same batch on both ranks
    with torch.no_grad():
        wrapped(x)  # the trainers read the head after a validation pass (FSDP1 initialises at the first forward)
    with whole_head(model[2], wrapped) as (weight, bias):
        checks["read"] = torch.equal(weight, reference[2].weight.detach()) and torch.equal(bias, reference[2].bias)

    labels = torch.tensor([0, 3, 4])
    logits = _mixed_step(wrapped, pooled, x, labels)
    expected = _mixed_step(reference, reference_pooled, x, labels)
    checks["captured"] = torch.equal(pooled.captured, reference_pooled.captured)
    checks["mixed"] = torch.equal(logits, expected)
    with whole_head(model[2], wrapped) as (weight, bias):  # the averaged gradient of equal batches = the gradient
        checks["stepped"] = torch.allclose(weight, reference[2].weight, rtol=1e-6, atol=0) and torch.allclose(
            bias, reference[2].bias, rtol=1e-6, atol=0
        )
    offsets = torch.linspace(-1.0, 1.0, ROWS)
    add_to_head_bias(model[2], wrapped, offsets)
    with whole_head(model[2], wrapped) as (_, bias):
        checks["bias edited"] = torch.allclose(bias, reference[2].bias.detach() + offsets, rtol=1e-6, atol=0)
    with torch.no_grad():
        reference[2].bias.add_(offsets)
        checks["runs after"] = torch.allclose(wrapped(x), reference(x), rtol=1e-5, atol=1e-6)
    failed = [name for name, ok in checks.items() if not ok]
    with open(os.path.join(folder, f"rank{dist.get_rank()}.txt"), "w") as fh:
        fh.write(f"{engine} failed: {failed}")


if __name__ == "__main__":
    run_rank(_rank_main, sys.argv[1], sys.argv[2])
