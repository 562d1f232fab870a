"""The classification head read whole under the engines that shard parameters (FSDP, FSDP2, DeepSpeed ZeRO-3).

The gain refresh, the cost-sensitive refresh, AutoBalance's hypergradient and the post-training steps read the
head's weight and bias between optimiser steps. Under a sharding engine each rank holds a piece of them; this
module gathers the head, and only the head, through the engine's own mechanism. Every rank must enter the
context together (the gather is a collective).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def sharding_engine(head: nn.Module, model: nn.Module | None = None) -> str | None:
    """Which engine shards the head's parameters: "deepspeed", "fsdp2", "fsdp1", or None (they are whole)."""
    parameters = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):  # DeepSpeed ZeRO-3 marks every partitioned parameter
        return "deepspeed"
    if any(hasattr(p, "full_tensor") and hasattr(p, "placements") for p in parameters):  # a DTensor
        return "fsdp2"
    if model is not None and _fsdp1_unit(head, model) is not None:
        return "fsdp1"
    return None


def _fsdp1_unit(head: nn.Module, model: nn.Module) -> nn.Module | None:
    """The innermost FSDP1 module that holds the head (None when the model has no FSDP1 wrapper)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    owner = None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel) and any(m is head for m in module.modules()):
            owner = module  # modules() goes outside in: the last match is the innermost
    return owner


@contextmanager
def whole_head(head: nn.Module, model: nn.Module | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the linear head as whole tensors, detached, for reading only; a collective under sharding.

    DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` on the head's parameters (nothing written back). FSDP1:
    ``summon_full_params`` on the FSDP unit holding the head (``writeback=False``; the model must be wrapped with
    ``use_orig_params=True`` so the head's own parameters exist). FSDP2: each DTensor's ``full_tensor()``.
    """
    engine = sharding_engine(head, model)
    if engine == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
            yield _weight_and_bias(head, clone=True)
    elif engine == "fsdp2":
        weight = head.weight.full_tensor().detach()
        bias = None if head.bias is None else head.bias.full_tensor().detach()
        yield weight, bias
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(_fsdp1_unit(head, model), writeback=False, recurse=True):
            yield _weight_and_bias(head, clone=True)
    else:
        yield _weight_and_bias(head, clone=False)


def _weight_and_bias(head: nn.Module, clone: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias, detached (cloned when the whole tensors vanish as the gather context ends)."""
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    if clone:
        weight, bias = weight.clone(), None if bias is None else bias.clone()
    return weight, bias


__all__ = ["sharding_engine", "whole_head"]
