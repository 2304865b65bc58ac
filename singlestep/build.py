"""Everything a config names, built: data, model, loss, optimizer, schedule and engine.

The trainer calls :func:`build` once; what comes back is plain objects, so a test (or a notebook)
can build a run's parts without training it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from singlestep.config import COMPONENTS, Component, Config
from singlestep.data.base import DataBundle
from singlestep.engine import Engine, build_engine
from singlestep.engine.step import GradTransform
from singlestep.errors import ConfigError, UserError, first_line
from singlestep.loop_state import steps_per_epoch
from singlestep.losses import loss_for
from singlestep.optim.build import build_optimizer

__all__ = ["Built", "build", "build_component"]


def build_component(key: str, component: Component, *runtime: Any) -> Any:
    """Call a registered builder; a ValueError/TypeError from it is a config error at ``key``."""
    registry, _ = COMPONENTS[key]
    builder = registry.get(component.name)
    try:
        return builder(*runtime, **component.kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key} ({component.name}): {exc}") from None


@dataclass
class Built:
    """A run's parts, as the trainer uses them."""

    data: DataBundle
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    decay_counts: dict[str, int]
    scheduler: Any
    engine: Engine
    steps_per_epoch: int
    total_steps: int


def build(cfg: Config, device: torch.device, *, engine: str, log: Callable[[str], None],
          grad_transforms: tuple[GradTransform, ...] = ()) -> Built:  # fmt: skip
    """Build the parts ``cfg`` names on ``device``; ``engine``: the engine to run the steps (the
    config's, or eager where the launch does not allow another); ``grad_transforms``: the step's
    first stage (``engine/step.py``), e.g. the all-reduce under torchrun."""
    t = cfg.trainer
    data: DataBundle = build_component("data", cfg.data, device)
    meta = data.meta
    if len(data.train) == 0:
        raise ConfigError(f"data ({cfg.data.name}): the training split is empty")
    model = build_component("model", cfg.model, meta).to(device)
    loss_fn = loss_for(meta.task)
    _check_fit(cfg, data, model, loss_fn)
    optimizer_cls = COMPONENTS["optimizer"][0].get(cfg.optimizer.name)
    optimizer, decay_counts = build_optimizer(
        model, optimizer_cls, cfg.optimizer.kwargs, param_groups=cfg.param_groups, no_decay=cfg.no_decay
    )
    per_epoch = steps_per_epoch(len(data.train), t.mode, t.batch_size, t.grad_accum_steps)
    total_steps = per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = build_component("scheduler", cfg.scheduler, optimizer, total_steps)
    step_engine = build_engine(
        engine, model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
        train=data.train, clip_grad_norm=t.clip_grad_norm, clip_grad_value=t.clip_grad_value,
        check_finite=t.check_finite, chunk_size=t.chunk_size, grad_transforms=grad_transforms,
        batch_shape=(t.grad_accum_steps, t.batch_size) if t.mode == "minibatch" else None,
        total_steps=total_steps, log=log,
    )  # fmt: skip
    return Built(data, model, loss_fn, optimizer, decay_counts, scheduler, step_engine, per_epoch, total_steps)


def _check_fit(cfg: Config, data: DataBundle, model: nn.Module, loss_fn: Callable) -> None:
    """Run one sample through model and loss, so a mismatch is a config error, not a mid-run crash."""
    x, y = data.train.get(torch.zeros(1, dtype=torch.long, device=data.train.device))
    was_training = model.training
    model.eval()  # one sample: BatchNorm refuses it in training mode
    try:
        with torch.no_grad():
            loss_fn(model(x), y)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"model '{cfg.model.name}' does not fit data '{cfg.data.name}' "
            f"(input {tuple(x.shape[1:])}, task {data.meta.task}): {first_line(exc)}"
        ) from None
    finally:
        model.train(was_training)
