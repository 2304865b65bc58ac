"""cifar10: both official layouts written in the real format, read back; hostile pickles refused."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from singlestep.data.cifar10 import MEAN, STD, build_cifar10, read_bin_batch, read_py_batch
from singlestep.errors import DataError

CPU = torch.device("cpu")
BIN = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
PY = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_batches(n: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six batches (five train, one test) of ``n`` images [n, 3072] in R, G, B plane order."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)) for _ in range(6)
    ]


def write_bin(folder: Path, batches) -> Path:
    folder = folder / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in zip(BIN, batches):
        (folder / name).write_bytes(np.concatenate([labels[:, None], data], axis=1).tobytes())
    return folder


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING opcodes), as the real files were made."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2's numpy lived at numpy.core; the files name that module.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_py(folder: Path, batches, style: str = "py3") -> Path:
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in zip(PY, batches):
        batch = {
            b"batch_label": b"batch",
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [b"x.png"] * len(labels),
        }
        if style == "py2":
            (folder / name).write_bytes(py2_pickle(batch))
        else:
            with (folder / name).open("wb") as f:
                pickle.dump(batch, f, protocol=4)
    return folder


def test_binary_layout_reads_records_in_channel_order(tmp_path):
    batches = make_batches()
    write_bin(tmp_path, batches)
    bundle = build_cifar10(CPU, root=str(tmp_path))
    assert bundle.train.inputs.shape == (15, 3, 32, 32) and bundle.train.inputs.dtype == torch.uint8
    assert bundle.test.inputs.shape == (3, 3, 32, 32)
    first = batches[0][0][0]
    assert torch.equal(bundle.train.inputs[0, 0], torch.from_numpy(first[:1024].reshape(32, 32)))  # red plane
    assert torch.equal(bundle.train.inputs[0, 2], torch.from_numpy(first[2048:].reshape(32, 32)))  # blue plane
    assert bundle.train.targets.tolist() == np.concatenate([b[1] for b in batches[:5]]).tolist()
    assert bundle.test.targets.tolist() == batches[5][1].tolist()
    meta = bundle.meta
    assert (meta.input_shape, meta.num_classes, meta.extras["class_names"][0]) == ((3, 32, 32), 10, "airplane")


def test_per_channel_normalisation(tmp_path):
    write_bin(tmp_path, make_batches())
    bundle = build_cifar10(CPU, root=str(tmp_path))
    x, _ = bundle.train.get(torch.tensor([4, 1]))
    raw = bundle.train.inputs[[4, 1]].float() / 255
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    x, _ = build_cifar10(CPU, root=str(tmp_path), normalize=False).train.get(torch.tensor([4, 1]))
    torch.testing.assert_close(x, raw)
    # The carve-out keeps per-channel statistics on both splits.
    carved = build_cifar10(CPU, root=str(tmp_path), val_size=5)
    xv, _ = carved.val.get(torch.tensor([0]))
    torch.testing.assert_close(xv, (carved.val.inputs[:1].float() / 255 - mean) / std)


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_python_layout_matches_binary(tmp_path, style):
    batches = make_batches()
    write_bin(tmp_path / "b", batches)
    write_py(tmp_path / "p", batches, style)
    from_bin = build_cifar10(CPU, root=str(tmp_path / "b"))
    from_py = build_cifar10(CPU, root=str(tmp_path / "p"))
    assert torch.equal(from_bin.train.inputs, from_py.train.inputs)
    assert torch.equal(from_bin.train.targets, from_py.train.targets)
    assert torch.equal(from_bin.test.inputs, from_py.test.inputs)


def test_root_may_be_the_batches_folder_and_auto_prefers_binary(tmp_path):
    write_py(tmp_path, make_batches(seed=1))
    folder = write_bin(tmp_path, make_batches(seed=2))
    binary = build_cifar10(CPU, root=str(folder))
    assert torch.equal(build_cifar10(CPU, root=str(tmp_path)).train.inputs, binary.train.inputs)
    py = build_cifar10(CPU, root=str(tmp_path), layout="py")
    assert not torch.equal(py.train.inputs, binary.train.inputs)
    assert py.meta.extras["source"].endswith("cifar-10-batches-py")
    with pytest.raises(ValueError, match="layout"):
        build_cifar10(CPU, root=str(tmp_path), layout="hdf5")


def test_incomplete_root_names_missing_batches(tmp_path):
    folder = write_bin(tmp_path, make_batches())
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3.bin") as err:
        build_cifar10(CPU, root=str(tmp_path))
    assert "download_data.py cifar10" in str(err.value)


def test_truncated_binary_batch_names_the_file(tmp_path):
    folder = write_bin(tmp_path, make_batches())
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="3073-byte") as err:
        build_cifar10(CPU, root=str(tmp_path))
    assert str(path) in str(err.value)


def test_binary_label_out_of_range(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(bytes([11]) + bytes(3072))
    with pytest.raises(DataError, match="label 11"):
        read_bin_batch(path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    with path.open("wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=4)
    with pytest.raises(DataError) as err:
        read_py_batch(path)
    msg = str(err.value)
    assert str(path) in msg and f"{os.system.__module__}.system" in msg and "refused" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")])
def test_only_numpy_array_globals_are_admitted(tmp_path, module, name):
    path = tmp_path / "batch"
    # A hand-made protocol-2 pickle calling module.name("x").
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R.")
    with pytest.raises(DataError, match=f"refused to unpickle global '{module}.{name}'"):
        read_py_batch(path)


def test_truncated_and_malformed_pickles_name_the_file(tmp_path):
    batches = make_batches()
    folder = write_py(tmp_path, batches)
    path = folder / "data_batch_1"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch") as err:
        read_py_batch(path)
    assert str(path) in str(err.value)
    for batch, match in [
        ([1, 2], "holds a list"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "float32 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "0..9"),
    ]:
        with path.open("wb") as f:
            pickle.dump(batch, f, protocol=4)
        with pytest.raises(DataError, match=match):
            read_py_batch(path)
