"""``mlp``: a fully connected network on flattened inputs, for class or regression data."""

from __future__ import annotations

import math

import torch
from torch import nn

from singlestep.data.base import DataMeta
from singlestep.errors import IncompatibleError
from singlestep.registry import MODELS

__all__ = ["ACTIVATIONS", "MLP", "build_mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """``Linear -> activation -> dropout`` per hidden layer, then a linear output layer."""

    def __init__(self, in_features: int, hidden_sizes: list[int], out_features: int, activation: str, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # [b, ...] -> [b, out]


@MODELS.register("mlp", description="fully connected network: hidden layers with an activation, optional dropout")
def build_mlp(
    meta: DataMeta,
    *,
    hidden_sizes: list[int] = [256],  # noqa: B006 - the signature is the config schema; never mutated
    activation: str = "relu",
    dropout: float = 0.0,
) -> MLP:
    """Build an MLP sized from the dataset.

    Args:
        meta: the dataset's meta; classification uses ``num_classes`` outputs, regression ``out_features``.
        hidden_sizes: widths of the hidden layers, input side first (``[]`` is a linear model).
        activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
        dropout: drop probability after each hidden activation (0 adds no dropout layers).
    """
    if meta.task == "lm":
        raise IncompatibleError("model 'mlp' does not take token windows; use model 'tiny_lm' for a text dataset")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'")
    if any(size < 1 for size in hidden_sizes):
        raise ValueError(f"hidden_sizes must all be >= 1, got {list(hidden_sizes)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    out = meta.num_classes if meta.task == "classification" else meta.out_features
    return MLP(math.prod(meta.input_shape), list(hidden_sizes), int(out), activation, dropout)
