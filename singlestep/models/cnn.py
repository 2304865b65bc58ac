"""``cnn``: a small convolutional network for 28x28 grey or 32x32 colour images."""

from __future__ import annotations

import torch
from torch import nn

from singlestep.data.base import DataMeta
from singlestep.errors import IncompatibleError
from singlestep.registry import MODELS

__all__ = ["CNN", "build_cnn"]


class CNN(nn.Module):
    """Stages of ``conv3x3 -> [batch norm] -> ReLU -> max-pool 2``, then ``Linear -> ReLU -> dropout -> Linear``.

    Each stage halves the height and width (rounding down): 28 -> 14 -> 7, 32 -> 16 -> 8.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: list[int],
        hidden: int,
        out_features: int,
        dropout: float,
        batch_norm: bool,
    ):
        super().__init__()
        c, h, w = input_shape
        stages: list[nn.Module] = []
        for width in channels:
            # Batch norm makes the conv bias redundant.
            stages.append(nn.Conv2d(c, width, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                stages.append(nn.BatchNorm2d(width))
            stages += [nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*stages)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, out_features))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [b, C, H, W] -> [b, out]


@MODELS.register("cnn", description="small conv net (conv-relu-pool stages, one hidden layer) for images")
def build_cnn(
    meta: DataMeta,
    *,
    channels: list[int] = [32, 64],  # noqa: B006 - the signature is the config schema; never mutated
    hidden: int = 128,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> CNN:
    """Build a CNN sized from an image dataset.

    Args:
        meta: the dataset's meta; its ``input_shape`` must be ``(channels, height, width)``.
        channels: output channels of each conv stage; each stage halves height and width.
        hidden: width of the fully connected hidden layer.
        dropout: drop probability before the output layer (0 adds no dropout layer).
        batch_norm: batch norm after each conv. Off by default: a per-sample step normalises over
            one sample, which batch statistics were not made for.
    """
    if meta.task == "lm":
        raise IncompatibleError("model 'cnn' does not take token windows; use model 'tiny_lm' for a text dataset")
    if len(meta.input_shape) != 3:
        raise IncompatibleError(
            f"model 'cnn' needs image inputs shaped (channels, height, width), but the data's input_shape is "
            f"{tuple(meta.input_shape)}; use model 'mlp' or 'linear'"
        )
    if not channels or any(width < 1 for width in channels):
        raise ValueError(f"channels must be a non-empty list of widths >= 1, got {list(channels)}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    _, h, w = meta.input_shape
    if min(h, w) >> len(channels) < 1:
        raise IncompatibleError(
            f"model 'cnn' with {len(channels)} stages halves {h}x{w} images to nothing; use at most "
            f"{min(h, w).bit_length() - 1} entries in channels"
        )
    out = meta.num_classes if meta.task == "classification" else meta.out_features
    return CNN(tuple(meta.input_shape), list(channels), hidden, int(out), dropout, batch_norm)
