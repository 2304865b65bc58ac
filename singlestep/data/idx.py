"""``mnist`` and ``fashion_mnist``: 28x28 grey images and their labels in the IDX format.

The IDX format (LeCun's) is a big-endian header followed by raw bytes: a magic number
``0x00000803`` (2051: unsigned bytes, 3 dimensions) for image files and ``0x00000801`` (2049: unsigned
bytes, 1 dimension) for label files, then one 32-bit size per dimension, then the data. Files may be
gzipped (detected from their first bytes, not their name).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from singlestep.data.base import DataBundle
from singlestep.data.images import image_bundle
from singlestep.data.sources import cache_home, fetch_hint, locate
from singlestep.errors import DataError
from singlestep.registry import DATASETS

__all__ = ["IMAGE_MAGIC", "LABEL_MAGIC", "build_fashion_mnist", "build_mnist", "read_idx"]

IMAGE_MAGIC = 2051  # 0x0803: ubyte, 3 dims [N, rows, cols]
LABEL_MAGIC = 2049  # 0x0801: ubyte, 1 dim [N]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NEEDS = ", ".join(base for pair in _FILES.values() for base in pair) + " (each raw or .gz)"
_GZIP_MAGIC = b"\x1f\x8b"

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _file(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(folder: Path) -> list[str]:
    return [f"{base}[.gz]" for pair in _FILES.values() for base in pair if _file(folder, base) is None]


def _read(path: Path) -> bytes | bytearray:
    copy = _inflated_copy(path)
    if copy is not None and copy.is_file():
        try:
            return _read_writable(copy)
        except OSError:
            pass
    try:
        data = _read_writable(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
        if copy is not None:
            _write_copy(copy, data)
    return data


def _read_writable(path: Path) -> bytearray:
    """The file's bytes in a buffer of our own: arrays over it are writable, so the dataset can
    use them without the copy a read-only ``bytes`` would need (~0.14 s for Fashion-MNIST)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        got = f.readinto(buf)
        rest = f.read()  # empty for a regular file read whole; a pipe or a changed file has more or less
        if got != size or rest:
            return buf[:got] + rest
    return buf


# Gzipped files at least this big keep an inflated copy in the cache: inflating Fashion-MNIST's
# 26 MB of training images takes ~0.25 s of every run's start-up, reading 47 MB back ~0.03 s.
_INFLATE_CACHE_MIN_BYTES = 1 << 20


def _inflated_copy(path: Path) -> Path | None:
    """Where the inflated copy of a big gzipped file lives, keyed by its path, size and mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_size < _INFLATE_CACHE_MIN_BYTES or not path.name.endswith(".gz"):
        return None
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_home() / "inflated" / f"{path.name[:-3]}-{key}"


def _write_copy(copy: Path, data: bytes) -> None:
    """Best effort: a read-only or full cache only costs the next run its inflation again."""
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)  # atomic: a concurrent run reads a whole copy or none
    except OSError:
        pass


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes into a uint8 array shaped by its header.

    Args:
        path: the file, raw or gzipped.
        magic: the expected magic number, :data:`IMAGE_MAGIC` or :data:`LABEL_MAGIC`.

    Raises:
        DataError: wrong magic number, a header that does not fit, or a payload of the wrong size
            (the message names the file).
    """
    path = Path(path)
    data = _read(path)
    kind = {IMAGE_MAGIC: "image", LABEL_MAGIC: "label"}.get(magic, "IDX")
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header (truncated?)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: magic number {found} (0x{found:08x}) is not {magic} (0x{magic:08x}); not an IDX {kind} file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header of {ndim} sizes (truncated?)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    payload = len(data) - header
    if payload != expected:
        what = "truncated?" if payload < expected else "trailing bytes"
        raise DataError(f"{path}: header says shape {list(dims)} = {expected} bytes but {payload} follow ({what})")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _read_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 1, 28, 28]`` and labels ``[N]`` of one split, checked against each other."""
    image_base, label_base = _FILES[split]
    image_path, label_path = _file(folder, image_base), _file(folder, label_base)
    assert image_path is not None and label_path is not None  # locate() checked
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if images.shape[0] == 0:
        raise DataError(f"{image_path}: the header says 0 images; the {split} split needs at least one")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{label_path}: label {int(labels.max())} is out of range 0..9")
    return images[:, None], labels


def _build(
    name: str,
    device: torch.device,
    *,
    root: str | None,
    normalize: bool,
    val_size: int,
    seed: int,
    train_limit: int | None,
    test_limit: int | None,
    mean: float,
    std: float,
    classes: list[str],
) -> DataBundle:
    folder = locate(name, root, _missing, needs=_NEEDS)
    try:
        train_x, train_y = _read_pair(folder, "train")
        test_x, test_y = _read_pair(folder, "test")
    except DataError as exc:
        # read_idx knows the file but not the dataset; the way to a good copy is added here.
        raise DataError(f"{exc}; {fetch_hint(name, folder)}") from None
    return image_bundle(
        device,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mean=mean,
        std=std,
        class_names=classes,
        normalize=normalize,
        val_size=val_size,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
        source=str(folder),
    )


@DATASETS.register("mnist", description="MNIST handwritten digits, 60k/10k 28x28 grey images (IDX files)")
def build_mnist(
    device: torch.device,
    *,
    root: str | None = None,
    normalize: bool = True,
    val_size: int = 0,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DataBundle:
    """MNIST from its four IDX files.

    Args:
        device: where every split is put, once.
        root: folder holding the four files; unset searches the places listed in
            :mod:`singlestep.data.sources`.
        normalize: standardise with the training set's mean 0.1307 / std 0.3081; off scales to [0, 1] only.
        val_size: training images moved, seeded, into a validation split (0: none).
        seed: seed of that carve-out; independent of the run's seed so the split stays put.
        train_limit / test_limit: keep only the first N rows (after the carve-out) for quick runs.
    """
    return _build(
        "mnist", device, root=root, normalize=normalize, val_size=val_size, seed=seed,
        train_limit=train_limit, test_limit=test_limit, mean=0.1307, std=0.3081, classes=MNIST_CLASSES,
    )  # fmt: skip


@DATASETS.register("fashion_mnist", description="Fashion-MNIST clothing images, 60k/10k 28x28 grey (IDX files)")
def build_fashion_mnist(
    device: torch.device,
    *,
    root: str | None = None,
    normalize: bool = True,
    val_size: int = 0,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DataBundle:
    """Fashion-MNIST from its four IDX files (Debian's ``dataset-fashion-mnist`` package is found too).

    Args:
        device: where every split is put, once.
        root: folder holding the four files; unset searches the places listed in
            :mod:`singlestep.data.sources`, ending with ``/usr/share/datasets/fashion-mnist``.
        normalize: standardise with the training set's mean 0.2860 / std 0.3530; off scales to [0, 1] only.
        val_size: training images moved, seeded, into a validation split (0: none).
        seed: seed of that carve-out; independent of the run's seed so the split stays put.
        train_limit / test_limit: keep only the first N rows (after the carve-out) for quick runs.
    """
    return _build(
        "fashion_mnist", device, root=root, normalize=normalize, val_size=val_size, seed=seed,
        train_limit=train_limit, test_limit=test_limit, mean=0.2860, std=0.3530, classes=FASHION_CLASSES,
    )  # fmt: skip
