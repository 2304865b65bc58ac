"""The training loss is chosen by the dataset's task, so models return raw outputs only."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["loss_for", "summed_loss"]


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # [b*t, V]


def _regression_loss(output: Tensor, targets: Tensor) -> Tensor:
    return F.mse_loss(output, targets.reshape(output.shape))


def loss_for(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean loss over the batch: cross-entropy (classification, lm) or mean squared error (regression)."""
    return {"classification": F.cross_entropy, "regression": _regression_loss, "lm": _lm_loss}[task]


def summed_loss(task: str, output: Tensor, targets: Tensor) -> Tensor:
    """The loss summed (not averaged) over samples/tokens, for exact evaluation in chunks."""
    if task == "classification":
        return F.cross_entropy(output, targets, reduction="sum")
    if task == "lm":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1), reduction="sum")
    return F.mse_loss(output, targets.reshape(output.shape), reduction="sum")

