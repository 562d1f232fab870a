"""The classification head read (and its bias edited) whole under the engines that shard parameters.

The gain refresh, AutoBalance's hypergradient and the post-training steps read the head's weight and bias between
optimiser steps, and the post-hoc rule adds offsets to its bias. Under FSDP, FSDP2 or DeepSpeed ZeRO-3 each rank
holds a piece of them; this module gathers the head, and only the head, through the engine's own mechanism.
Every rank must call together (the gather is a collective).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def sharding_engine(head: nn.Module, model: nn.Module | None = None) -> str | None:
    """Which engine shards the head's parameters: "deepspeed", "fsdp2", "fsdp1", or None (they are whole)."""
    parameters = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):  # DeepSpeed ZeRO-3 marks every partitioned parameter
        return "deepspeed"
    if any(isinstance(p, DTensor) for p in parameters) or _fsdp_owner(head, model or head, "fsdp2") is not None:
        return "fsdp2"  # between a forward and the reshard FSDP2's parameters are plain, whole tensors
    if model is not None and _fsdp_owner(head, model, "fsdp1") is not None:
        return "fsdp1"
    return None


def _fsdp_owner(head: nn.Module, model: nn.Module, engine: str) -> nn.Module | None:
    """The innermost FSDP1 unit / FSDP2 module that holds the head (None when the model has none)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    kind = FSDPModule if engine == "fsdp2" else FullyShardedDataParallel
    owner = None
    for module in model.modules():
        if isinstance(module, kind) and any(m is head for m in module.modules()):
            owner = module  # modules() goes outside in: the last match is the innermost
    return owner


def _resharded_fsdp2_head(head: nn.Module, model: nn.Module | None) -> None:
    """Put the head's FSDP2 module back in its sharded state (after a forward the root keeps its parameters
    gathered, as plain tensors that the next reshard discards): its parameters are the DTensor shards again."""
    owner = _fsdp_owner(head, model or head, "fsdp2")
    if owner is not None:
        owner.reshard()


@contextmanager
def whole_head(head: nn.Module, model: nn.Module | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the linear head as whole tensors, detached, for reading only; a collective under sharding.

    DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` on the head's parameters (nothing written back). FSDP1:
    ``summon_full_params`` on the FSDP unit holding the head, not its nested units (``writeback=False``); when that
    unit is not the root, the root must have run a forward first (FSDP1 initialises lazily; the trainers always
    read after a validation pass). FSDP2: each DTensor's ``full_tensor()``.
    """
    engine = sharding_engine(head, model)
    if engine == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
            yield _weight_and_bias(head, clone=True)
    elif engine == "fsdp2":
        _resharded_fsdp2_head(head, model)
        weight = head.weight.full_tensor().detach()
        bias = None if head.bias is None else head.bias.full_tensor().detach()
        yield weight, bias
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(
            _fsdp_owner(head, model, "fsdp1"), writeback=False, recurse=False
        ):
            yield _weight_and_bias(head, clone=True)
    else:
        yield _weight_and_bias(head, clone=False)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def model_to_call(model: nn.Module) -> nn.Module:
    """The module a forward outside the training step calls (validation passes, hyper-batches).

    The model inside DDP and accelerate wrappers (a validation pass needs none of DDP's synchronisation), except an
    FSDP1 wrapper, which stays: its forward gathers the parameters of the modules it does not wrap further.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    while not isinstance(model, FullyShardedDataParallel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def add_to_head_bias(head: nn.Module, model: nn.Module | None, values: torch.Tensor) -> None:
    """Add ``values`` (K,) to the head's bias, through the engine when it is sharded; every rank passes the same values.

    DeepSpeed ZeRO-3: ``GatheredParameters(modifier_rank=0)`` re-partitions rank 0's edit into the module's weights,
    which evaluation and the saved model use; DeepSpeed's fp32 master copy is not edited, so a later optimiser step
    would undo it (the post-hoc rule, the one caller, comes after training). FSDP1: ``summon_full_params`` with
    ``writeback=True``. FSDP2: the values laid out as the bias DTensor (each rank keeps its own slice) and added.
    """
    if head.bias is None:
        raise ValueError("the classifier head has no bias to fold the offsets into; apply DecisionRule.predict instead")
    engine = sharding_engine(head, model)
    if engine == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters([head.bias], modifier_rank=0):
            _add_in_place(head.bias, values)
    elif engine == "fsdp2":
        from torch.distributed.tensor import distribute_tensor

        _resharded_fsdp2_head(head, model)  # an edit of the gathered copy would be lost at the next reshard
        bias = head.bias
        full = torch.as_tensor(values, dtype=bias.dtype).to(bias.to_local().device)
        with torch.no_grad():  # src_data_rank=None: every rank cuts its own slice from its (equal) values
            bias.add_(distribute_tensor(full, bias.device_mesh, bias.placements, src_data_rank=None))
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(
            _fsdp_owner(head, model, "fsdp1"), writeback=True, recurse=False
        ):
            _add_in_place(head.bias, values)
    else:
        _add_in_place(head.bias, values)


def _add_in_place(parameter: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.add_(torch.as_tensor(values, dtype=parameter.dtype, device=parameter.device))


def _weight_and_bias(head: nn.Module, clone: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias, detached (cloned when the whole tensors vanish as the gather context ends)."""
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    if clone:
        weight, bias = weight.clone(), None if bias is None else bias.clone()
    return weight, bias


__all__ = ["add_to_head_bias", "local_part", "model_to_call", "sharding_engine", "whole_head"]
