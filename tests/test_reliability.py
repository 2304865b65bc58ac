"""Training that goes wrong ends in a handled event: a stop with exit code 3, or a failed run's
summary.json; nothing saved before is lost (docs/reliability.md lists every case)."""

from __future__ import annotations

import errno
import json
import math
import os
import signal

import pytest
import torch

from singlestep import checkpoint
from singlestep.config import validate
from singlestep.errors import UserError
from singlestep.trainer import Trainer
from tests.conftest import base_config, run_cli, run_main


def cli_run(tmp_path, write_config, *overrides, optimizer=None, process=False):
    """The train CLI on a 64-sample config, 2 epochs; ``process``: in a subprocess (to see a traceback)."""
    cfg = base_config()
    cfg["trainer"].update(epochs=2)
    if optimizer:
        cfg["optimizer"] = optimizer
    runner = run_cli if process else run_main
    result = runner("--config", str(write_config(cfg)), f"output.run_dir={tmp_path / 'run'}", *overrides)
    summary_path = tmp_path / "run" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return result, summary


class Poison(torch.optim.SGD):
    """SGD whose 20th step makes every parameter NaN: every later loss is NaN."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        if self.steps == 20:
            with torch.no_grad():
                for p in self.param_groups[0]["params"]:
                    p.fill_(math.nan)


class Broken(torch.optim.SGD):
    """An optimizer with a bug: its 40th step raises."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        if self.steps == 40:
            raise ZeroDivisionError("a bug in the user's step()")
        return super().step(closure)


def test_non_finite_steps_stop_the_run_with_exit_3(tmp_path, write_config):
    result, summary = cli_run(tmp_path, write_config, "optimizer.lr=1e12", "output.checkpoint_every=16")
    assert result.returncode == 3, result.stderr
    assert summary["status"] == "diverged" and "non-finite loss or gradients" in summary["error"]
    assert "stopped at step 16" in result.stdout and "no checkpoint was written before it" in result.stdout
    assert summary["steps"] == 16 and summary["skipped_steps"] > 0
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())  # the skipped steps never reached them
    assert not checkpoint.checkpoints(tmp_path / "run" / "checkpoints")  # none after the trouble


def test_stop_names_the_last_good_checkpoint(tmp_path, write_config):
    poison = {"name": "tests.test_reliability.Poison", "lr": 0.05}
    result, summary = cli_run(tmp_path, write_config, "output.checkpoint_every=16", optimizer=poison)
    assert result.returncode == 3
    assert "the last checkpoint before it" in result.stdout and "step-000000016.pt" in result.stdout
    assert summary["checkpoint"].endswith("step-000000016.pt") and summary["steps"] == 32


def test_skip_trains_on_and_an_all_skipped_window_says_so(tmp_path, write_config):
    poison = {"name": "tests.test_reliability.Poison", "lr": 0.05}
    result, summary = cli_run(tmp_path, write_config, "trainer.on_nonfinite=skip", "trainer.max_nonfinite=null",
                              optimizer=poison)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert summary["status"] == "ok" and summary["skipped_steps"] == 128 - 20
    assert "all 16 steps skipped (non-finite loss or gradients)" in result.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [e for e in lines if e["event"] == "train"]
    assert windows[-1]["loss"] is None and windows[-1]["skipped_steps"] == 16  # not "loss 0"


def test_skip_stops_after_max_nonfinite(tmp_path, write_config):
    poison = {"name": "tests.test_reliability.Poison", "lr": 0.05}
    result, summary = cli_run(tmp_path, write_config, "trainer.on_nonfinite=skip", "trainer.max_nonfinite=20",
                              optimizer=poison)  # fmt: skip
    assert result.returncode == 3 and summary["status"] == "diverged"
    assert "more than trainer.max_nonfinite (20)" in summary["error"] and summary["steps"] == 48


def test_divergence_threshold_stops_with_exit_3(tmp_path, write_config):
    result, summary = cli_run(tmp_path, write_config, "trainer.divergence_threshold=1e-9")
    assert result.returncode == 3 and summary["status"] == "diverged"
    assert "over trainer.divergence_threshold 1e-09" in summary["error"] and summary["steps"] == 16


