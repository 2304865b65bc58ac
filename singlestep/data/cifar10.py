"""``cifar10``: 60k 32x32 colour images in 10 classes, from either official layout.

* binary, ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
  ``test_batch.bin``, each a run of 3073-byte records: one label byte, then 1024 red, 1024 green and
  1024 blue bytes, rows top to bottom.
* python, ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a
  (Python 2) pickle of a dict with ``b"data"``: a uint8 array ``[10000, 3072]`` in the same channel
  order, and ``b"labels"``: a list of ints.

A pickle can run code while it loads, so the python layout is read with an unpickler that admits
only the globals numpy needs to rebuild an array; anything else is refused before it is called.
The binary layout needs no unpickling and is preferred when both are present.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from singlestep.data.base import DataBundle
from singlestep.data.images import image_bundle
from singlestep.data.sources import fetch_hint, locate
from singlestep.errors import DataError
from singlestep.registry import DATASETS

__all__ = ["CLASSES", "build_cifar10", "read_bin_batch", "read_py_batch"]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel statistics of the 50k training images, after scaling to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_RECORD = 1 + 3 * 32 * 32
_LAYOUTS = {
    "bin": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]),
    "py": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
}


def _needs(layouts: tuple[str, ...]) -> str:
    """The files a complete folder holds, in words, for the not-found message."""
    parts = (_LAYOUTS[layout] for layout in layouts)
    return " or ".join(f"{sub}/ with {train[0]} .. {train[-1]} and {test[0]}" for sub, train, test in parts)


def _batches_dir(folder: Path, layout: str) -> tuple[Path | None, list[str] | None]:
    """Where ``layout``'s batch files are under (or at) ``folder``; else what a partial copy lacks."""
    sub, train, test = _LAYOUTS[layout]
    partial: list[str] | None = None
    for candidate in (folder / sub, folder):
        lacking = [name for name in train + test if not (candidate / name).is_file()]
        if not lacking:
            return candidate, None
        if len(lacking) < len(train + test) and partial is None:
            partial = [f"{sub}/{name}" if candidate != folder else name for name in lacking]
    return None, partial


def _missing_for(layouts: tuple[str, ...]) -> Callable[[Path], list[str]]:
    def missing(folder: Path) -> list[str]:
        partials = []
        for layout in layouts:
            found, lacking = _batches_dir(folder, layout)
            if found is not None:
                return []
            if lacking:
                partials.append(lacking)
        if partials:
            return min(partials, key=len)
        return [" or ".join(f"{_LAYOUTS[layout][0]}/" for layout in layouts)]

    return missing


def read_bin_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` from one binary-layout batch file.

    Raises:
        DataError: the size is not a whole number of 3073-byte records, or a label is not 0..9.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data or len(data) % _RECORD:
        raise DataError(
            f"{path}: {len(data)} bytes is not a whole number of {_RECORD}-byte CIFAR-10 records (truncated?)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0]
    if int(labels.max()) > 9:
        raise DataError(f"{path}: label {int(labels.max())} is out of range 0..9; not a CIFAR-10 batch")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Exactly what a pickled numpy array needs: the rebuild function, ndarray and dtype."""
    try:  # numpy >= 2 moved the implementation to numpy._core; the files name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _BatchUnpickler(pickle.Unpickler):
    """Loads the dict of a CIFAR-10 python batch and refuses every other global."""

    def __init__(self, file: io.BufferedIOBase):
        # encoding="bytes": the files are Python 2 pickles whose str objects (keys, dtype codes,
        # raw array data) must stay bytes.
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj


def _get(batch: dict, key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_py_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` from one python-layout batch file.

    Raises:
        DataError: the pickle names anything but numpy's array globals (it is refused without being
            called), is truncated or malformed, or does not hold ``data``/``labels`` of the right shape.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"{path}: refused to unpickle global '{exc.name}' (nothing was called); a CIFAR-10 python batch "
            "holds only a dict of bytes, lists and numpy arrays, so this file is not one (or was tampered "
            "with); the binary layout (data.layout: bin) needs no unpickling"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, expected a dict with 'data' and 'labels'")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {got}, expected a uint8 array [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' is not a list of ints") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: 'data' holds 0 images")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but 'labels' has shape {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, found {int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _read_split(folder: Path, layout: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    reader = read_bin_batch if layout == "bin" else read_py_batch
    parts = [reader(folder / name) for name in names]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@DATASETS.register(
    "cifar10", description="CIFAR-10, 50k/10k 32x32 colour images in 10 classes (binary or python layout)"
)
def build_cifar10(
    device: torch.device,
    *,
    root: str | None = None,
    layout: str = "auto",
    normalize: bool = True,
    val_size: int = 0,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DataBundle:
    """CIFAR-10 from the official binary or python batches.

    Args:
        device: where every split is put, once.
        root: folder holding ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/`` (or one of those
            folders itself); unset searches the places listed in :mod:`singlestep.data.sources`.
        layout: ``auto`` (binary when present, else python), ``bin`` or ``py``.
        normalize: standardise each channel with the training set's mean/std; off scales to [0, 1] only.
        val_size: training images moved, seeded, into a validation split (0: none).
        seed: seed of that carve-out; independent of the run's seed so the split stays put.
        train_limit / test_limit: keep only the first N rows (after the carve-out) for quick runs.
    """
    if layout not in ("auto", "bin", "py"):
        raise ValueError(f"layout must be 'auto', 'bin' or 'py', got '{layout}'")
    layouts = ("bin", "py") if layout == "auto" else (layout,)
    options = "--layout py" if layouts == ("py",) else ""  # the script's default fetches the binary layout
    folder = locate("cifar10", root, _missing_for(layouts), needs=_needs(layouts), options=options)
    for name in layouts:
        batches, _ = _batches_dir(folder, name)
        if batches is not None:
            break
    assert batches is not None  # locate() checked
    _, train_names, test_names = _LAYOUTS[name]
    try:
        train_x, train_y = _read_split(batches, name, train_names)
        test_x, test_y = _read_split(batches, name, test_names)
    except DataError as exc:
        # The readers know the file but not where it came from; the way to a good copy is added here.
        raise DataError(f"{exc}; {fetch_hint('cifar10', folder, '--layout py' if name == 'py' else '')}") from None
    return image_bundle(
        device,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mean=MEAN,
        std=STD,
        class_names=CLASSES,
        normalize=normalize,
        val_size=val_size,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
        source=str(batches),
    )
