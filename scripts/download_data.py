"""Fetch MNIST, Fashion-MNIST or CIFAR-10 from their official hosts, checking SHA-256 sums.

    python scripts/download_data.py fashion_mnist --root data/fashion_mnist
    python scripts/download_data.py cifar10 --layout py

Files land in ``--root`` (default: ``$SINGLESTEP_DATA/<name>``, else ``~/.cache/singlestep/<name>``,
both searched by the datasets). Each file is checked against its published size and SHA-256
before it is kept; CIFAR-10 tarballs are unpacked with every member checked first (regular files
and folders only, all inside ``--root``). Without a network the script stops within seconds,
exit code 2, saying which files to put where.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from singlestep.data.sources import REMOTE, RemoteFile, default_root

DATASETS = ("mnist", "fashion_mnist", "cifar10")
_CHUNK = 1 << 20
# What a CIFAR-10 tarball unpacks to, per layout; with these present the archive is not needed.
_EXTRACTED = {
    "cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]),
    "cifar10_py": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
}


class DownloadError(Exception):
    """A download that cannot be completed; the message says what to do instead."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_help(files: tuple[RemoteFile, ...], root: Path) -> str:
    lines = [f"  {f.url}\n      -> {root / f.name}  ({f.size} bytes, sha256 {f.sha256})" for f in files]
    return "fetch these files on a machine with a network and put them here:\n" + "\n".join(lines)


def fetch(remote: RemoteFile, root: Path, timeout: float) -> Path:
    """Download ``remote`` into ``root`` (skipped when a verified copy is there).

    Raises:
        DownloadError: the host cannot be reached, or the bytes do not match the published sum.
    """
    target = root / remote.name
    if target.is_file() and target.stat().st_size == remote.size and sha256_of(target) == remote.sha256:
        print(f"{target}: present, checksum ok")
        return target
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    size = 0
    print(f"downloading {remote.url} ({remote.size / 1e6:.1f} MB)", flush=True)
    try:
        request = urllib.request.Request(remote.url, headers={"User-Agent": "singlestep-download/1"})
        with urllib.request.urlopen(request, timeout=timeout) as response, part.open("wb") as out:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {remote.url}: {reason}") from None
    if size != remote.size or digest.hexdigest() != remote.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.url}: got {size} bytes with sha256 {digest.hexdigest()}, "
            f"expected {remote.size} bytes with sha256 {remote.sha256}; not keeping it"
        )
    os.replace(part, target)
    return target


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tarball into ``dest`` after checking every member stays inside it.

    Raises:
        DownloadError: a member is a link, a device, absolute, or climbs out with ``..``.
    """
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise DownloadError(f"{archive}: member '{m.name}' is not a regular file or folder; refusing to unpack")
            target = (dest / m.name).resolve()
            if os.path.isabs(m.name) or not target.is_relative_to(dest):
                raise DownloadError(f"{archive}: member '{m.name}' would land outside {dest}; refusing to unpack")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the stdlib's own safety net as well
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; members were checked above
            tar.extractall(dest, members=members)


def download(name: str, root: Path, timeout: float, keep_archive: bool = False) -> None:
    """Fetch (and for CIFAR-10 unpack) dataset ``name`` into ``root``.

    ``name`` is a key of :data:`singlestep.data.sources.REMOTE` (``cifar10_py`` is the python layout).
    """
    files = REMOTE[name]
    root.mkdir(parents=True, exist_ok=True)
    extracted = _EXTRACTED.get(name)
    if extracted and all((root / extracted[0] / f).is_file() for f in extracted[1]):
        print(f"{root / extracted[0]}: already unpacked")
        return
    try:
        paths = [fetch(remote, root, timeout) for remote in files]
    except DownloadError as exc:
        raise DownloadError(f"{exc}\n{_manual_help(files, root)}") from None
    if extracted:
        for path in paths:
            print(f"unpacking {path}")
            safe_extract(path, root)
            if not keep_archive:
                path.unlink()
    print(f"done: {name} is in {root}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--root", default=None, help="target folder (default: where the datasets look first)")
    parser.add_argument(
        "--layout", choices=("bin", "py"), default="bin", help="CIFAR-10 layout (default bin: no pickles)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait on a silent connection (default 5)")
    parser.add_argument("--keep-archive", action="store_true", help="keep the CIFAR-10 tarball after unpacking")
    args = parser.parse_args(argv)
    name = "cifar10_py" if args.dataset == "cifar10" and args.layout == "py" else args.dataset
    root = Path(args.root).expanduser() if args.root else default_root(args.dataset)
    try:
        download(name, root, args.timeout, keep_archive=args.keep_archive)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write under {root}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
