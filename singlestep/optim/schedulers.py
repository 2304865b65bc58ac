"""Learning-rate schedules, stepped once per optimizer step; registered in ``SCHEDULERS``.

Each builder is ``fn(optimizer, total_steps, *, <config keys>) -> LRScheduler``: the runtime
arguments come first, the config values keyword-only (only those are YAML keys). All are
``LambdaLR`` over a pure function of the step index ``s`` (the number of ``scheduler.step()`` calls
so far, i.e. optimizer steps taken), so every param group keeps its own base lr and a group's lr
at step ``s`` is ``base_lr * factor(s)``. The factor at ``s = 0`` applies to the first optimizer
step. Tensor lrs (0-dim) are filled in place by torch's ``LRScheduler``, so a compiled step that
captured the tensor sees the new value without recompiling, and no host sync happens.

Warm-up, where offered, is linear from ``warmup_start_factor`` (default 0, as in HF/timm: the first
step runs at lr 0) to 1 over ``warmup_steps`` steps; the schedule proper starts at
``s = warmup_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from singlestep.registry import SCHEDULERS

__all__ = ["constant", "cosine", "inverse_sqrt", "linear", "step"]


def _check_total(total_steps: int) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")


def _check_warmup(warmup_steps: int, warmup_start_factor: float, total_steps: int | None) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if total_steps is not None and warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor!r}")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _with_warmup(
    warmup_steps: int, warmup_start_factor: float, after: Callable[[int], float]
) -> Callable[[int], float]:
    """Linear warm-up for ``s < warmup_steps``, then ``after(s)``."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return warmup_start_factor + (1.0 - warmup_start_factor) * s / warmup_steps
        return after(s)

    def many(s: np.ndarray) -> np.ndarray:
        warm = warmup_start_factor + (1.0 - warmup_start_factor) * s / max(warmup_steps, 1)
        return np.where(s < warmup_steps, warm, after.many(s))

    factor.many = many  # type: ignore[attr-defined]
    return factor


def _vectorized(scalar: Callable[[int], float], many: Callable[[np.ndarray], np.ndarray]) -> Callable[[int], float]:
    """``scalar`` with ``.many``, its form over an array of steps (what ``advance_schedule`` uses
    for a whole chunk of steps: same values, bar the last bit of a cosine)."""
    scalar.many = many  # type: ignore[attr-defined]
    return scalar


def _progress(s: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction of the post-warm-up phase done at step ``s``, clamped to [0, 1]."""
    return min(1.0, max(0.0, (s - warmup_steps) / max(1, total_steps - warmup_steps)))


def _progress_many(s: np.ndarray, warmup_steps: int, total_steps: int) -> np.ndarray:
    return np.clip((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)


@SCHEDULERS.register("constant")
def constant(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
) -> LRScheduler:
    """Constant lr, after an optional linear warm-up.

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        total_steps: optimizer steps in the run (checked, otherwise unused).
        warmup_steps: steps of linear warm-up (0: none).
        warmup_start_factor: lr factor at the first warm-up step.
    """
    _check_total(total_steps)
    _check_warmup(warmup_steps, warmup_start_factor, None)
    after = _vectorized(lambda s: 1.0, lambda s: np.ones(s.shape))
    return LambdaLR(optimizer, _with_warmup(warmup_steps, warmup_start_factor, after))


@SCHEDULERS.register("step")
def step(
    optimizer: torch.optim.Optimizer, total_steps: int, *, step_size: int = 1000, gamma: float = 0.1
) -> LRScheduler:
    """Multiply the lr by ``gamma`` every ``step_size`` steps (torch's StepLR, counted in steps).

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        total_steps: optimizer steps in the run (checked, otherwise unused).
        step_size: steps between decays.
        gamma: multiplicative factor per decay, > 0.
    """
    _check_total(total_steps)
    if not isinstance(step_size, int) or step_size < 1:
        raise ValueError(f"step_size must be an integer >= 1, got {step_size!r}")
    if not gamma > 0.0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    return LambdaLR(optimizer, _vectorized(lambda s: gamma ** (s // step_size), lambda s: gamma ** (s // step_size)))


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Linear warm-up, then half a cosine from the base lr down to ``min_lr_ratio`` x base lr.

    The factor is ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p`` the post-warm-up progress
    ``(s - warmup_steps) / (total_steps - warmup_steps)``, reaching ``r`` at ``s = total_steps``
    and staying there if the run goes on.

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        total_steps: optimizer steps in the run; the cosine ends there.
        warmup_steps: steps of linear warm-up (0: none), at most ``total_steps``.
        warmup_start_factor: lr factor at the first warm-up step.
        min_lr_ratio: final lr as a fraction of the base lr, in [0, 1].
    """
    _check_total(total_steps)
    _check_warmup(warmup_steps, warmup_start_factor, total_steps)
    _check_ratio("min_lr_ratio", min_lr_ratio)

    def after(s: int) -> float:
        p = _progress(s, warmup_steps, total_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    def after_many(s: np.ndarray) -> np.ndarray:
        p = _progress_many(s, warmup_steps, total_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + np.cos(math.pi * p))

    _vectorized(after, after_many)
    return LambdaLR(optimizer, _with_warmup(warmup_steps, warmup_start_factor, after))


@SCHEDULERS.register("linear")
def linear(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    end_factor: float = 0.0,
) -> LRScheduler:
    """Linear warm-up, then linear decay to ``end_factor`` x base lr at ``total_steps``.

    With the default ``end_factor = 0`` the lr is exactly 0 from ``s = total_steps`` on (every
    optimizer is checked to take an lr of 0 without NaN).

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        total_steps: optimizer steps in the run; the decay ends there.
        warmup_steps: steps of linear warm-up (0: none), at most ``total_steps``.
        warmup_start_factor: lr factor at the first warm-up step.
        end_factor: final lr as a fraction of the base lr, in [0, 1].
    """
    _check_total(total_steps)
    _check_warmup(warmup_steps, warmup_start_factor, total_steps)
    _check_ratio("end_factor", end_factor)

    def after(s: int) -> float:
        return end_factor + (1.0 - end_factor) * (1.0 - _progress(s, warmup_steps, total_steps))

    def after_many(s: np.ndarray) -> np.ndarray:
        return end_factor + (1.0 - end_factor) * (1.0 - _progress_many(s, warmup_steps, total_steps))

    _vectorized(after, after_many)
    return LambdaLR(optimizer, _with_warmup(warmup_steps, warmup_start_factor, after))


@SCHEDULERS.register("inverse_sqrt")
def inverse_sqrt(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
) -> LRScheduler:
    """Linear warm-up, then lr x sqrt(warmup_steps / s) (the Transformer / T5 schedule).

    The factor is 1 at ``s = warmup_steps`` and halves every 4x steps; with ``warmup_steps = 0``
    it is ``1 / sqrt(max(s, 1))``.

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        total_steps: optimizer steps in the run (checked, otherwise unused).
        warmup_steps: steps of linear warm-up, also the decay's time scale.
        warmup_start_factor: lr factor at the first warm-up step.
    """
    _check_total(total_steps)
    _check_warmup(warmup_steps, warmup_start_factor, None)
    scale = max(warmup_steps, 1)

    def after(s: int) -> float:
        return math.sqrt(scale / max(s, scale))

    _vectorized(after, lambda s: np.sqrt(scale / np.maximum(s, scale)))
    return LambdaLR(optimizer, _with_warmup(warmup_steps, warmup_start_factor, after))
