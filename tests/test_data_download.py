"""scripts/download_data.py without touching the network: urlopen is replaced in every test."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from singlestep.data.cifar10 import build_cifar10
from singlestep.data.sources import REMOTE, RemoteFile

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "download_data.py"


@pytest.fixture(scope="module")
def dl():
    spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def unreachable(request, timeout=None):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return calls


def serve(monkeypatch, files: dict[str, bytes]):
    """Answer urlopen from ``files`` (url -> bytes); any other url is unreachable."""
    served = []

    def fake(request, timeout=None):
        url = request.full_url
        if url not in files:
            raise urllib.error.URLError("unreachable")
        served.append(url)
        return io.BytesIO(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return served


def remote(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, f"https://example.invalid/{name}", len(data), hashlib.sha256(data).hexdigest())


def test_every_published_file_has_a_sha256():
    for files in REMOTE.values():
        for f in files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0 and f.size > 0
            assert f.url.endswith("/" + f.name)


def test_no_network_fails_fast_with_where_to_put_files(dl, no_network, tmp_path, capsys):
    start = time.perf_counter()
    assert dl.main(["fashion_mnist", "--root", str(tmp_path / "fm")]) == 2
    assert time.perf_counter() - start < 5
    assert len(no_network) == 1  # gives up at the first unreachable file
    err = capsys.readouterr().err
    assert "cannot reach http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in err
    for f in REMOTE["fashion_mnist"]:
        assert f"{tmp_path / 'fm' / f.name}" in err and f.sha256 in err
    assert not list((tmp_path / "fm").glob("*"))  # no partial files left


def test_download_verifies_then_skips_verified_copies(dl, monkeypatch, tmp_path, capsys):
    good = remote("train-labels-idx1-ubyte.gz", b"label bytes")
    monkeypatch.setitem(REMOTE, "mnist", (good,))
    served = serve(monkeypatch, {good.url: b"label bytes"})
    assert dl.main(["mnist", "--root", str(tmp_path)]) == 0
    assert (tmp_path / good.name).read_bytes() == b"label bytes" and len(served) == 1
    assert dl.main(["mnist", "--root", str(tmp_path)]) == 0
    assert len(served) == 1 and "checksum ok" in capsys.readouterr().out


def test_checksum_mismatch_keeps_nothing(dl, monkeypatch, tmp_path, capsys):
    expected = remote("t10k-labels-idx1-ubyte.gz", b"the real bytes")
    monkeypatch.setitem(REMOTE, "mnist", (expected,))
    serve(monkeypatch, {expected.url: b"the fake bytes"})
    assert dl.main(["mnist", "--root", str(tmp_path)]) == 2
    assert "not keeping it" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    "members, links",
    [
        ({"../escape.txt": b"x"}, None),
        ({"/abs/escape.txt": b"x"}, None),
        ({}, {"cifar-10-batches-bin/link": "/etc/passwd"}),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_unsafe_tar_members_are_refused(dl, tmp_path, members, links):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tarball(members, links))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(dl.DownloadError, match="refusing to unpack"):
        dl.safe_extract(archive, dest)
    assert not list(dest.iterdir()) and not (tmp_path / "escape.txt").exists()


def test_cifar_tarball_is_fetched_unpacked_and_loadable(dl, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    members = {}
    for name in names:
        records = np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], axis=1)
        members[f"cifar-10-batches-bin/{name}"] = records.astype(np.uint8).tobytes()
    data = tarball(members)
    fake = remote("cifar-10-binary.tar.gz", data)
    monkeypatch.setitem(REMOTE, "cifar10", (fake,))
    served = serve(monkeypatch, {fake.url: data})
    assert dl.main(["cifar10", "--root", str(tmp_path)]) == 0
    assert not (tmp_path / fake.name).exists()  # archive removed after unpacking
    bundle = build_cifar10(torch.device("cpu"), root=str(tmp_path))
    assert (len(bundle.train), len(bundle.test)) == (10, 2)
    assert dl.main(["cifar10", "--root", str(tmp_path)]) == 0  # already unpacked: no second fetch
    assert len(served) == 1
