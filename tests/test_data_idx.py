"""mnist / fashion_mnist: IDX files written in the real format, read back and checked."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from singlestep.data.idx import IMAGE_MAGIC, LABEL_MAGIC, build_fashion_mnist, build_mnist, read_idx
from singlestep.errors import DataError

CPU = torch.device("cpu")
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_folder(
    folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0, gz_train: bool = False, gz_test: bool = True
):
    """The four MNIST files: train raw (by default), test gzipped, random pixels, labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "train-images-idx3-ubyte", idx_bytes(IMAGE_MAGIC, arrays["train_x"]), gz_train)
    write(folder / "train-labels-idx1-ubyte", idx_bytes(LABEL_MAGIC, arrays["train_y"]), gz_train)
    write(folder / "t10k-images-idx3-ubyte", idx_bytes(IMAGE_MAGIC, arrays["test_x"]), gz_test)
    write(folder / "t10k-labels-idx1-ubyte", idx_bytes(LABEL_MAGIC, arrays["test_y"]), gz_test)
    return arrays


def test_reads_raw_and_gzipped_files_exactly(tmp_path):
    arrays = make_idx_folder(tmp_path)
    bundle = build_mnist(CPU, root=str(tmp_path))
    assert bundle.val is None
    train, test = bundle.train, bundle.test
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (12, 1, 28, 28)
    assert test.inputs.shape == (5, 1, 28, 28)
    assert torch.equal(train.inputs[:, 0], torch.from_numpy(arrays["train_x"]))
    assert torch.equal(test.inputs[:, 0], torch.from_numpy(arrays["test_x"]))
    assert train.targets.dtype == torch.int64
    assert train.targets.tolist() == arrays["train_y"].tolist()
    assert test.targets.tolist() == arrays["test_y"].tolist()
    meta = bundle.meta
    assert (meta.task, meta.input_shape, meta.num_classes) == ("classification", (1, 28, 28), 10)
    assert meta.extras["class_names"] == [str(d) for d in range(10)]


def test_gather_normalises_with_dataset_constants(tmp_path):
    arrays = make_idx_folder(tmp_path)
    x, y = build_mnist(CPU, root=str(tmp_path)).train.get(torch.tensor([3, 0]))
    raw = torch.from_numpy(arrays["train_x"][[3, 0]]).float()[:, None]
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, (raw / 255 - 0.1307) / 0.3081)
    assert y.tolist() == [3, 0]
    x, _ = build_mnist(CPU, root=str(tmp_path), normalize=False).train.get(torch.tensor([3]))
    torch.testing.assert_close(x, raw[:1] / 255)


def test_fashion_uses_its_own_constants_and_class_names(tmp_path):
    arrays = make_idx_folder(tmp_path)
    bundle = build_fashion_mnist(CPU, root=str(tmp_path))
    x, _ = bundle.train.get(torch.tensor([0]))
    raw = torch.from_numpy(arrays["train_x"][:1]).float()[:, None]
    torch.testing.assert_close(x, (raw / 255 - 0.2860) / 0.3530)
    assert bundle.meta.extras["class_names"][0] == "T-shirt/top"
    assert bundle.meta.extras["class_names"][9] == "Ankle boot"


def test_validation_carve_out_is_seeded_and_disjoint(tmp_path):
    make_idx_folder(tmp_path, n_train=20)
    a = build_mnist(CPU, root=str(tmp_path), val_size=6, seed=1)
    b = build_mnist(CPU, root=str(tmp_path), val_size=6, seed=1)
    c = build_mnist(CPU, root=str(tmp_path), val_size=6, seed=2)
    assert (len(a.train), len(a.val)) == (14, 6)
    assert torch.equal(a.val.inputs, b.val.inputs)
    assert not torch.equal(a.val.inputs, c.val.inputs)
    rows = torch.cat([a.train.inputs, a.val.inputs]).flatten(1)
    full = build_mnist(CPU, root=str(tmp_path)).train.inputs.flatten(1)
    assert sorted(map(bytes, rows.numpy())) == sorted(map(bytes, full.numpy()))


def test_limits_keep_the_first_rows(tmp_path):
    arrays = make_idx_folder(tmp_path)
    bundle = build_mnist(CPU, root=str(tmp_path), train_limit=3, test_limit=2)
    assert (len(bundle.train), len(bundle.test)) == (3, 2)
    assert bundle.test.targets.tolist() == arrays["test_y"][:2].tolist()
    with pytest.raises(ValueError, match="train_limit"):
        build_mnist(CPU, root=str(tmp_path), train_limit=0)
    with pytest.raises(ValueError, match="val_size"):
        build_mnist(CPU, root=str(tmp_path), val_size=12)


@pytest.mark.parametrize("gz", [False, True])
def test_bad_magic_names_the_file(tmp_path, gz):
    images = np.zeros((2, 28, 28), np.uint8)
    path = write(tmp_path / "imgs", idx_bytes(LABEL_MAGIC, images), gz)
    with pytest.raises(DataError, match="magic number") as err:
        read_idx(path, IMAGE_MAGIC)
    assert str(path) in str(err.value)


