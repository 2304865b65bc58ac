"""Device-resident splits: the one shape every dataset hands to the trainer.

A dataset builder reads its files once and returns a :class:`DataBundle` whose splits live on the
training device. The hot loop only ever calls ``split.get(idx)`` with a tensor of indices: a gather
on the device, no Python per sample, no DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["DataMeta", "Split", "TensorSplit", "TokenSplit", "DataBundle", "carve_validation"]

Task = Literal["regression", "classification", "lm"]


@dataclass
class DataMeta:
    """What a model needs to size itself, and what the trainer needs to pick loss and metrics.

    Attributes:
        task: ``regression`` (MSE), ``classification`` (cross-entropy) or ``lm`` (next-token CE).
        input_shape: shape of one input sample, e.g. ``(784,)``, ``(1, 28, 28)``, ``(64,)`` for tokens.
        num_classes: classes for classification.
        out_features: targets per sample for regression.
        vocab_size / block_size: for language modelling.
        extras: anything else worth saving with the run (e.g. ``{"vocab": [...]}``, class names).
    """

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    out_features: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Split:
    """A split on the device; ``get(idx)`` returns ``(inputs, targets)`` for a batch of indices."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` for a batch of indices, gathered on the device."""
        return self.gather(self.tensors(), idx)

    def tensors(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        """Every tensor ``gather`` reads, by name: compiled engines pass these in as inputs."""
        raise NotImplementedError

    def gather(self, tensors: dict[str, Tensor], idx: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """``get`` written as a pure function of ``tensors()``, so it can be traced and compiled."""
        raise NotImplementedError

    def signature(self) -> str:
        """Everything besides ``tensors()`` that ``gather`` depends on (for compiled-code caches)."""
        return type(self).__name__

    def chunks(self, size: int, start: int = 0, stop: int | None = None):
        """Yield ``(inputs, targets)`` over samples ``[start, stop)`` (the whole split by default)
        in order, ``size`` samples at a time."""
        stop = len(self) if stop is None else stop
        device = self.device
        for first in range(start, stop, size):
            idx = torch.arange(first, min(first + size, stop), device=device)
            yield self.get(idx)


class TensorSplit(Split):
    """Inputs and targets indexed along dim 0.

    Inputs stored as uint8 stay uint8 on the device (4x smaller) and are turned into normalised
    floats only for the rows gathered: ``(x / 255 - mean) / std``.

    Args:
        inputs: ``[N, ...]`` float or uint8.
        targets: ``[N]`` int64 class labels, or ``[N, out]`` float regression targets.
        mean, std: normalisation applied to uint8 inputs after scaling to [0, 1]: one number for
            all inputs, or one per channel (dim 1 of ``inputs``, e.g. RGB images ``[N, 3, H, W]``).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        mean: float | tuple[float, ...] = 0.0,
        std: float | tuple[float, ...] = 1.0,
    ):
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[0]} rows but targets {targets.shape[0]}")
        self.inputs = inputs
        self.targets = targets
        self.mean = _scalar_or_tuple(mean)
        self.std = _scalar_or_tuple(std)
        # Per-channel normalisation: x * scale + shift with [C, 1, ...] tensors made once, here,
        # so the hot path does one fused multiply-add and no host work.
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None
        if isinstance(self.mean, tuple) or isinstance(self.std, tuple):
            if inputs.dim() < 2:
                raise ValueError("per-channel mean/std needs inputs with a channel dimension (dim 1)")
            channels = inputs.shape[1]
            for name, value in (("mean", self.mean), ("std", self.std)):
                if isinstance(value, tuple) and len(value) != channels:
                    raise ValueError(f"{name} has {len(value)} values but inputs have {channels} channels")
            mean_t = torch.tensor(self.mean, dtype=torch.float32).expand(channels)
            std_t = torch.tensor(self.std, dtype=torch.float32).expand(channels)
            view = (channels,) + (1,) * (inputs.dim() - 2)
            self._scale = (1.0 / (255.0 * std_t)).reshape(view).to(inputs.device)
            self._shift = (-mean_t / std_t).reshape(view).to(inputs.device)

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        out = {"inputs": self.inputs, "targets": self.targets}
        if self._scale is not None:
            out["scale"], out["shift"] = self._scale, self._shift
        return out

    def _row_words(self, inputs: Tensor) -> Tensor | None:
        """uint8 rows seen as int64 words: gathering 8 bytes at a time is ~10x faster."""
        row = inputs[0].numel() if inputs.shape[0] else 0
        if inputs.dtype != torch.uint8 or row % 8 or not inputs.is_contiguous():
            return None
        return inputs.view(inputs.shape[0], row).view(torch.int64)

    def gather(self, tensors: dict[str, Tensor], idx: Tensor) -> tuple[Tensor, Tensor]:
        inputs = tensors["inputs"]
        words = self._row_words(inputs)
        if words is not None:
            x = words.index_select(0, idx.reshape(-1)).view(torch.uint8).view(-1, *inputs.shape[1:])
        else:
            x = inputs[idx]
        return self._convert(x, tensors), tensors["targets"][idx]

    def chunks(self, size: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        for first in range(start, stop, size):  # contiguous rows: slices, no gather
            end = min(first + size, stop)
            yield self._convert(self.inputs[first:end]), self.targets[first:end]

    def _convert(self, x: Tensor, tensors: dict[str, Tensor] | None = None) -> Tensor:
        """uint8 rows to normalised floats (other dtypes pass through)."""
        if x.dtype != torch.uint8:
            return x
        tensors = self.tensors() if tensors is None else tensors
        if "scale" in tensors:
            return x.float() * tensors["scale"] + tensors["shift"]  # per channel: [b, C, ...] * [C, 1, ...]
        # One fused expression: (x/255 - mean)/std == x * a + b.
        return x.float() * (1.0 / (255.0 * self.std)) + (-self.mean / self.std)

    def signature(self) -> str:
        return f"TensorSplit(mean={self.mean}, std={self.std})"

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.inputs.to(device), self.targets.to(device), mean=self.mean, std=self.std)


class TokenSplit(Split):
    """A token stream cut into windows: sample ``i`` is ``tokens[s:s+B]``, targets ``tokens[s+1:s+B+1]``.

    The window starts at ``s = i * stride``. With the default ``stride`` 1 every start offset is a
    sample, so ``len == len(tokens) - block_size``. ``stride == block_size`` gives non-overlapping
    windows, each token predicted once: what an evaluation split wants (overlapping windows would
    cost ``block_size`` times as much for the same tokens).
    """

    def __init__(self, tokens: Tensor, block_size: int, stride: int = 1):
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor")
        if tokens.numel() <= block_size:
            raise ValueError(f"{tokens.numel()} tokens is too few for block_size {block_size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride
        self._offsets = torch.arange(block_size, device=tokens.device)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def __len__(self) -> int:
        return (self.tokens.numel() - self.block_size - 1) // self.stride + 1

    def tensors(self) -> dict[str, Tensor]:
        return {"tokens": self.tokens, "offsets": self._offsets}

    def gather(self, tensors: dict[str, Tensor], idx: Tensor) -> tuple[Tensor, Tensor]:
        start = idx.reshape(-1, 1)
        if self.stride != 1:
            start = start * self.stride
        pos = start + tensors["offsets"]  # [b, block]
        tokens = tensors["tokens"]
        return tokens[pos].long(), tokens[pos + 1].long()

    def signature(self) -> str:
        return f"TokenSplit(block_size={self.block_size}, stride={self.stride})"


@dataclass
class DataBundle:
    """The splits of one dataset, resident on the device, and their meta."""

    train: Split
    val: Split | None
    test: Split | None
    meta: DataMeta

    def splits(self) -> dict[str, Split]:
        """The evaluation splits that exist, by name."""
        return {k: s for k, s in (("val", self.val), ("test", self.test)) if s is not None}


def _scalar_or_tuple(value: float | tuple[float, ...] | list[float]) -> float | tuple[float, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return float(value)


def carve_validation(train: TensorSplit, val_size: int, seed: int) -> tuple[TensorSplit, TensorSplit | None]:
    """Move ``val_size`` seeded-random rows of ``train`` into a validation split."""
    if val_size <= 0:
        return train, None
    n = len(train)
    if val_size >= n:
        raise ValueError(f"val_size {val_size} leaves no training data out of {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(train.device)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    mk = lambda i: TensorSplit(train.inputs[i], train.targets[i], mean=train.mean, std=train.std)  # noqa: E731
    return mk(train_idx), mk(val_idx)
