"""A trainer's own checkpoint state as safetensors (tensors) plus JSON (everything else): loading runs no code.

The state is a tree of dicts, lists, tuples, tensors and JSON scalars (optimizer and generator states included).
Tensors go to ``<stem>.safetensors`` under a number; the tree itself, with each tensor replaced by a reference to
its number, goes to ``<stem>.json``. Both files are written to temporary names and renamed, the JSON last, so a
crash never leaves a state that looks complete but is not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"  # markers of the JSON tree
FORMAT = "selmix-hf-state/1"


def encode(state: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """The JSON tree of ``state``, its tensors moved into ``tensors`` under their path."""
    if isinstance(state, torch.Tensor):
        key = f"t{len(tensors)}"  # numbered, not named by path: dotted dict keys could make two paths collide
        tensors[key] = state.detach().cpu().clone().contiguous()
        return {TENSOR: key}
    if isinstance(state, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in state):
            return {key: encode(value, tensors, f"{path}.{key}") for key, value in state.items()}
        return {
            ITEMS: [
                [encode(key, tensors, f"{path}.key{i}"), encode(value, tensors, f"{path}.{i}")]
                for i, (key, value) in enumerate(state.items())
            ]
        }
    if isinstance(state, tuple):
        return {TUPLE: [encode(value, tensors, f"{path}.{i}") for i, value in enumerate(state)]}
    if isinstance(state, list):
        return [encode(value, tensors, f"{path}.{i}") for i, value in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(
        f"cannot store a {type(state).__name__} at {path} in a checkpoint state (tensors, dicts, lists, "
        "tuples and JSON scalars only)"
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state back from its JSON tree and tensors (the inverse of `encode`)."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors[tree[TENSOR]]
        if set(tree) == {TUPLE}:
            return tuple(decode(value, tensors) for value in tree[TUPLE])
        if set(tree) == {ITEMS}:
            return {_hashable(decode(key, tensors)): decode(value, tensors) for key, value in tree[ITEMS]}
        return {key: decode(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [decode(value, tensors) for value in tree]
    return tree


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(state: dict[str, Any], folder: str, stem: str) -> None:
    """Write ``state`` as ``<folder>/<stem>.safetensors`` + ``<stem>.json``, atomically (JSON renamed last)."""
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": FORMAT, "state": encode(state, tensors)}
    base = os.path.join(folder, stem)
    suffix = f".tmp{os.getpid()}"
    save_file(tensors, base + ".safetensors" + suffix, metadata={"format": FORMAT})
    with open(base + ".json" + suffix, "w") as fh:
        json.dump(tree, fh)
    os.replace(base + ".safetensors" + suffix, base + ".safetensors")
    os.replace(base + ".json" + suffix, base + ".json")


def state_exists(folder: str, stem: str) -> bool:
    """Whether a complete state (its JSON, written last) is in the folder."""
    return os.path.exists(os.path.join(folder, stem + ".json"))


def load_state(folder: str, stem: str) -> dict[str, Any]:
    """Read a state written by `save_state`; an older pickled ``<stem>.pt`` is read only with ``weights_only=True``."""
    base = os.path.join(folder, stem)
    if os.path.exists(base + ".json"):
        with open(base + ".json") as fh:
            tree = json.load(fh)
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            raise ValueError(f"{base}.json is not a selmix-hf trainer state ({FORMAT}); it cannot be resumed from")
        tensors = load_file(base + ".safetensors") if os.path.exists(base + ".safetensors") else {}
        return decode(tree["state"], tensors)
    if os.path.exists(base + ".pt"):
        try:
            return torch.load(base + ".pt", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal gets the same advice
            raise ValueError(
                f"{base}.pt is a trainer state in the old pickle format that cannot be read safely "
                f"(weights_only=True refused it: {err}). Resume from a checkpoint written by this version, or start a "
                "new run from the checkpoint's model weights"
            ) from err
    raise FileNotFoundError(base + ".json")


__all__ = ["load_state", "save_state", "state_exists"]
