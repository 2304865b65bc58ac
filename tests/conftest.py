"""Shared fixtures: small configs written to a temp folder, and a runner for the CLI."""

from __future__ import annotations

import os
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def base_config(**changes) -> dict:
    """A tiny synthetic-regression config that trains in well under a second."""
    cfg = {
        "name": "t",
        "seed": 0,
        "device": "cpu",
        "model": {"name": "linear"},
        "data": {"name": "synthetic_regression", "in_features": 4, "train_size": 64, "val_size": 16, "test_size": 16},
        "optimizer": {"name": "torch.optim.SGD", "lr": 0.05},
        "trainer": {"mode": "per_sample", "epochs": 1, "log_every": 16, "progress": False},
        "output": {"dir": "runs", "curves": False},  # a picture per run costs ~1 s; tests of it ask for it
    }
    for key, value in changes.items():
        cfg[key] = value
    return cfg


@pytest.fixture
def write_config(tmp_path):
    """Write a config mapping (or raw text) to tmp_path/name and return its path."""

    def write(data, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``python -m singlestep.train`` in a subprocess, as a user would (``env``: extra variables)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "singlestep.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``python -m singlestep.train ARGS`` in this process (no interpreter or torch start-up): the
    same main() the CLI runs, its output captured. For the paths that end in an exit code; a bug
    raises here instead of printing a traceback, so tests of tracebacks use :func:`run_cli`."""
    import contextlib
    import io

    from singlestep.train import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["singlestep.train", *args], code, out.getvalue(), err.getvalue())


# Compiled chunks go to a per-session folder unless the developer points SINGLESTEP_CACHE at a
# persistent one (which makes repeated local runs skip compilation).
os.environ.setdefault("SINGLESTEP_CACHE", tempfile.mkdtemp(prefix="singlestep-test-cache-"))
