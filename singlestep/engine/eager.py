"""The eager engine: plain PyTorch, no compilation, nothing to warm up."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
import torch.optim.optimizer as _optim_module
from torch import Tensor

from singlestep.engine.base import Engine, advance_schedule, call_without_grad, set_lrs
from singlestep.engine.closed_form import closed_form_for

__all__ = ["EagerEngine"]

# Below this many trainable parameters, eager per-sample steps run on one intra-op thread. Measured
# per-sample on Fashion-MNIST: softmax regression (7.9k) ~10% faster on one; MLPs of 6-25k
# parameters 5-10% faster with SGD, even with Adam; 38k even with SGD, ~5% slower with Adam.
_ONE_THREAD_PARAMS = 30_000

# The autograd engine's entry point (what torch.autograd.grad calls): (outputs, grad_outputs,
# retain_graph, create_graph, inputs, allow_unreachable, accumulate_grad) -> grads of inputs.
_run_backward = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)


class EagerEngine(Engine):
    """Steps executed op by op. Grads come from the autograd engine directly (no ``zero_grad``
    pass, no per-call argument checks), or for the linear model from its backward's own kernels
    without a graph (``closed_form``); norms and clipping use the ``_foreach`` kernels, and the
    optimizer's ``step`` is called past its hook wrapper when no hook or profiler needs it. On an
    accelerator statistics stay on the device; on the CPU scalars are read per step. Per-sample
    steps of small models run on one intra-op thread.
    """

    name = "eager"
    # Per-sample steps the trainer hands over per call: short, so a stop request is seen quickly.
    max_chunk = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        self._used: list[int] | None = None  # indices of params that receive a grad
        self._ones: dict[torch.dtype, Tensor] = {}
        # Per-step losses and norms are collected as tensors and summed once per call: one
        # reduction instead of three in-place updates per step.
        self._losses: list[Tensor] = []
        self._norms: list[Tensor] = []
        # On the CPU scalars are read per step and summed on the host: loss, norm, max norm.
        self._host_scalars = self.train.device.type == "cpu"
        self._host_sums = [0.0, 0.0, 0.0]
        self._bare_step = _unwrapped_step(self.optimizer)
        self._no_grad_body = _under_no_grad(self._bare_step)
        self._param_tuple = tuple(self.params)
        # Per-sample steps of a small model run on one thread: their kernels are too small to
        # split, and a second OpenMP thread only spins between them (eager SGD 110 -> 95 us/step).
        small = sum(p.numel() for p in self.params) < _ONE_THREAD_PARAMS
        self.eager_threads: int | None = 1 if small and self.train.device.type == "cpu" else None
        # A linear model's per-sample loss and grads without the autograd graph (same numbers).
        self._closed = closed_form_for(self.model, self.loss_fn, self.params)
        self._all = list(range(len(self.params)))  # the closed form's grads: one per parameter
        self._closed_set_grads = False

    def _flush(self) -> None:
        if self._host_scalars:
            loss_sum, norm_sum, norm_max = self._host_sums
            stats = self.stats
            stats.loss_sum += loss_sum
            stats.norm_sum += norm_sum
            stats.norm_max.clamp_(min=norm_max)
            self._host_sums = [0.0, 0.0, 0.0]
        if not self._losses:
            return
        stats = self.stats
        norms = torch.stack(self._norms)
        # float32 sums: a bf16/fp16 model's per-step values summed in their own dtype lose digits
        stats.loss_sum += torch.stack(self._losses).sum(dtype=torch.float32)
        stats.norm_sum += norms.sum(dtype=torch.float32)
        torch.maximum(stats.norm_max, norms.max(), out=stats.norm_max)
        self._losses.clear()
        self._norms.clear()

    def read(self) -> dict[str, float]:
        self._flush()
        return super().read()

    def _schedule(self) -> None:
        if self.scheduler is not None:
            advance_schedule(self.scheduler, self.optimizer, 1)

    def _grads(self, loss: Tensor) -> list[Tensor]:
        # A reused grad_outputs saves autograd a ones_like per step.
        one = self._ones.get(loss.dtype)
        if one is None:
            one = self._ones[loss.dtype] = torch.ones((), dtype=loss.dtype, device=loss.device)
        if _run_backward is not None:
            # autograd.grad's Python layer (argument normalisation and checks) costs ~20 us a call,
            # a sixth of a per-sample step; this is the engine call it makes after them.
            grads = _run_backward((loss,), (one,), False, False, self._param_tuple, True, False)
        else:
            grads = torch.autograd.grad(loss, self.params, grad_outputs=one, allow_unused=True)
        if self._used is None:
            self._used = [i for i, g in enumerate(grads) if g is not None]
            if not self._used:
                raise RuntimeError("the loss does not depend on any trainable parameter")
        return [grads[i] for i in self._used]

    def _apply(self, grads: list[Tensor], loss: Tensor, used: list[int]) -> None:
        """Finite check, clip, optimizer step and scheduler step for one set of grads
        (``grads[j]`` belongs to parameter ``used[j]``)."""
        if self._host_scalars:
            self._apply_host(grads, loss, used)
            return
        stats = self.stats
        norm = _global_norm(grads)  # pre-clip global L2
        stats.steps += 1
        # One host read (a sync on CUDA) instead of isfinite's several kernels and a read.
        if self.check_finite and not math.isfinite(float(norm + loss)):
            stats.skipped += 1  # the schedule still advances: it counts steps taken, skipped or not
            return
        self._losses.append(loss)
        self._norms.append(norm)
        if self.clip_grad_value is not None:
            self._clamp(grads)
            if self.clip_grad_norm is not None:
                norm = _global_norm(grads)
        if self.clip_grad_norm is not None:
            # Same rule as torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6)).
            coef = (self.clip_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(grads, coef)
        self._step(grads, used)

    def _apply_host(self, grads: list[Tensor], loss: Tensor, used: list[int]) -> None:
        """``_apply`` for the CPU, where reading a scalar costs less than a kernel launch.

        The loss and the norm are read once per step; the finite check, the clip coefficient and
        the statistics are then host arithmetic, and a step whose norm is under the clip
        threshold is not multiplied by 1. The coefficient is computed in the norm's precision
        with the same roundings as the device expression (``t + 1e-6``, ``reciprocal``,
        ``* max``), so both paths scale the gradients by the same number.
        """
        stats = self.stats
        norm = _global_norm(grads)  # pre-clip global L2
        n, value = norm.item(), loss.item()  # host reads, but no sync: CPU kernels run in order
        stats.steps += 1
        if self.check_finite and not (math.isfinite(n) and math.isfinite(value)):
            stats.skipped += 1
            return
        self._host_sums[0] += value
        self._host_sums[1] += n
        self._host_sums[2] = max(self._host_sums[2], n)
        if self.clip_grad_value is not None:
            self._clamp(grads)
            if self.clip_grad_norm is not None:
                norm = _global_norm(grads)  # the clamped grads' norm (the half-precision branch uses the tensor)
                n = norm.item()
        if self.clip_grad_norm is not None:
            coef = _clip_coef(self.clip_grad_norm, n, norm.dtype)
            if coef is None:  # a half-precision norm: the device expression itself
                torch._foreach_mul_(grads, (self.clip_grad_norm / (norm + 1e-6)).clamp_(max=1.0))
            elif coef < 1.0:
                torch._foreach_mul_(grads, coef)
        self._step(grads, used)

    def _clamp(self, grads: list[Tensor]) -> None:
        v = self.clip_grad_value
        torch._foreach_clamp_min_(grads, -v)
        torch._foreach_clamp_max_(grads, v)

    def _step(self, grads: list[Tensor], used: list[int]) -> None:
        for i, g in zip(used, grads):
            self.params[i].grad = g
        opt = self.optimizer
        # Optimizer.step's wrapper opens a profiler range and runs step hooks: ~10 us per call.
        # With no hook registered and no profiler running it does nothing else, so call the
        # method it wraps; otherwise go through it.
        if self._bare_step is None or _step_hooks_or_profiler(opt):
            opt.step()
        elif self._no_grad_body is not None:
            # ``@torch.no_grad()`` builds, enters and leaves a context object per call (~2 us, 3-4%
            # of a per-sample step); all it does is turn grad mode off around the call.
            call_without_grad(self._no_grad_body, opt)
        else:
            self._bare_step(opt)

    def run_samples(self, idx: Tensor) -> None:
        model, loss_fn = self.model, self.loss_fn
        xs, ys = self.train.get(idx)  # one gather for the whole chunk: [k, ...]
        groups = self.optimizer.param_groups
        # The schedule for the whole chunk at once (closed form for LambdaLR); each step then
        # only sets its groups' lr from the table.
        rows = advance_schedule(self.scheduler, self.optimizer, len(idx)) if self.scheduler is not None else None
        if rows is not None:  # the lrs after the chunk, restored at its end
            final = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in groups]
        closed = self._closed if self._closed is not None and self._closed.ready(xs, ys) else None
        if closed is None and self._closed_set_grads:
            # The closed form gave every parameter a grad; autograd may leave some without one,
            # and a stale grad there would be stepped on again and again.
            for p in self.params:
                p.grad = None
        self._closed_set_grads = closed is not None
        threads = torch.get_num_threads()
        if self.eager_threads and threads != self.eager_threads:
            torch.set_num_threads(self.eager_threads)
        try:
            for i, (x, y) in enumerate(zip(xs.split(1), ys.split(1))):  # [1, ...] views
                if rows is not None:
                    set_lrs(groups, rows[i])
                if closed is not None:
                    loss, grads = closed(x, y)
                    self._apply(grads, loss, self._all)
                else:
                    loss = loss_fn(model(x), y)
                    grads = self._grads(loss)  # sets self._used on the first call
                    self._apply(grads, loss.detach(), self._used)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        if rows is not None:
            set_lrs(groups, final)
        self._flush()

    def run_batch(self, micro_batches: list[Tensor]) -> None:
        total = sum(int(mb.shape[0]) for mb in micro_batches)
        grads: list[Tensor] | None = None
        loss_total = None
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
        self._apply(grads, loss_total, self._used)
        self._schedule()
        self._flush()


def _clip_coef(max_norm: float, norm: float, dtype: torch.dtype) -> float | None:
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


def _unwrapped_step(optimizer: torch.optim.Optimizer) -> Any:
    """The ``step`` that torch.optim's profiling/hook wrapper wraps, or None if not wrapped.

    An instance-level ``step`` is called as it is, except the one every torch LR scheduler puts
    there (``_wrapped_by_lr_sched``), which only records ``optimizer._opt_called = True`` for the
    scheduler's call-order warning: that flag is set here once, and the class's step is used.
    """
    own = vars(optimizer).get("step")
    if own is not None:
        if not (getattr(own, "_wrapped_by_lr_sched", False) and getattr(own, "__wrapped__", None) is type(optimizer).step):
            return None  # the user's own override: call what the user put there
        optimizer._opt_called = True
    step = type(optimizer).step
    if not getattr(step, "hooked", False):
        return None
    return getattr(step, "__wrapped__", None)


def _under_no_grad(fn: Any) -> Any:
    """The function that ``@torch.no_grad()`` decorates in ``fn``, or None if ``fn`` is not that.

    Recognised by the decorator's own code object and its context factory being the ``clone`` of
    a ``torch.no_grad`` instance, so any other decorator (a user's own, ``enable_grad``,
    ``inference_mode``) is left in place.
    """
    if _NO_GRAD_CODE is None or getattr(fn, "__code__", None) is not _NO_GRAD_CODE or not fn.__closure__:
        return None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
    factory, body = cells.get("ctx_factory"), cells.get("func")
    if type(getattr(factory, "__self__", None)) is not torch.no_grad or not callable(body):
        return None
    return body


_NO_GRAD_CODE = getattr(torch.no_grad()(lambda: None), "__code__", None)


def _step_hooks_or_profiler(optimizer: torch.optim.Optimizer) -> bool:
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or _optim_module._global_optimizer_pre_hooks
        or _optim_module._global_optimizer_post_hooks
        or torch.autograd._profiler_enabled()
    )


def _global_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all gradients together (``clip_grad_norm_``'s norm)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
