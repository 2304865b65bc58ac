"""The committed configs: every one validates, and the MNIST / CIFAR-10 ones train on files
written in the exact real formats (the real files cannot be fetched here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from singlestep.config import load_config
from tests.conftest import ROOT, run_cli
from tests.test_data_cifar10 import make_batches, write_bin, write_py
from tests.test_data_idx import make_idx_folder

CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_committed_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # user optimizers by import path resolve from the project root
    cfg = load_config(path)
    assert cfg.name and cfg.model.name and cfg.data.name and cfg.optimizer.name


def train_tiny(config: str, tmp_path: Path, *overrides: str) -> dict:
    run_dir = tmp_path / "run"
    result = run_cli("--config", config, f"output.run_dir={run_dir}", "trainer.progress=false", *overrides, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads((run_dir / "summary.json").read_text())


def test_mnist_config_trains_on_generated_idx_files(tmp_path):
    make_idx_folder(tmp_path / "mnist", n_train=40, n_test=10, gz_train=True)
    summary = train_tiny("configs/mnist_linear.yaml", tmp_path, f"data.root={tmp_path / 'mnist'}", "data.val_size=8",
                         "trainer.engine=eager")  # fmt: skip
    assert summary["steps"] == 32  # per-sample: one step per remaining training image
    assert {"val", "test"} <= set(summary["final"])
    assert len(summary["final"]["test"]["confusion"]) == 10


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar10_config_trains_on_generated_batches(tmp_path, layout):
    batches = make_batches()
    (write_bin if layout == "bin" else write_py)(tmp_path / "cifar", batches)
    summary = train_tiny("configs/cifar10_cnn.yaml", tmp_path, f"data.root={tmp_path / 'cifar'}", "data.val_size=4",
                         "trainer.epochs=1", "trainer.batch_size=8", "scheduler.warmup_steps=0",
                         "trainer.engine=eager")  # fmt: skip
    assert summary["steps"] >= 1 and "accuracy" in summary["final"]["test"]