def test_truncated_raw_file_names_the_file(tmp_path):
    data = idx_bytes(IMAGE_MAGIC, np.zeros((3, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(path, IMAGE_MAGIC)
    assert str(path) in str(err.value)
    path.write_bytes(data[:9])  # cut inside the header
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, IMAGE_MAGIC)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(idx_bytes(IMAGE_MAGIC, np.arange(5 * 784).reshape(5, 28, 28).astype(np.uint8)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(path, IMAGE_MAGIC)
    assert str(path) in str(err.value)


def test_trailing_bytes_are_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="trailing"):
        read_idx(path, LABEL_MAGIC)


def test_image_label_count_mismatch_names_both_files(tmp_path):
    make_idx_folder(tmp_path, n_train=12)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="12 images") as err:
        build_mnist(CPU, root=str(tmp_path))
    assert str(labels) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


def test_wrong_image_size_and_label_range(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(IMAGE_MAGIC, np.zeros((12, 27, 28), np.uint8)))
    with pytest.raises(DataError, match="27x28"):
        build_mnist(CPU, root=str(tmp_path))
    make_idx_folder(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(LABEL_MAGIC, np.full(12, 10, np.uint8)))
    with pytest.raises(DataError, match="label 10"):
        build_mnist(CPU, root=str(tmp_path))


def test_root_lacking_files_says_which(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\]") as err:
        build_mnist(CPU, root=str(tmp_path))
    assert "download_data.py mnist" in str(err.value)


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """Point every searched place into tmp_path: $SINGLESTEP_DATA, ./data and the cache."""
    monkeypatch.setenv("SINGLESTEP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_dataset_lists_where_it_looked(isolated_search):
    with pytest.raises(DataError) as err:
        build_mnist(CPU)
    msg = str(err.value)
    for place in (
        isolated_search / "env" / "mnist",
        isolated_search / "data" / "mnist",
        isolated_search / "cache" / "singlestep" / "mnist",
    ):
        assert str(place) in msg
    assert "scripts/download_data.py mnist" in msg


@pytest.mark.parametrize("place", ["env", "data", "cache/singlestep"])
def test_search_finds_each_known_place(isolated_search, place):
    make_idx_folder(isolated_search / place / "mnist", n_train=7)
    bundle = build_mnist(CPU)
    assert len(bundle.train) == 7
    assert bundle.meta.extras["source"] == str(isolated_search / place / "mnist")


def test_search_order_prefers_the_environment_variable(isolated_search):
    make_idx_folder(isolated_search / "env" / "mnist", n_train=7)
    make_idx_folder(isolated_search / "data" / "mnist", n_train=9)
    assert len(build_mnist(CPU).train) == 7


@pytest.mark.skipif(
    not (FASHION_DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian(isolated_search):
    bundle = build_fashion_mnist(CPU)  # nothing in the isolated places: falls through to the system folder
    assert bundle.meta.extras["source"] == str(FASHION_DEBIAN)
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert torch.bincount(bundle.train.targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.targets, minlength=10).tolist() == [1000] * 10
    x, _ = bundle.train.get(torch.arange(60000))
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3  # constants fit the data


def test_big_gzipped_file_keeps_an_inflated_copy(tmp_path, monkeypatch):
    """The second read of a big .gz skips inflation; a changed file gets a fresh copy."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1500, 28, 28), dtype=np.uint8)  # ~1.2 MB, incompressible
    path = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(IMAGE_MAGIC, images), gz=True)
    first = read_idx(path, IMAGE_MAGIC)
    copies = list((tmp_path / "xdg" / "singlestep" / "inflated").iterdir())
    assert len(copies) == 1 and copies[0].read_bytes() == idx_bytes(IMAGE_MAGIC, images)
    again = read_idx(path, IMAGE_MAGIC)
    np.testing.assert_array_equal(again, first)
    assert again.flags.writeable  # read into a buffer of our own: the dataset need not copy it
    changed = images.copy()
    changed[0, 0, 0] ^= 1
    write(path.with_suffix(""), idx_bytes(IMAGE_MAGIC, changed), gz=True)
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    np.testing.assert_array_equal(read_idx(path, IMAGE_MAGIC), changed)
    assert len(list((tmp_path / "xdg" / "singlestep" / "inflated").iterdir())) == 2


def test_raw_file_is_read_without_a_copy_into_the_dataset(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    path = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(IMAGE_MAGIC, images), gz=False)
    arr = read_idx(path, IMAGE_MAGIC)
    assert arr.flags.writeable and arr.flags.c_contiguous
    np.testing.assert_array_equal(arr, images)
    assert np.require(arr, requirements=["C_CONTIGUOUS", "WRITEABLE"]) is arr  # what images.split() asks for


def test_a_pipe_is_read_whole(tmp_path):
    """No size to read up front (st_size 0): the reader takes what the stream holds."""
    import os
    import threading

    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    fifo = tmp_path / "images-idx3-ubyte"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(idx_bytes(IMAGE_MAGIC, images)), daemon=True)
    writer.start()
    try:
        np.testing.assert_array_equal(read_idx(fifo, IMAGE_MAGIC), images)
    finally:
        writer.join(timeout=10)
