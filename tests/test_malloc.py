"""The CLI's choice of memory allocator (singlestep/malloc.py)."""

from __future__ import annotations

import json
import os

import pytest

from singlestep import malloc
from singlestep.errors import UserError
from tests.conftest import base_config, run_cli

linux_only = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


@linux_only
def test_auto_prefers_tcmalloc_minimal_then_jemalloc(tmp_path, monkeypatch):
    monkeypatch.setattr(malloc, "_search_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    assert malloc.find("auto") is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "libjemalloc.so.2").write_bytes(b"")
    assert malloc.find("auto") == str(tmp_path / "b" / "libjemalloc.so.2")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert malloc.find("auto") == str(tmp_path / "a" / "libtcmalloc_minimal.so.4")
    assert malloc.find("system") is None


@linux_only
def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(UserError, match="SINGLESTEP_MALLOC=.*no such file"):
        malloc.find(str(tmp_path / "nope.so"))
    lib = tmp_path / "liballoc.so"
    lib.write_bytes(b"")
    assert malloc.find(str(lib)) == str(lib)


@linux_only
def test_preload_env_adds_once_and_keeps_other_preloads(tmp_path):
    lib = tmp_path / "liballoc.so"
    lib.write_bytes(b"")
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


@pytest.mark.parametrize("setting", ["auto", "system"])
def test_cli_runs_under_the_chosen_allocator(tmp_path, write_config, setting):
    expected = "system"
    if setting == "auto" and malloc.find("auto") is not None:
        expected = "jemalloc" if "jemalloc" in malloc.find("auto") else "tcmalloc"
    run_dir = tmp_path / "r"
    env = {"SINGLESTEP_MALLOC": setting, "LD_PRELOAD": "", malloc._MARK: ""}
    result = run_cli("--config", str(write_config(base_config())), f"output.run_dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["allocator"] == expected
