"""The eager engine: plain PyTorch, no compilation, nothing to warm up."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from singlestep.engine.base import Engine, advance_schedule

__all__ = ["EagerEngine"]


class EagerEngine(Engine):
    """Steps executed op by op. Grads come from ``torch.autograd.grad`` (no ``zero_grad`` pass),
    norms and clipping use the ``_foreach`` kernels, and statistics stay on the device.
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

    def _flush(self) -> None:
        if not self._losses:
            return
        stats = self.stats
        norms = torch.stack(self._norms)
        stats.loss_sum += torch.stack(self._losses).sum()
        stats.norm_sum += norms.sum()
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
        grads = torch.autograd.grad(loss, self.params, grad_outputs=one, allow_unused=True)
        if self._used is None:
            self._used = [i for i, g in enumerate(grads) if g is not None]
            if not self._used:
                raise RuntimeError("the loss does not depend on any trainable parameter")
        return [grads[i] for i in self._used]

    def _apply(self, grads: list[Tensor], loss: Tensor) -> None:
        """Finite check, clip, optimizer step and scheduler step for one set of grads."""
        stats = self.stats
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pre-clip global L2
        stats.steps += 1
        # One host read (a sync on CUDA) instead of isfinite's several kernels and a read.
        if self.check_finite and not math.isfinite(float(norm + loss)):
            stats.skipped += 1
            self._schedule()  # the schedule counts steps taken, skipped or not
            return
        self._losses.append(loss)
        self._norms.append(norm)
        if self.clip_grad_value is not None:
            v = self.clip_grad_value
            torch._foreach_clamp_min_(grads, -v)
            torch._foreach_clamp_max_(grads, v)
            if self.clip_grad_norm is not None:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.clip_grad_norm is not None:
            # Same rule as torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6)).
            coef = (self.clip_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(grads, coef)
        for i, g in zip(self._used, grads):
            self.params[i].grad = g
        self.optimizer.step()
        self._schedule()

    def run_samples(self, idx: Tensor) -> None:
        model, loss_fn = self.model, self.loss_fn
        xs, ys = self.train.get(idx)  # one gather for the whole chunk: [k, ...]
        for j in range(idx.shape[0]):
            x, y = xs[j : j + 1], ys[j : j + 1]  # [1, ...] views
            loss = loss_fn(model(x), y)
            self._apply(self._grads(loss), loss.detach())
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
        self._apply(grads, loss_total)
        self._flush()
