"""Where the training loop is: the state a checkpoint captures to resume exactly, and the count
of steps an epoch takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoopState", "steps_per_epoch"]


@dataclass
class LoopState:
    """Where the loop is: enough to capture in a checkpoint and resume exactly.

    Attributes:
        step: optimizer steps taken so far.
        epoch: completed epochs.
        pos: position within ``order`` of the next sample.
        order: this epoch's shuffled sample order (CPU int64), or None between epochs.
        generator: the shuffle RNG; each epoch's order is ``randperm`` drawn from it.
    """

    seed: int
    step: int = 0
    epoch: int = 0
    pos: int = 0
    order: torch.Tensor | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.generator.manual_seed(self.seed)

    def new_epoch(self, n: int) -> torch.Tensor:
        """Draw the next epoch's order. Drawn on the CPU so the order is the same on any device."""
        self.order = torch.randperm(n, generator=self.generator)
        self.pos = 0
        return self.order

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "epoch": self.epoch, "pos": self.pos,
                "order": self.order, "rng": self.generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step, self.epoch, self.pos = state["seed"], state["step"], state["epoch"], state["pos"]
        self.order = state["order"]
        self.generator.set_state(state["rng"])


def steps_per_epoch(n: int, mode: str, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one pass over ``n`` samples (a short last step is kept)."""
    return n if mode == "per_sample" else math.ceil(n / (batch_size * grad_accum_steps))
