"""Where dataset files are found on disk, and where the download script fetches them from.

Search order when a dataset's ``root`` is unset (first complete folder wins):

1. ``$SINGLESTEP_DATA/<name>`` when that variable is set
2. ``./data/<name>`` (relative to the working directory)
3. ``$XDG_CACHE_HOME/singlestep/<name>``, by default ``~/.cache/singlestep/<name>``
   (where ``scripts/download_data.py`` puts files unless told otherwise)
4. system folders packaged by the OS, e.g. Debian's ``dataset-fashion-mnist`` at
   ``/usr/share/datasets/fashion-mnist``
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from singlestep.errors import DataError

__all__ = [
    "REMOTE",
    "SYSTEM_DIRS",
    "RemoteFile",
    "cache_home",
    "default_root",
    "fetch_hint",
    "locate",
    "search_dirs",
]

# Folders an OS package installs a dataset into; searched last.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}
# The OS package that fills those folders, named in the messages that say how to get the files.
SYSTEM_PACKAGES: dict[str, str] = {
    "fashion_mnist": "dataset-fashion-mnist",
}


@dataclass(frozen=True)
class RemoteFile:
    """One published file: where it lives, its size in bytes and its SHA-256."""

    name: str
    url: str
    size: int
    sha256: str


# SHA-256 sums are the ones published alongside these exact files by TensorFlow Datasets'
# url_checksums (mnist.txt, fashion_mnist.txt, cifar10.txt) and Keras' cifar10.load_data, and
# cross-checked against other independent projects pinning the same bytes. The MNIST files on the
# ossci-datasets mirror are byte-identical copies of Yann LeCun's originals (same size and the MD5
# torchvision pins: f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...). The CIFAR-10 MD5s from the
# dataset page are c32a1d4ab5d03f1284b67883e8d87530 (binary) and c58f30108f718f92721af3b95e74349a
# (python). Debian's repackaged Fashion-MNIST .gz files differ byte-wise from zalando's (other sizes
# and MD5s), so the system folder is never checked against these sums, only parsed.
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# zalando's bucket is served as an S3 website, which is plain http only; the SHA-256 check is what
# makes the download trustworthy.
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

REMOTE: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            _MNIST_URL + "train-images-idx3-ubyte.gz",
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            _MNIST_URL + "train-labels-idx1-ubyte.gz",
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            _MNIST_URL + "t10k-images-idx3-ubyte.gz",
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            _MNIST_URL + "t10k-labels-idx1-ubyte.gz",
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
    "fashion_mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            _FASHION_URL + "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            _FASHION_URL + "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_URL + "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    # The binary layout is the default download: reading it needs no unpickling at all.
    "cifar10": (
        RemoteFile(
            "cifar-10-binary.tar.gz",
            _CIFAR_URL + "cifar-10-binary.tar.gz",
            170052171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        ),
    ),
    "cifar10_py": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            _CIFAR_URL + "cifar-10-python.tar.gz",
            170498071,
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    ),
}


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/singlestep``, by default ``~/.cache/singlestep``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "singlestep"


def default_root(name: str) -> Path:
    """Where the download script puts dataset ``name`` when no ``--root`` is given."""
    env = os.environ.get("SINGLESTEP_DATA")
    return Path(env) / name if env else cache_home() / name


def search_dirs(name: str) -> list[Path]:
    """The folders searched, in order, for dataset ``name`` when its ``root`` is unset."""
    dirs: list[Path] = []
    env = os.environ.get("SINGLESTEP_DATA")
    if env:
        dirs.append(Path(env) / name)
    dirs.append(Path.cwd() / "data" / name)
    dirs.append(cache_home() / name)
    dirs.extend(Path(p) for p in SYSTEM_DIRS.get(name, ()))
    return dirs


def fetch_hint(name: str, folder: Path | None = None, options: str = "") -> str:
    """How to get dataset ``name``'s files, as the tail of a message.

    Args:
        name: dataset name, as the download script takes it.
        folder: where the files belong (``--root``); unset names ``DIR`` and its default.
        options: extra download-script options, e.g. ``--layout py``.
    """
    opts = f" {options}" if options else ""
    package = SYSTEM_PACKAGES.get(name)
    if folder is not None and package and str(folder) in SYSTEM_DIRS.get(name, ()):
        # The OS package owns that folder: the script must not write there, apt repairs it.
        return f"reinstall the package with `apt-get install --reinstall {package}`"
    if folder is not None:
        hint = f"fetch the files with `python scripts/download_data.py {name}{opts} --root {folder}`"
    else:
        hint = f"run `python scripts/download_data.py {name}{opts} --root DIR` (by default DIR is {default_root(name)})"
    if package:
        where = ", ".join(SYSTEM_DIRS.get(name, ()))
        hint += f", or on Debian/Ubuntu `apt-get install {package}` (read from {where})"
    return hint


def locate(
    name: str,
    root: str | None,
    missing: Callable[[Path], list[str]],
    *,
    needs: str = "",
    options: str = "",
) -> Path:
    """Find the folder holding dataset ``name``.

    Args:
        name: dataset name, also the sub-folder searched under each known place.
        root: the user's ``data.root``; when set, only that folder is considered.
        missing: given a folder, the names of the required files it lacks (empty when complete).
        needs: the files a complete folder holds, in words, for the message when none is found.
        options: download-script options that fetch the layout asked for, e.g. ``--layout py``.

    Raises:
        DataError: ``root`` is incomplete, or no known place holds the files; the message lists
            where it looked, which files each place lacked and how to fetch them.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"dataset '{name}': data.root {path} is not a directory; {fetch_hint(name, path, options)}")
        lacking = missing(path)
        if lacking:
            raise DataError(
                f"dataset '{name}': data.root {path} lacks {', '.join(lacking)}; {fetch_hint(name, path, options)}"
            )
        return path
    looked: list[str] = []
    for path in search_dirs(name):
        if not path.is_dir():
            looked.append(f"{path} (no such folder)")
            continue
        lacking = missing(path)
        if not lacking:
            return path
        looked.append(f"{path} (lacks {', '.join(lacking)})")
    where = "\n  ".join(looked)
    wanted = f"; it needs {needs} in one folder" if needs else ""
    raise DataError(
        f"dataset '{name}' not found{wanted}; looked in:\n  {where}\n"
        f"{fetch_hint(name, None, options)}; or set data.root to a folder holding the files"
    )
