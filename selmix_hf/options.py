"""Options of an objective or a loss given by name (config fields, JSON on the command line): their names and
types checked against the class they configure, so a wrong one fails when the config is built, naming it."""

from __future__ import annotations

import collections.abc
import inspect
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any

SEQUENCES = (list, tuple, collections.abc.Sequence)


def plain(value: Any) -> Any:
    """numpy / torch scalars and arrays as Python numbers and lists (what JSON, the cards and the checks read)."""
    if isinstance(value, (str, bytes, dict)) or value is None:
        return value
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a value fits a type hint (int, float, bool, str, None, list[...], Sequence[...], dict, unions)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if origin in SEQUENCES:
        (item,) = typing.get_args(hint)[:1] or (Any,)
        value = plain(value)
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """A type hint as a user reads it: 'float', 'int or None', 'list of float'."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint))
    if origin in SEQUENCES:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _named_parameters(target: Any, skip: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """A class's keyword options (not ``skip``, not ``*args`` / ``**kwargs``) and their resolved type hints."""
    init = target.__init__ if isinstance(target, type) else target
    params = inspect.signature(init).parameters
    names = [
        name
        for name, param in params.items()
        if name not in ("self", *skip) and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    ]
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - annotations we cannot resolve are not checked
        hints = {}
    return names, hints


def check_options(
    target: Any, options: dict[str, Any], what: str, *, skip: Sequence[str] = (), also: Any = None
) -> None:
    """Unknown names and wrongly typed values among ``options`` for ``target`` (a class) are errors.

    ``skip`` names parameters the caller fills itself; ``also`` is a second class whose options are accepted too
    (the objective of the cost-sensitive loss).
    """
    accepted, hints = _named_parameters(target, skip)
    if also is not None:
        extra, extra_hints = _named_parameters(also, ("num_classes",))
        accepted, hints = accepted + [name for name in extra if name not in accepted], {**extra_hints, **hints}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{what} does not take option(s) {unknown}; it accepts: {', '.join(accepted)}")
    for key, value in options.items():
        if key in hints and not matches_type(value, hints[key]):
            raise TypeError(
                f"{what}: option {key!r} must be {type_name(hints[key])}, got {value!r} ({type(value).__name__})"
            )


__all__ = ["check_options", "matches_type", "plain", "type_name"]
