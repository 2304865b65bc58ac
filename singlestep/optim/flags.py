"""torch.optim's constructor flags: ``foreach``, ``fused``, ``capturable``, ``differentiable``.

They choose *how* torch's classes run an update, not what it computes, and they are
optimizer-wide. A config sets them as keys of the ``optimizer:`` node for any class whose
signature takes them (``torch.optim.AdamW``, most third-party classes), never in a
``param_groups`` rule. singlestep's own optimizers take none of them: they pick their update path
by themselves (torch's fused CPU kernel or ``_foreach`` ops where that is safe, see
``fused_kernels`` in ``singlestep/fastpaths.py``), so for one of these flags a config names
torch's class instead. The messages here say so.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

__all__ = ["TORCH_FLAGS", "flag_value_problem", "missing_flag_problem", "takes"]

TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def takes(cls: type, key: str) -> bool:
    """Whether ``cls``'s constructor has a parameter named ``key`` (``**kwargs`` does not count)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return key in params and params[key].kind is not inspect.Parameter.VAR_KEYWORD


def _flags_of(cls: type) -> list[str]:
    return [k for k in TORCH_FLAGS if takes(cls, k)]


def _is_ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "singlestep"


def _module_has(cls: type, helper: str) -> bool:
    """Whether ``cls`` or a base is defined next to ``helper`` (the gate of a fast path it takes)."""
    return any(hasattr(sys.modules.get(c.__module__), helper) for c in cls.__mro__)


def _ours_instead(cls: type, key: str) -> str:
    """Why one of singlestep's optimizers needs no ``key``: what the flag would switch on."""
    fused = _module_has(cls, "_fused_cpu_ok")
    foreach = fused or _module_has(cls, "_foreach_ok")
    if key == "capturable":
        return ("it keeps all its state as tensors on the parameters' device already (torch's `capturable` moves "
                "its step counts there; for CUDA graphs: trainer.engine: cuda_graph)")
    if key == "differentiable":
        return "it steps under no_grad, and the trainer never differentiates through a step"
    if key == "fused" and fused:
        return ("it takes torch's fused CPU kernel by itself where that is safe (dense contiguous float32/float64 "
                "CPU tensors, eager steps; switch: `fused_kernels` in singlestep/fastpaths.py), else `_foreach` ops")
    if key == "foreach" and foreach:
        also = " (and torch's fused CPU kernel where that is safe)" if fused else ""
        return f"it uses `_foreach` ops by itself whenever a group's tensors share a device and dtype{also}"
    return f"it has no {key} path to switch on"


def _torch_counterpart(cls: type, key: str) -> str | None:
    """``torch.optim.<Name>`` when torch has a class of the same name that takes ``key``."""
    import torch

    other = getattr(torch.optim, cls.__name__, None)
    if isinstance(other, type) and issubclass(other, torch.optim.Optimizer) and takes(other, key):
        return f"torch.optim.{cls.__name__}"
    return None


def missing_flag_problem(cls: type, name: str, key: str) -> str:
    """The message for a torch flag ``key`` given to an optimizer whose signature lacks it.

    Args:
        cls: the optimizer class.
        name: the name the config gave it (``adam``, ``torch.optim.SGD``).
        key: one of :data:`TORCH_FLAGS`.
    """
    if _is_ours(cls):
        message = f"singlestep's '{name}' takes no '{key}' flag: {_ours_instead(cls, key)}"
        counterpart = _torch_counterpart(cls, key) if key != "differentiable" else None
        if counterpart:
            message += f"; for torch's flag use name: {counterpart}"
        return message
    flags = _flags_of(cls)
    has = f"its flags: {', '.join(flags)}" if flags else "it takes none of torch's flags"
    return f"'{key}' is one of torch's optimizer flags, but optimizer '{name}' does not take it ({has})"


def flag_value_problem(key: str, value: Any) -> str | None:
    """A flag value that would only fail inside the first step, explained; None when it is fine."""
    if key == "differentiable" and value is True:
        return ("true makes torch's step differentiable, for stepping non-leaf tensors (meta-learning); the "
                "trainer steps the model's own leaf parameters, which torch then refuses to update in place; "
                "leave it false")
    return None
