"""``linear``: linear regression, or a softmax (multinomial logistic) classifier on class data."""

from __future__ import annotations

import math

import torch
from torch import nn

from singlestep.data.base import DataMeta
from singlestep.errors import IncompatibleError
from singlestep.registry import MODELS

__all__ = ["Linear", "build_linear"]


class Linear(nn.Module):
    """``y = x W^T + b`` on flattened inputs; logits when the task is classification."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))  # [b, in] -> [b, out]


@MODELS.register("linear", description="linear regression, or a softmax classifier on class data")
def build_linear(meta: DataMeta, *, bias: bool = True, zero_init: bool = False) -> Linear:
    """Build a linear model sized from the dataset.

    Args:
        meta: the dataset's meta; regression uses ``out_features``, classification ``num_classes``.
        bias: learn an intercept.
        zero_init: start from all-zero weights (the classic convex setting; torch's default otherwise).
    """
    if meta.task == "lm":
        raise IncompatibleError("model 'linear' does not take token windows; use model 'tiny_lm' for a text dataset")
    in_features = math.prod(meta.input_shape)
    out = meta.num_classes if meta.task == "classification" else meta.out_features
    model = Linear(in_features, int(out), bias=bias)
    if zero_init:
        nn.init.zeros_(model.fc.weight)
        if bias:
            nn.init.zeros_(model.fc.bias)
    return model
