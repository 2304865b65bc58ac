"""The engine interface the trainer calls, and the device-side statistics every engine keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from singlestep import _compat as compat
from singlestep.data.base import Split
from singlestep.engine.step import GradTransform, StepRule

__all__ = ["Engine", "StepStats", "advance_schedule", "lr_only", "set_lrs"]


def set_lrs(groups: list[dict], lrs: list[Any]) -> None:
    """Give each param group its lr; a tensor lr is filled in place (no new tensor, no sync)."""
    for group, lr in zip(groups, lrs):
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_only(scheduler: Any) -> bool:
    """Whether ``scheduler`` changes nothing but the groups' lr (``LambdaLR``: every built-in
    schedule), so a chunk of steps can take its lrs from a table made up front."""
    return type(scheduler) is torch.optim.lr_scheduler.LambdaLR


def advance_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, k: int) -> list[list[float]]:
    """Advance ``scheduler`` by ``k`` steps; return the lr of each group for each of those steps.

    ``LambdaLR`` (every built-in schedule) is advanced in closed form: the same numbers as ``k``
    calls of ``scheduler.step()`` without its per-call Python overhead, which would cost as much
    as a whole per-sample step. Any other scheduler is stepped for real.
    """
    groups = optimizer.param_groups
    if scheduler is None:
        return [[float(g["lr"]) for g in groups]] * k
    if not lr_only(scheduler) or not compat.lambda_lr_closed_form_ok():
        rows = []
        for _ in range(k):
            rows.append([float(g["lr"]) for g in groups])
            scheduler.step()
        return rows
    start = scheduler.last_epoch
    pairs = list(zip(scheduler.base_lrs, scheduler.lr_lambdas))
    rows = [[float(g["lr"]) for g in groups]]
    if k > 8 and all(hasattr(fn, "many") for _, fn in pairs):
        # Built-in schedules over the whole chunk at once: one numpy call instead of k lambdas.
        steps = np.arange(start + 1, start + k + 1)
        table = np.stack([base * np.asarray(fn.many(steps), dtype=np.float64) for base, fn in pairs], axis=1)
        rows += table[:-1].tolist()
        new = table[-1].tolist()
    else:
        rows += [[base * fn(start + j) for base, fn in pairs] for j in range(1, k)]
        new = [base * fn(start + k) for base, fn in pairs]
    set_lrs(groups, new)
    compat.advance_lambda_lr(scheduler, k, new)
    return rows


class StepStats:
    """Per-window sums kept on the device: read (one sync) and reset at each log event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # In place: a captured CUDA graph (and a compiled chunk) keeps writing into these tensors.
        if hasattr(self, "loss_sum"):
            torch._foreach_zero_([self.loss_sum, self.norm_sum, self.norm_max, self.skipped])
        else:
            z = lambda: torch.zeros((), dtype=torch.float32, device=self.device)  # noqa: E731
            self.loss_sum, self.norm_sum, self.norm_max, self.skipped = z(), z(), z(), z()
        self.steps = 0  # host-side: the trainer knows how many steps it asked for

    def state_dict(self) -> dict[str, Any]:
        """The window's sums so far, for a checkpoint taken between log events."""
        return {"loss_sum": self.loss_sum.clone(), "norm_sum": self.norm_sum.clone(),
                "norm_max": self.norm_max.clone(), "skipped": self.skipped.clone(), "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("loss_sum", "norm_sum", "norm_max", "skipped"):
            getattr(self, name).copy_(state[name])  # in place: compiled chunks hold these tensors
        self.steps = state["steps"]

    def add(self, sums: dict[str, float]) -> None:
        """Add another process's window (:meth:`sums`): a hogwild worker's steps."""
        self.loss_sum += sums["loss_sum"]
        self.norm_sum += sums["norm_sum"]
        self.norm_max.clamp_(min=sums["norm_max"])
        self.skipped += sums["skipped"]
        self.steps += sums["steps"]

    def sums(self) -> dict[str, float]:
        """The window's sums as host numbers (syncs the device), for :meth:`add` elsewhere."""
        loss_sum, norm_sum, norm_max, skipped = torch.stack(
            [self.loss_sum, self.norm_sum, self.norm_max, self.skipped]
        ).tolist()
        return {"loss_sum": loss_sum, "norm_sum": norm_sum, "norm_max": norm_max, "skipped": skipped, "steps": self.steps}

    def read(self) -> dict[str, float]:
        """Means over the window since the last read, then a new window. This syncs the device."""
        out = self.peek()
        self.reset()
        return out

    def peek(self) -> dict[str, float]:
        """Means over the window so far, which goes on. This syncs the device."""
        loss_sum, norm_sum, norm_max, skipped = torch.stack(
            [self.loss_sum, self.norm_sum, self.norm_max, self.skipped]
        ).tolist()  # one sync for all four
        taken = self.steps - int(skipped)
        nan = float("nan")  # a window whose steps were all skipped has no loss (not 0)
        out = {"loss": loss_sum / taken if taken else nan, "grad_norm": norm_sum / taken if taken else nan,
               "grad_norm_max": norm_max if taken else nan, "skipped_steps": int(skipped), "steps": self.steps}  # fmt: skip
        return out


@dataclass
class Engine:
    """Base of all engines: the objects a step needs, its rule, and the statistics it accumulates.

    Attributes:
        model: the module being trained (its trainable parameters are the optimizer's).
        loss_fn: ``(output, targets) -> mean loss``.
        optimizer: any ``torch.optim.Optimizer``; it reads ``p.grad``.
        scheduler: stepped after every optimizer step, or None.
        train: the training split; engines gather batches from it with ``train.get(idx)``.
        clip_grad_norm / clip_grad_value: global-norm and element-wise clipping (None = off).
        check_finite: skip steps with a non-finite loss or grad norm.
        grad_transforms: functions of ``(grads, loss)`` run first in every step (see ``step.py``).
        max_chunk: the most per-sample steps the trainer hands over in one ``run_samples`` call.
    """

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    train: Split
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    check_finite: bool = True
    grad_transforms: tuple[GradTransform, ...] = ()

    name: ClassVar[str] = "base"
    max_chunk: int = field(default=256, init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.stats = StepStats(self.train.device)
        self.rule = StepRule(self.clip_grad_norm, self.clip_grad_value, self.check_finite, tuple(self.grad_transforms))

    @property
    def label(self) -> str:
        """The engine as the run summary reports it."""
        return self.name

    def run_samples(self, idx: Tensor) -> None:
        """Run ``len(idx)`` per-sample steps, one optimizer step per index, in order."""
        raise NotImplementedError

    def run_samples_at(self, idx: Tensor, rows: list[list[float]] | None) -> None:
        """``run_samples`` with the schedule already advanced: ``rows[i]`` is step i's lr per group
        (None: the groups' own); the groups' lrs are left as the schedule left them."""
        raise NotImplementedError

    def run_batch(self, micro_batches: list[Tensor], total: int | None = None) -> None:
        """Run one optimizer step over the summed gradients of these micro-batches, each weighted
        by its share of ``total`` samples (default: theirs; under torchrun, the global batch's)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Move statistics gathered per step into ``stats`` (nothing to move by default)."""

    def close(self) -> None:
        """Release what the engine holds beyond the run's objects (worker processes)."""

    def read(self) -> dict[str, float]:
        """Window statistics since the last read (syncs the device)."""
        return self.stats.read()

    def peek(self) -> dict[str, float]:
        """The window's statistics so far, without starting a new window (syncs the device)."""
        return self.stats.peek()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue with the same numbers: the unread statistics (the
        trainer checkpoints between calls, when no per-step value is pending)."""
        return {"name": self.name, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