def test_an_error_inside_step_leaves_a_failed_summary_and_a_clear_refusal(tmp_path, write_config):
    broken = {"name": "tests.test_reliability.Broken", "lr": 0.05}
    result, summary = cli_run(tmp_path, write_config, "output.checkpoint_every=16", optimizer=broken, process=True)
    assert result.returncode == 1 and "ZeroDivisionError: a bug in the user's step()" in result.stderr  # a traceback: a bug
    assert summary["status"] == "failed" and summary["error"] == "ZeroDivisionError: a bug in the user's step()"
    assert summary["steps"] == 32 and summary["final"] is None
    again, _ = cli_run(tmp_path, write_config, optimizer=broken)
    assert again.returncode == 2 and "status 'failed'" in again.stderr and "--resume" in again.stderr


def test_a_full_disk_while_checkpointing_fails_cleanly_keeping_the_previous_one(tmp_path, monkeypatch):
    cfg = base_config()
    cfg["output"] = {"run_dir": str(tmp_path / "run"), "checkpoint_every": 16, "curves": False}
    trainer = Trainer(validate(cfg, "test.yaml"), out=open(os.devnull, "w"))
    real_save, calls = checkpoint.torch.save, [0]

    def fills_up(obj, f):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", fills_up)
    with pytest.raises(UserError, match="No space left on device"):
        trainer.fit()
    monkeypatch.undo()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-000000016.pt"]
    assert checkpoint.load_checkpoint(folder / "step-000000016.pt")["loop"]["step"] == 16
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]


def test_an_output_folder_that_cannot_be_created_is_exit_2(tmp_path, write_config):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = base_config()
    result = run_main("--config", str(write_config(cfg)), f"output.dir={tmp_path / 'a-file'}")
    assert result.returncode == 2 and "cannot create run folder" in result.stderr and "Traceback" not in result.stderr


def test_a_signal_during_the_last_call_is_a_finished_run(tmp_path):
    cfg = base_config()
    cfg["output"] = {"run_dir": str(tmp_path / "run"), "curves": False}
    trainer = Trainer(validate(cfg, "test.yaml"), out=open(os.devnull, "w"))
    inner = trainer.engine.run_samples

    def last_call_then_sigterm(idx):
        inner(idx)
        if trainer.state.step + len(idx) == trainer.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.engine.run_samples = last_call_then_sigterm
    summary = trainer.fit()
    assert summary["steps"] == 64 and summary["status"] == "ok" and not summary["interrupted"]


def test_a_model_that_cannot_fit_the_data_is_exit_2_before_any_folder(tmp_path, write_config):
    cfg = base_config(model={"name": "cnn"})
    result = run_main("--config", str(write_config(cfg)), f"output.run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "model 'cnn' needs image inputs" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_no_checkpoint_is_taken_after_trouble_the_next_metrics_line_would_report(tmp_path, write_config):
    # NaN weights from step 20; checkpoints every 8 steps, metrics lines every 16: the checkpoint
    # at 24 would hold NaN weights and be named the last good one. The run stops there instead.
    poison = {"name": "tests.test_reliability.Poison", "lr": 0.05}
    result, summary = cli_run(tmp_path, write_config, "output.checkpoint_every=8", optimizer=poison)
    assert result.returncode == 3 and summary["steps"] == 24
    assert summary["checkpoint"].endswith("step-000000016.pt")
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-000000016.pt"
    good = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000000016.pt")
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_resuming_a_finished_run_keeps_its_last_metrics_line(tmp_path, write_config):
    result, summary = cli_run(tmp_path, write_config)
    assert result.returncode == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    again = run_main("--resume", str(tmp_path / "run"))
    assert again.returncode == 0 and "nothing to train" in again.stdout
    after = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("time", "samples_per_second")} for x in lines]  # noqa: E731
    assert strip(after) == strip(before)
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["final"]["train"] == summary["final"]["train"]


def test_a_damaged_config_yaml_or_an_old_checkpoint_on_resume_is_exit_2(tmp_path, write_config):
    result, _ = cli_run(tmp_path, write_config)
    config = tmp_path / "run" / "config.yaml"
    good = config.read_text()
    config.write_text(good + "name: t\n")  # a key twice
    again = run_main("--resume", str(tmp_path / "run"))
    assert again.returncode == 2 and "cannot read" in again.stderr and "Traceback" not in again.stderr
    config.write_text(good)
    path = checkpoint.find_checkpoint(tmp_path / "run")[1]
    state = torch.load(path, weights_only=True)
    state["format"] = 1
    torch.save(state, path)
    again = run_main("--resume", str(tmp_path / "run"))
    assert again.returncode == 2 and "has format 1" in again.stderr
