"""``synthetic_regression``: y = x W* + b* + noise, generated from its own seed, no files."""

from __future__ import annotations

import torch

from singlestep.data.base import DataBundle, DataMeta, TensorSplit
from singlestep.registry import DATASETS

__all__ = ["build_synthetic_regression", "build_points"]


@DATASETS.register("synthetic_regression", description="linear data y = xW + b + noise from a seed (no download)")
def build_synthetic_regression(
    device: torch.device,
    *,
    in_features: int = 16,
    out_features: int = 1,
    train_size: int = 2000,
    val_size: int = 500,
    test_size: int = 500,
    noise: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    """Gaussian inputs, a random true linear map, Gaussian label noise of std ``noise``.

    The data has its own ``seed`` so changing the run's seed changes initialisation and sample
    order but not the problem.
    """
    for key, value in (("in_features", in_features), ("out_features", out_features), ("train_size", train_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, out_features, generator=g) / in_features**0.5
    b = torch.randn(out_features, generator=g)

    def make(n: int) -> TensorSplit | None:
        if n <= 0:
            return None
        x = torch.randn(n, in_features, generator=g)
        y = x @ w + b + noise * torch.randn(n, out_features, generator=g)
        return TensorSplit(x.to(device), y.to(device))

    train, val, test = make(train_size), make(val_size), make(test_size)
    meta = DataMeta(task="regression", input_shape=(in_features,), out_features=out_features)
    return DataBundle(train=train, val=val, test=test, meta=meta)


@DATASETS.register("points", description="a handful of (x, y) points given inline in the config")
def build_points(
    device: torch.device,
    *,
    x: list[float],
    y: list[float],
    test_x: list[float] | None = None,
    test_y: list[float] | None = None,
) -> DataBundle:
    """One-feature regression on points written in the YAML (the classic y = x toy problem)."""
    if len(x) != len(y) or not x:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")

    def col(v: list[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32, device=device).reshape(-1, 1)

    test = None
    if test_x is not None or test_y is not None:
        if test_x is None or test_y is None or len(test_x) != len(test_y):
            raise ValueError("test_x and test_y must be given together, with equal lengths")
        test = TensorSplit(col(test_x), col(test_y))
    meta = DataMeta(task="regression", input_shape=(1,), out_features=1)
    return DataBundle(train=TensorSplit(col(x), col(y)), val=None, test=test, meta=meta)
