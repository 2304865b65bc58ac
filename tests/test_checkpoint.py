"""Checkpoint files: atomic writes, weights-only loads, refused config changes, what is kept."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch
import yaml

from singlestep import checkpoint
from singlestep.errors import UserError
from tests.conftest import base_config, run_main


def quick_run(tmp_path, write_config, *extra, **output):
    cfg = base_config()
    cfg["optimizer"] = {"name": "adam", "lr": 0.01}
    cfg["output"] = {"checkpoint_every": 20, "curves": False, **output}
    result = run_main("--config", str(write_config(cfg)), f"output.run_dir={tmp_path / 'run'}", *extra)
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


def minimal(**values):
    """A checkpoint with every key a load asks for (the contents do not matter here)."""
    return {**{key: None for key in checkpoint._KEYS}, "format": checkpoint.FORMAT, **values}


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    first = checkpoint.save_checkpoint(folder, 10, minimal(w=torch.arange(4.0)))

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left"):
        checkpoint.save_checkpoint(folder, 20, minimal(w=torch.zeros(4)))
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == [first.name]  # no temporary file, no step-20
    assert torch.equal(checkpoint.load_checkpoint(first)["w"], torch.arange(4.0))
    assert checkpoint.find_checkpoint(tmp_path) == (tmp_path, first)


def test_a_killed_write_leaves_a_temporary_file_that_is_ignored_then_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    first = checkpoint.save_checkpoint(folder, 10, minimal())
    stale = folder / ".step-000000020.pt.1.tmp"
    stale.write_bytes(b"cut short")
    assert checkpoint.find_checkpoint(tmp_path)[1] == first
    checkpoint.prune(folder, keep=3)
    assert not stale.exists() and first.exists()


def test_a_checkpoint_naming_a_callable_is_refused_without_running_it(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config)
    path = checkpoint.find_checkpoint(run_dir)[1]
    state = torch.load(path, weights_only=True)
    state["scheduler"] = {"lr_lambdas": [os.system]}  # what a pickled callable looks like
    torch.save(state, path)
    with pytest.raises(UserError, match="refused.*never run pickled code") as info:
        checkpoint.load_checkpoint(path)
    assert "system" in str(info.value)
    result = run_main("--resume", str(run_dir))
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr


def test_resume_refuses_changed_keys_and_lists_them(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config)
    result = run_main("--resume", str(run_dir), "optimizer.lr=0.1", "trainer.clip_grad_norm=2.0", "trainer.epochs=2")
    assert result.returncode == 2
    assert "optimizer.lr: 0.01 -> 0.1" in result.stderr and "trainer.clip_grad_norm: null -> 2.0" in result.stderr
    assert "trainer.epochs" not in result.stderr.split("differ")[1].split(";")[0]  # an allowed change


def test_resume_extends_epochs_and_continues_the_metrics(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config)
    result = run_main("--resume", str(run_dir), "trainer.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "resumed at step 64" in result.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["epochs"] == 3
    state = checkpoint.load_checkpoint(checkpoint.find_checkpoint(run_dir)[1])
    assert state["loop"]["step"] == 192 and state["versions"]["torch"] == str(torch.__version__)


def test_resume_errors_are_one_line(tmp_path):
    for args, text in [(("--resume", str(tmp_path / "nope")), "no such run folder"),
                       (("--resume", str(tmp_path)), "no checkpoint to resume from"),
                       (("--resume", str(tmp_path), "--config", "x.yaml"), "not both")]:  # fmt: skip
        result = run_main(*args)
        assert result.returncode == 2 and text in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_holds_what_the_run_needs(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config, "output.keep_checkpoints=2")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-000000060.pt", "step-000000064.pt"]
    state = checkpoint.load_checkpoint(run_dir / "checkpoints" / names[-1])
    assert set(state) >= {"model", "optimizer", "scheduler", "loop", "rng", "engine", "config", "versions",
                          "metrics_bytes"}  # fmt: skip
    assert state["engine"]["name"] in ("eager", "compiled")
    assert state["config"]["optimizer"]["lr"] == 0.01
    assert state["metrics_bytes"] <= (run_dir / "metrics.jsonl").stat().st_size


class KeepsAFunction(torch.optim.SGD):
    """An optimizer whose state holds a Python function: it cannot be checkpointed."""

    def step(self, closure=None):
        super().step(closure)
        for p in self.param_groups[0]["params"]:
            self.state[p]["hook"] = print


def test_state_that_a_weights_only_load_would_refuse_turns_checkpoints_off_with_a_warning(tmp_path, write_config):
    cfg = base_config()
    cfg["optimizer"] = {"name": "tests.test_checkpoint.KeepsAFunction", "lr": 0.01}
    cfg["output"] = {"checkpoint_every": 20, "curves": False}
    result = run_main("--config", str(write_config(cfg)), f"output.run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("no checkpoints for this run") == 1 and "builtin_function_or_method" in result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tensorboard_events_sit_next_to_the_metrics(tmp_path, write_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = quick_run(tmp_path, write_config, "output.tensorboard=true")
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "test/r2"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [16, 32, 48, 64]


def test_a_checkpoint_file_outside_its_run_folder_or_from_another_run_is_refused(tmp_path, write_config):
    run_a = quick_run(tmp_path / "a", write_config)
    stray = tmp_path / "stray.pt"
    stray.write_bytes(checkpoint.find_checkpoint(run_a)[1].read_bytes())
    result = run_main("--resume", str(stray))
    assert result.returncode == 2 and "not in one" in result.stderr
    # Run b's folder, holding a checkpoint of run a (another lr): refused, b untouched.
    cfg = base_config()
    cfg["optimizer"] = {"name": "adam", "lr": 0.05}
    cfg["output"] = {"checkpoint_every": 20, "curves": False}
    b = tmp_path / "b"
    assert run_main("--config", str(write_config(cfg, "b.yaml")), f"output.run_dir={b}").returncode == 0
    before = (b / "metrics.jsonl").read_bytes()
    foreign = b / "checkpoints" / "step-000000070.pt"
    foreign.write_bytes(checkpoint.find_checkpoint(run_a)[1].read_bytes())
    result = run_main("--resume", str(foreign))
    assert result.returncode == 2 and "belongs to another run" in result.stderr.replace("\n", " ") and "optimizer.lr" in result.stderr
    assert (b / "metrics.jsonl").read_bytes() == before


def test_damaged_checkpoints_are_one_line_errors(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config)
    path = checkpoint.find_checkpoint(run_dir)[1]
    good = path.read_bytes()
    cases = {"empty": b"", "cut short": good[: len(good) // 2], "another file": b"name: not a checkpoint\n"}
    for what, content in cases.items():
        path.write_bytes(content)
        result = run_main("--resume", str(run_dir))
        assert result.returncode == 2 and "Traceback" not in result.stderr, what
        assert str(path) in result.stderr, what
    state = torch.load(io.BytesIO(good), weights_only=True)
    del state["engine"]
    torch.save(state, path)
    result = run_main("--resume", str(run_dir))
    assert result.returncode == 2 and "lacks engine" in result.stderr
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["model"]["weight"] = torch.zeros(3, 3)  # a model that changed shape since
    torch.save(state, path)
    result = run_main("--resume", str(run_dir))
    assert result.returncode == 2 and "does not fit this run" in result.stderr and "Traceback" not in result.stderr


def test_a_run_folder_in_use_is_refused(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config)
    from singlestep.runlog import RunDir

    holder = RunDir(run_dir)  # as a run still going would hold it
    try:
        result = run_main("--resume", str(run_dir))
        assert result.returncode == 2 and "in use by another process" in result.stderr
    finally:
        holder.close()


def test_tensorboard_keeps_the_events_at_the_checkpoint_step_on_resume(tmp_path, write_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = quick_run(tmp_path, write_config, "output.tensorboard=true", "trainer.epochs=2", "output.checkpoint_every=16")
    older = sorted((run_dir / "checkpoints").glob("step-*.pt"))[0]  # step 96, where a metrics line was written too
    assert older.name == "step-000000096.pt"
    assert run_main("--resume", str(older)).returncode == 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [16, 32, 48, 64, 80, 96, 112, 128]


def test_a_dataset_that_changed_size_since_the_checkpoint_is_one_line(tmp_path, write_config):
    run_dir = quick_run(tmp_path, write_config, "output.checkpoint_every=40")
    path = run_dir / "checkpoints" / "step-000000040.pt"  # mid-epoch: holds the epoch's order
    state = torch.load(path, weights_only=True)
    state["loop"]["order"] = state["loop"]["order"][:50]  # as if the data files had 50 samples then
    torch.save(state, path)
    result = run_main("--resume", str(path))
    assert result.returncode == 2 and "the dataset's files changed" in result.stderr
