"""The step, written once: gradients (and the loss) in, one optimizer update and its statistics out.

Every engine runs :func:`take_step`: the eager engine calls it for each step, the compiled engine
traces the very same function into its graph. What differs between them is only *how* each stage
executes, which the engine's :class:`StepOps` says (host arithmetic on the CPU, tensor maths on a
device, functional maths under tracing). The contract, in its order:

1. ``rule.grad_transforms``: functions of the gradients and the loss, ``(grads, loss) -> (grads,
   loss)``, before anything reads them: the all-reduce across processes under torchrun
   (``distributed.py``) is one; an fp16 unscale would be another.
2. The pre-clip global L2 norm of all gradients (what is logged).
3. The finite check: a step whose loss or norm is not finite never reaches the optimizer, and is
   counted as skipped. The schedule still advances (it counts steps taken or skipped).
4. Clipping: element-wise at ``clip_grad_value``, then to global norm ``clip_grad_norm`` with
   ``torch.nn.utils.clip_grad_norm_``'s rule, ``min(1, max / (norm + 1e-6))``.
5. ``optimizer.step()``: the user's own object, with ``p.grad`` set to the clipped gradients.
6. The statistics: loss, pre-clip norm and skipped steps, kept on the device until read.

Adding a stage (a per-sample clip, noise for DP-SGD) means adding it here, once; see
docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

__all__ = ["GradTransform", "StepOps", "StepRule", "global_norm", "take_step"]

GradTransform = Callable[[list[Tensor], Tensor], tuple[list[Tensor], Tensor]]


@dataclass(frozen=True)
class StepRule:
    """What a step does, from the config: the same for every engine.

    Attributes:
        clip_grad_norm: global-norm clipping threshold (None = off).
        clip_grad_value: element-wise clipping threshold (None = off).
        check_finite: skip steps with a non-finite loss or gradient norm.
        grad_transforms: applied in order to ``(grads, loss)`` before the norm and the check.
    """

    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    check_finite: bool = True
    grad_transforms: tuple[GradTransform, ...] = ()


class StepOps(Protocol):
    """How one engine executes the stages of a step. ``Norm`` and ``Ok`` are the engine's own
    types (a tensor, a host float, a flag); :func:`take_step` only passes them along, except that
    an ``ok`` of exactly ``False`` (known on the host) ends the step before the optimizer."""

    def norm(self, grads: list[Tensor]) -> Any: ...

    def finite(self, loss: Tensor, norm: Any) -> Any: ...

    def record(self, loss: Tensor, norm: Any, ok: Any) -> None: ...

    def clamp(self, grads: list[Tensor], value: float) -> list[Tensor]: ...

    def scale_to_norm(self, grads: list[Tensor], max_norm: float, norm: Any) -> list[Tensor]: ...

    def update(self, grads: list[Tensor], ok: Any) -> None: ...


def take_step(rule: StepRule, ops: StepOps, grads: list[Tensor], loss: Tensor) -> None:
    """One optimizer step from ``grads`` (one per parameter that has one) and the step's ``loss``."""
    for transform in rule.grad_transforms:
        grads, loss = transform(grads, loss)
    norm = ops.norm(grads)  # pre-clip, as logged
    ok = ops.finite(loss, norm) if rule.check_finite else True
    ops.record(loss, norm, ok)
    if ok is False:  # known on the host: the optimizer never sees this step
        return
    if rule.clip_grad_value is not None:
        grads = ops.clamp(grads, rule.clip_grad_value)
        if rule.clip_grad_norm is not None:
            norm = ops.norm(grads)  # the clamped gradients' norm
    if rule.clip_grad_norm is not None:
        grads = ops.scale_to_norm(grads, rule.clip_grad_norm, norm)
    ops.update(grads, ok)


def global_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all gradients together (``clip_grad_norm_``'s norm)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_coef(max_norm: float, norm: Tensor) -> Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` as a tensor: ``clip_grad_norm_``'s coefficient."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
