"""The eager engine: plain PyTorch, no compilation, nothing to warm up; the reference for the others."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from torch import Tensor

from singlestep import _compat as compat
from singlestep.engine.base import Engine, advance_schedule, lr_only, set_lrs
from singlestep.engine.closed_form import closed_form_for
from singlestep.fastpaths import FAST
from singlestep.engine.step import clip_coef, global_norm, take_step

__all__ = ["EagerEngine"]

# Below this many trainable parameters, eager per-sample steps run on one intra-op thread. Measured
# per-sample on Fashion-MNIST: softmax regression (7.9k) ~10% faster on one; MLPs of 6-25k
# parameters 5-10% faster with SGD, even with Adam; 38k even with SGD, ~5% slower with Adam.
_ONE_THREAD_PARAMS = 30_000


class EagerEngine(Engine):
    """Steps executed op by op, each through :func:`singlestep.engine.step.take_step`.

    Grads come from autograd (or, for the linear model, from its backward's own kernels without a
    graph: ``closed_form``); on an accelerator statistics stay on the device, on the CPU the loss
    and norm are read once per step and the check, clip and sums are host arithmetic. The fast
    paths are listed, with their switches, in ``singlestep/fastpaths.py``.
    """

    name = "eager"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._used: list[int] | None = None  # indices of params that receive a grad
        self._ones: dict[torch.dtype, Tensor] = {}
        # Per-step losses and norms are collected as tensors and summed once per call: one
        # reduction instead of three in-place updates per step.
        self._losses: list[Tensor] = []
        self._norms: list[Tensor] = []
        # On the CPU scalars are read per step and summed on the host: loss, norm, max norm.
        self._host_sums = [0.0, 0.0, 0.0]
        host = self.train.device.type == "cpu" and FAST.host_arithmetic
        self.ops = _HostOps(self) if host else _DeviceOps(self)
        self._bare_step = compat.bare_step(self.optimizer) if FAST.bare_step else None
        self._no_grad_body = compat.no_grad_body(self._bare_step)
        self._param_tuple = tuple(self.params)
        # Per-sample steps of a small model run on one thread: their kernels are too small to
        # split, and a second OpenMP thread only spins between them (eager SGD 110 -> 95 us/step).
        small = sum(p.numel() for p in self.params) < _ONE_THREAD_PARAMS
        self.eager_threads: int | None = 1 if small and self.train.device.type == "cpu" and FAST.one_thread else None
        # A linear model's per-sample loss and grads without the autograd graph (same numbers).
        self._closed = closed_form_for(self.model, self.loss_fn, self.params) if FAST.closed_form else None
        self._closed_set_grads = False

    # ------------------------------------------------------------------ statistics

    def flush(self) -> None:
        """Move the statistics gathered per step into ``stats`` (what a compiled chunk adds to)."""
        stats = self.stats
        if any(self._host_sums):
            loss_sum, norm_sum, norm_max = self._host_sums
            stats.loss_sum += loss_sum
            stats.norm_sum += norm_sum
            stats.norm_max.clamp_(min=norm_max)
            self._host_sums = [0.0, 0.0, 0.0]
        if not self._losses:
            return
        norms = torch.stack(self._norms)
        # float32 sums: a bf16/fp16 model's per-step values summed in their own dtype lose digits
        stats.loss_sum += torch.stack(self._losses).sum(dtype=torch.float32)
        stats.norm_sum += norms.sum(dtype=torch.float32)
        torch.maximum(stats.norm_max, norms.max(), out=stats.norm_max)
        self._losses.clear()
        self._norms.clear()

    def read(self) -> dict[str, float]:
        self.flush()
        return super().read()

    def peek(self) -> dict[str, float]:
        self.flush()
        return super().peek()

    def state_dict(self) -> dict[str, Any]:
        self.flush()  # a no-op between calls (each call flushes), where the trainer checkpoints
        return super().state_dict()

    # ------------------------------------------------------------------ the pieces of a step

    def _grads(self, loss: Tensor) -> list[Tensor]:
        # A reused grad_outputs saves autograd a ones_like per step.
        one = self._ones.get(loss.dtype)
        if one is None:
            one = self._ones[loss.dtype] = torch.ones((), dtype=loss.dtype, device=loss.device)
        if FAST.direct_backward:
            grads = compat.grads_of(loss, self._param_tuple, one)
        else:
            grads = torch.autograd.grad(loss, self.params, grad_outputs=one, allow_unused=True)
        if self._used is None:
            self._used = [i for i, g in enumerate(grads) if g is not None]
            if not self._used:
                raise RuntimeError("the loss does not depend on any trainable parameter")
            self._used_params = [self.params[i] for i in self._used]
        return [grads[i] for i in self._used]

    def used_params(self) -> list[Tensor]:
        """The parameters the loss gives a grad (all of them until an autograd step has run)."""
        return self.params if self._used is None else self._used_params

    def optimizer_step(self, grads: list[Tensor], ok: Any = None) -> None:
        """``optimizer.step()`` on these grads: one per trainable parameter, or one per parameter
        that autograd gave a grad (``_grads``)."""
        params = self.params if len(grads) == len(self.params) else self._used_params
        for p, g in zip(params, grads):
            p.grad = g
        opt = self.optimizer
        if self._bare_step is None or compat.step_is_observed(opt):
            opt.step()
        elif self._no_grad_body is not None:
            # ``@torch.no_grad()`` builds, enters and leaves a context object per call (~2 us, 3-4%
            # of a per-sample step); all it does is turn grad mode off around the call.
            compat.call_without_grad(self._no_grad_body, opt)
        else:
            self._bare_step(opt)

    # ------------------------------------------------------------------ public

    def run_samples(self, idx: Tensor) -> None:
        if self.scheduler is not None and not lr_only(self.scheduler):
            # It may change more than the lr (OneCycleLR cycles momentum): stepped after every step,
            # as in a plain loop, so the numbers never depend on how steps are chunked.
            self.run_samples_at(idx, None, step_scheduler=True)
            return
        rows = advance_schedule(self.scheduler, self.optimizer, len(idx)) if self.scheduler is not None else None
        self.run_samples_at(idx, rows)

    def run_samples_at(self, idx: Tensor, rows: list[list[float]] | None, step_scheduler: bool = False) -> None:
        """``run_samples`` with the schedule already advanced: ``rows[i]`` is step i's lr per group
        (None: the groups' own). The groups' lrs after the call are those the schedule left.
        ``step_scheduler``: call ``scheduler.step()`` after each step instead."""
        threads = torch.get_num_threads()
        if self.eager_threads and threads != self.eager_threads:
            # The whole call, gather included: a second OpenMP thread woken by the gather spins
            # for ~10 ms after it, half of the other core at the trainer's 256-step calls.
            torch.set_num_threads(self.eager_threads)
        try:
            self._run_samples_at(idx, rows, step_scheduler)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _run_samples_at(self, idx: Tensor, rows: list[list[float]] | None, step_scheduler: bool) -> None:
        model, loss_fn, rule, ops = self.model, self.loss_fn, self.rule, self.ops
        xs, ys = self.train.get(idx)  # one gather for the whole chunk: [k, ...]
        groups = self.optimizer.param_groups
        if rows is not None:  # the lrs after the chunk, restored at its end
            final = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in groups]
        closed = self._closed if self._closed is not None and self._closed.ready(xs, ys) else None
        if closed is None and self._closed_set_grads:
            # The closed form gave every parameter a grad; autograd may leave some without one,
            # and a stale grad there would be stepped on again and again.
            for p in self.params:
                p.grad = None
        self._closed_set_grads = closed is not None
        for i, (x, y) in enumerate(zip(xs.split(1), ys.split(1))):  # [1, ...] views
            if rows is not None:
                set_lrs(groups, rows[i])
            if closed is not None:
                loss, grads = closed(x, y)
            else:
                loss = loss_fn(model(x), y)
                grads = self._grads(loss)
                loss = loss.detach()
            take_step(rule, ops, grads, loss)
            if step_scheduler:
                self.scheduler.step()
        if rows is not None:
            set_lrs(groups, final)
        self.flush()

    def run_batch(self, micro_batches: list[Tensor], total: int | None = None) -> None:
        self.run_batch_at(micro_batches, None, total)
        if self.scheduler is not None:
            advance_schedule(self.scheduler, self.optimizer, 1)

    def run_batch_at(self, micro_batches: list[Tensor], lrs: list[float] | None, total: int | None = None) -> None:
        """One mini-batch step without advancing the schedule; ``lrs``: the step's lr per group
        (None: the groups' own), the groups' lrs restored after it; ``total``: see ``run_batch``."""
        groups = self.optimizer.param_groups
        if lrs is not None:
            final = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in groups]
            set_lrs(groups, lrs)
        total = total or sum(int(mb.shape[0]) for mb in micro_batches)
        grads: list[Tensor] | None = None
        loss_total = None
        if not micro_batches:
            # A torchrun rank with no share of a short last step adds nothing, but its gradient
            # list (which parameters, which dtypes) must be the other ranks': one sample's, zeroed.
            x, y = self.train.get(torch.zeros(1, dtype=torch.long, device=self.train.device))
            loss = self.loss_fn(self.model(x), y)
            grads = [torch.zeros_like(g) for g in self._grads(loss)]
            loss_total = torch.zeros_like(loss.detach())
        for mb in micro_batches:
            x, y = self.train.get(mb)
            # Weight each micro-batch by its share so the step sees the mean over all samples.
            loss = self.loss_fn(self.model(x), y) * (mb.shape[0] / total)
            g = self._grads(loss)
            if grads is None:
                grads, loss_total = list(g), loss.detach()
            else:
                torch._foreach_add_(grads, g)
                loss_total = loss_total + loss.detach()
        take_step(self.rule, self.ops, grads, loss_total)
        if lrs is not None:
            set_lrs(groups, final)
        self.flush()


class _DeviceOps:
    """The step's stages as tensor maths; the finite check is one host read (a sync on CUDA)."""

    def __init__(self, engine: EagerEngine):
        self.engine = engine
        self.update = engine.optimizer_step  # the step's last stage, bound once: one call fewer per step

    def norm(self, grads: list[Tensor]) -> Any:
        return global_norm(grads)

    def finite(self, loss: Tensor, norm: Any) -> bool:
        # One host read instead of isfinite's several kernels and a read.
        return math.isfinite(float(norm + loss))

    def record(self, loss: Tensor, norm: Any, ok: Any) -> None:
        stats = self.engine.stats
        stats.steps += 1
        if ok is False:
            stats.skipped += 1
            return
        self.engine._losses.append(loss)
        self.engine._norms.append(norm)

    def clamp(self, grads: list[Tensor], value: float) -> list[Tensor]:
        torch._foreach_clamp_min_(grads, -value)
        torch._foreach_clamp_max_(grads, value)
        return grads

    def scale_to_norm(self, grads: list[Tensor], max_norm: float, norm: Any) -> list[Tensor]:
        torch._foreach_mul_(grads, clip_coef(max_norm, norm))
        return grads



class _HostOps(_DeviceOps):
    """On the CPU, where reading a scalar costs less than a kernel launch: the loss and the norm
    are read once per step; the finite check, the clip coefficient and the statistics are then
    host arithmetic, and a step whose norm is under the clip threshold is not multiplied by 1.
    The coefficient is computed in the norm's precision with the same roundings as the tensor
    expression (``t + 1e-6``, ``reciprocal``, ``* max``), so both scale by the same number.
    A norm here is ``(tensor, float)``."""

    _loss: float | None = None

    def norm(self, grads: list[Tensor]) -> Any:
        t = global_norm(grads)
        return t, t.item()  # a host read, but no sync: CPU kernels run in order

    def finite(self, loss: Tensor, norm: Any) -> bool:
        self._loss = loss.item()
        return math.isfinite(self._loss) and math.isfinite(norm[1])

    def record(self, loss: Tensor, norm: Any, ok: Any) -> None:
        stats = self.engine.stats
        stats.steps += 1
        value, self._loss = (loss.item() if self._loss is None else self._loss), None
        if ok is False:
            stats.skipped += 1
            return
        sums, n = self.engine._host_sums, norm[1]
        sums[0] += value
        sums[1] += n
        if n > sums[2]:
            sums[2] = n

    def scale_to_norm(self, grads: list[Tensor], max_norm: float, norm: Any) -> list[Tensor]:
        t, n = norm
        coef = _host_clip_coef(max_norm, n, t.dtype)
        if coef is None:  # a half-precision norm: the tensor expression itself
            torch._foreach_mul_(grads, clip_coef(max_norm, t))
        elif coef < 1.0:
            torch._foreach_mul_(grads, coef)
        return grads


def _host_clip_coef(max_norm: float, norm: float, dtype: torch.dtype) -> float | None:
    """``min(1, max_norm / (norm + 1e-6))`` rounded as tensor maths in ``dtype`` rounds it.

    float64 is Python's own float arithmetic. For float32 each operation is done in float64 and
    rounded to float32 once, which gives exactly float32's result for +, * and / (float64 holds
    more than twice float32's precision). None for other dtypes (the caller uses tensor maths).
    """
    if dtype == torch.float64:
        return min((1.0 / (norm + 1e-6)) * max_norm, 1.0)
    if dtype != torch.float32:
        return None
    coef = _round32(_round32(1.0 / _round32(norm + _EPS32)) * _round32(max_norm))
    return min(coef, 1.0)


_F32 = struct.Struct("f")
_EPS32 = _F32.unpack(_F32.pack(1e-6))[0]


def _round32(x: float) -> float:
    """``x`` rounded to the nearest float32 (to +-inf past float32's range, as a cast does)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)
