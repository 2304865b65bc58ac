"""The CLI's choice of memory allocator (singlestep/malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from singlestep import malloc
from singlestep.errors import UserError
from tests.conftest import base_config, run_cli

linux_only = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def _fake_lib(path, machine_of=sys.executable):
    """A file with the ELF header of ``machine_of`` (what the architecture check reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Path(machine_of).read_bytes()[:64])
    return path


@linux_only
def test_auto_prefers_tcmalloc_minimal_then_jemalloc(tmp_path, monkeypatch):
    monkeypatch.setattr(malloc, "_search_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    assert malloc.find("auto") is None
    _fake_lib(tmp_path / "b" / "libjemalloc.so.2")
    assert malloc.find("auto") == str(tmp_path / "b" / "libjemalloc.so.2")
    _fake_lib(tmp_path / "a" / "libtcmalloc_minimal.so.4")
    assert malloc.find("auto") == str(tmp_path / "a" / "libtcmalloc_minimal.so.4")
    assert malloc.find("system") is None


@linux_only
def test_a_library_for_another_machine_is_never_preloaded(tmp_path, monkeypatch):
    header = bytearray(Path(sys.executable).read_bytes()[:64])
    header[18:20] = (0xB7 if header[18:20] != b"\xb7\x00" else 0x3E).to_bytes(2, "little")  # aarch64 / x86-64
    other = tmp_path / "a" / "libtcmalloc_minimal.so.4"
    other.parent.mkdir()
    other.write_bytes(bytes(header))
    monkeypatch.setattr(malloc, "_search_dirs", lambda: [tmp_path / "a"])
    assert malloc.find("auto") is None
    with pytest.raises(UserError, match="not a shared library for this machine"):
        malloc.find(str(other))
    (tmp_path / "text.so").write_text("not an ELF file")
    with pytest.raises(UserError, match="not a shared library for this machine"):
        malloc.find(str(tmp_path / "text.so"))


@linux_only
def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(UserError, match="SINGLESTEP_MALLOC=.*no such file"):
        malloc.find(str(tmp_path / "nope.so"))
    lib = _fake_lib(tmp_path / "liballoc.so")
    assert malloc.find(str(lib)) == str(lib)


@linux_only
def test_preload_env_adds_once_and_keeps_other_preloads(tmp_path):
    lib = _fake_lib(tmp_path / "liballoc.so")
    env = malloc.preload_env({"LD_PRELOAD": "/x/other.so"}, choice=str(lib))
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so"
    assert malloc.preload_env(env, choice=str(lib))["LD_PRELOAD"] == env["LD_PRELOAD"]
    assert "LD_PRELOAD" not in malloc.preload_env({}, choice="system")


def test_cli_bad_allocator_setting_exits_2(tmp_path, write_config):
    if not os.sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD is Linux's")
    path = write_config(base_config())
    result = run_cli("--config", str(path), f"output.run_dir={tmp_path / 'r'}", env={"SINGLESTEP_MALLOC": str(tmp_path / "x.so")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: SINGLESTEP_MALLOC=") and not (tmp_path / "r").exists()


@linux_only
def test_bench_bad_allocator_setting_exits_2(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SINGLESTEP_MALLOC=str(tmp_path / "x.so"))
    result = subprocess.run([sys.executable, str(root / "scripts" / "bench.py"), "--only", "persample"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: SINGLESTEP_MALLOC=")


@pytest.mark.parametrize("setting", ["auto", "system"])
def test_cli_runs_under_the_chosen_allocator(tmp_path, write_config, setting):
    expected = malloc.kind(malloc.find(setting))
    run_dir = tmp_path / "r"
    env = {"SINGLESTEP_MALLOC": setting, "LD_PRELOAD": "", malloc._MARK: ""}
    result = run_cli("--config", str(write_config(base_config())), f"output.run_dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["allocator"] == expected
