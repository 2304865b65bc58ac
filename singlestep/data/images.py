"""Shared tail of the image-classification datasets: arrays in, a device-resident bundle out."""

from __future__ import annotations

import numpy as np
import torch

from singlestep.data.base import DataBundle, DataMeta, TensorSplit, carve_validation

__all__ = ["image_bundle"]


def _plain(value: float | tuple[float, ...]) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value  # JSON/YAML-friendly


def _check_limit(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{key} must be >= 1 or null, got {value}")


def image_bundle(
    device: torch.device,
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    class_names: list[str],
    normalize: bool,
    val_size: int,
    seed: int,
    train_limit: int | None,
    test_limit: int | None,
    source: str,
) -> DataBundle:
    """Move uint8 images ``[N, C, H, W]`` and labels ``[N]`` to ``device`` once and build the splits.

    ``val_size`` rows are carved, seeded, out of the training set first; ``train_limit`` then keeps
    the first rows of what remains (a seeded random subset when a carve-out shuffled them, the file's
    own order otherwise) and ``test_limit`` the first test rows. Pixels stay uint8 on the device and
    are normalised per gathered batch.
    """
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    if not normalize:
        mean, std = 0.0, 1.0  # still scaled to [0, 1]

    def split(x: np.ndarray, y: np.ndarray) -> TensorSplit:
        # Parsers may hand out read-only views of the file bytes (a first inflation); those are copied once here.
        x = np.require(x, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        inputs = torch.from_numpy(x).to(device)
        targets = torch.from_numpy(y.astype(np.int64)).to(device)
        return TensorSplit(inputs, targets, mean=mean, std=std)

    train, val = carve_validation(split(train_x, train_y), val_size, seed)
    if train_limit is not None and train_limit < len(train):
        # clone: a view would keep the whole carved tensor alive on the device.
        keep = slice(0, train_limit)
        train = TensorSplit(train.inputs[keep].clone(), train.targets[keep].clone(), mean=train.mean, std=train.std)
    if test_limit is not None:  # copies: a view would keep the whole file's buffer alive
        test_x, test_y = test_x[:test_limit].copy(), test_y[:test_limit].copy()
    test = split(test_x, test_y)
    meta = DataMeta(
        task="classification",
        input_shape=tuple(int(d) for d in train_x.shape[1:]),
        num_classes=len(class_names),
        extras={"class_names": list(class_names), "source": source, "mean": _plain(mean), "std": _plain(std)},
    )
    return DataBundle(train=train, val=val, test=test, meta=meta)
