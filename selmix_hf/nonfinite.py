"""NaN / inf detection that stops a run with an error naming the split, the step and the sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """A NaN or inf reached the inputs, features, logits, loss or learned state of a run; nothing was saved after it."""


def row_is_finite(tensor: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether every value of each row (first dimension) is finite."""
    if not tensor.dtype.is_floating_point:
        return torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    return torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)


def inputs_finite(batch: Mapping[str, Any], rows: int) -> torch.Tensor:
    """(rows,) bool: whether each sample's floating-point inputs are all finite."""
    ok = None
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.ndim and value.shape[0] == rows:
            row_ok = row_is_finite(value)
            ok = row_ok if ok is None else ok & row_ok
    return torch.ones(rows, dtype=torch.bool) if ok is None else ok


def bad_input_rows(batch: Mapping[str, Any]) -> dict[str, list[int]]:
    """Input name -> rows holding NaN or inf, for the floating-point tensors of a batch."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.ndim:
            bad = torch.nonzero(~row_is_finite(value)).flatten().tolist()
            if bad:
                out[name] = bad
    return out


def first_bad(ok: torch.Tensor) -> int | None:
    """Index of the first False in a bool vector, or None."""
    bad = torch.nonzero(~ok.bool()).flatten()
    return None if bad.numel() == 0 else int(bad[0])


def describe_rows(rows: Sequence[int], dataset_indices: Sequence[int] | None) -> str:
    """'batch rows [1, 3] (dataset indices [17, 40])', or only the rows when the indices are unknown."""
    text = f"batch row{'s' if len(rows) > 1 else ''} {list(rows)[:10]}"
    if dataset_indices is not None:
        text += f" (dataset index {[int(dataset_indices[r]) for r in rows][:10]})"
    return text


def check_state_finite(state: Mapping[str, Any], what: str, prefix: str = "") -> None:
    """Raise NonFiniteError naming the first floating tensor of a (nested) state that holds NaN or inf."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise NonFiniteError(f"{what}: {name} holds NaN or inf")
        if isinstance(value, Mapping):
            check_state_finite(value, what, f"{name}.")


__all__ = ["NonFiniteError", "bad_input_rows", "check_state_finite", "describe_rows", "first_bad", "inputs_finite"]
