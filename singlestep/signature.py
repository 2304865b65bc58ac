"""What a builder's signature lets a config set, and whether a YAML value fits its annotation.

The config schema of a component (model, dataset, optimizer, scheduler) is its builder's
signature: the parameters after the runtime arguments, their annotations (or the type of their
defaults) and their defaults. Nothing here knows about config files; ``singlestep.config`` does.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable, Literal

__all__ = ["builder_kwargs", "builder_params", "check_type", "describe"]


# How a value of each plain type reads in a message: (one, several).
_NAMES: dict[Any, tuple[str, str]] = {
    float: ("a number", "numbers"),
    int: ("an integer", "integers"),
    bool: ("true/false", "true/false values"),
    str: ("a string", "strings"),
    dict: ("a mapping", "mappings"),
    type(None): ("null", "nulls"),
}


def _is_tensor(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "Tensor" and tp.__module__.startswith("torch")


def _is_sequence(tp: Any, origin: Any) -> bool:
    return tp in (list, tuple) or origin in (list, tuple) or getattr(origin, "__name__", "") in ("Sequence", "Iterable")


def describe(tp: Any, plural: bool = False) -> str:
    """What an annotation accepts, in words: ``tuple[float, float]`` reads "a list of 2 numbers".

    Args:
        tp: the annotation.
        plural: the words for several such values ("numbers"), as the items of a list.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is inspect.Parameter.empty or tp is Any:
        return "values" if plural else "any value"
    if origin in (typing.Union, types.UnionType):
        # YAML cannot give a tensor: `float | Tensor` reads "a number".
        options = [a for a in args if not _is_tensor(a)] or list(args)
        return " or ".join(dict.fromkeys(describe(a, plural) for a in options))
    if origin is Literal:
        return ("values from " if plural else "one of ") + ", ".join(repr(a) for a in args)
    if _is_sequence(tp, origin):
        lists = "lists" if plural else "a list"
        if origin is tuple and args and Ellipsis not in args:
            items = [describe(a) for a in args]
            if len(args) == 1:
                return f"{lists} of one item, {items[0]}"
            if len(set(items)) == 1:
                return f"{lists} of {len(args)} {describe(args[0], plural=True)}"
            return f"{lists} of {len(args)} items: {', '.join(items)}"
        inner = [a for a in args if a is not Ellipsis]
        return f"{lists} of {' or '.join(dict.fromkeys(describe(a, plural=True) for a in inner))}" if inner else lists
    if isinstance(tp, type) and tp in _NAMES:
        return _NAMES[tp][plural]
    if _is_tensor(tp):
        return "tensors (which YAML cannot give)" if plural else "a tensor (which YAML cannot give)"
    name = getattr(tp, "__name__", str(tp))
    return f"{name} values" if plural else name


def check_type(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits an annotation; unknown annotations accept anything."""
    if tp is inspect.Parameter.empty or tp is Any:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    if tp in (dict,) or origin is dict:
        return isinstance(value, dict)
    if _is_sequence(tp, origin):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in args:
            return len(value) == len(args) and all(check_type(v, a) for v, a in zip(value, args))
        return all(any(check_type(v, a) for a in inner) for v in value) if inner else True
    if isinstance(tp, type):
        if _is_tensor(tp):
            return False  # YAML cannot produce a tensor; a union with float still matches
        try:
            return isinstance(value, tp)
        except TypeError:  # a Protocol that is not runtime-checkable, say: an annotation we cannot check
            return True
    return True


def _annotation_of(param: inspect.Parameter, hints: dict[str, Any]) -> Any:
    tp = hints.get(param.name, param.annotation)
    if isinstance(tp, str):
        tp = inspect.Parameter.empty  # unresolvable string annotation: accept
    if tp is inspect.Parameter.empty and param.default is not inspect.Parameter.empty:
        default = param.default
        if isinstance(default, bool):
            return bool
        if isinstance(default, float):
            return float
        if isinstance(default, int):
            return int
        if isinstance(default, str):
            return str
    return tp


def builder_params(builder: Callable, n_runtime: int) -> list[tuple[inspect.Parameter, Any]]:
    """The config-settable parameters of a builder or class: those after its runtime arguments."""
    target = builder.__init__ if isinstance(builder, type) else builder
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # annotations naming things that cannot be imported: check no types
        hints = {}
    params = [p for p in sig.parameters.values() if p.name != "self"]
    settable = []
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i < n_runtime and p.kind is not p.KEYWORD_ONLY:
            continue
        settable.append((p, _annotation_of(p, hints)))
    return settable


def builder_kwargs(builder: Callable, n_runtime: int, given: dict[str, Any]) -> dict[str, Any]:
    """The resolved keyword arguments: given values plus the YAML-representable defaults."""
    out: dict[str, Any] = {}
    for p, _ in builder_params(builder, n_runtime):
        if p.name in given:
            out[p.name] = given[p.name]
        elif p.default is not inspect.Parameter.empty and _plain(p.default):
            out[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)
