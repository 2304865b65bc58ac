"""Exact resume: a run stopped by SIGTERM (or killed after a checkpoint) and resumed ends with the
parameters, bit for bit, and the metrics of the same run left alone."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from singlestep import checkpoint
from singlestep.config import validate
from singlestep.engine import policy
from singlestep.runlog import RunDir
from singlestep.trainer import Resume, Trainer
from tests.conftest import ROOT, base_config, run_cli

_TIMING = ("time", "samples_per_second")


def make_cfg(tmp_path, name, *, trainer=None, output=None, **changes):
    cfg = base_config(**changes)
    cfg["data"] = {"name": "synthetic_regression", "in_features": 6, "train_size": 150, "val_size": 30, "test_size": 30}
    if "optimizer" not in changes:
        cfg["optimizer"] = {"name": "adam", "lr": 0.01}
    cfg.setdefault("scheduler", {"name": "cosine", "warmup_steps": 20})
    cfg["trainer"] = {"mode": "per_sample", "epochs": 2, "log_every": 50, "eval_every": 70, "progress": False,
                      "clip_grad_norm": 1.0, "engine": "eager", **(trainer or {})}  # fmt: skip
    cfg["output"] = {"run_dir": str(tmp_path / name), "checkpoint_every": 40, "curves": False, **(output or {})}
    return validate(cfg, "test.yaml")


def sigterm_after_calls(trainer: Trainer, n: int) -> None:
    """A real SIGTERM arrives after ``n`` of the trainer's engine calls."""
    engine, calls = trainer.engine, [0]
    name = "run_samples" if trainer.cfg.trainer.mode == "per_sample" else "run_batch"
    inner = getattr(engine, name)

    def counted(*args, **kwargs):
        inner(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)

    setattr(engine, name, counted)


def run(cfg, *, stop_after_calls=None, resume=None) -> Trainer:
    """Train; with ``stop_after_calls`` a real SIGTERM arrives after that many engine calls."""
    trainer = Trainer(cfg, out=open(os.devnull, "w"), resume=resume)
    if stop_after_calls is not None:
        sigterm_after_calls(trainer, stop_after_calls)
    trainer.fit()
    return trainer


def resume_from(cfg, run_dir) -> Trainer:
    found_dir, path = checkpoint.find_checkpoint(run_dir)
    return run(cfg, resume=Resume(found_dir, path, checkpoint.load_checkpoint(path)))


def metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


def assert_same_run(a: Trainer, b: Trainer):
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert metrics(a.run_dir) == metrics(b.run_dir)
    assert a.state.step == b.state.step


def stopped_and_resumed(tmp_path, stop_after_calls, **kw):
    whole = run(make_cfg(tmp_path, "whole", **kw))
    cfg = make_cfg(tmp_path, "parts", **kw)
    stopped = run(cfg, stop_after_calls=stop_after_calls)
    assert stopped.stop_requested and stopped.state.step < whole.state.step
    assert json.loads((stopped.run_dir / "summary.json").read_text())["interrupted"]
    return whole, resume_from(cfg, stopped.run_dir)


def test_per_sample_stopped_mid_epoch_resumes_bit_exact(tmp_path):
    # Calls end at steps 40, 50, 70 (log, eval, checkpoint boundaries): stop at 70, mid-epoch 1.
    whole, resumed = stopped_and_resumed(tmp_path, 3)
    assert resumed.resume.state["loop"]["step"] == 70 and resumed.resume.state["loop"]["pos"] == 70
    assert_same_run(whole, resumed)


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedulefree.AdamWScheduleFree", "torch.optim.Adagrad"])
def test_other_optimizers_resume_bit_exact(tmp_path, name):
    # Schedule-free ones evaluate in eval mode between the steps; the checkpoint holds train mode.
    if "." in name:
        pytest.importorskip(name.split(".")[0])
    whole, resumed = stopped_and_resumed(tmp_path, 3, optimizer={"name": name, "lr": 0.01}, scheduler=None)
    assert_same_run(whole, resumed)


def test_per_sample_with_dropout_restores_the_rng(tmp_path):
    # Dropout draws from torch's global RNG every step: without its state the resumed run differs.
    whole, resumed = stopped_and_resumed(tmp_path, 2, model={"name": "mlp", "hidden_sizes": [8], "dropout": 0.3})
    assert_same_run(whole, resumed)


@pytest.mark.parametrize("stop_after_calls", [5, 7], ids=["at-epoch-boundary", "off-boundary"])
def test_minibatch_resumes_bit_exact(tmp_path, stop_after_calls):
    # 150 samples in batches of 30: 5 steps an epoch; the 5th call ends epoch 1, the 7th is mid-epoch 2.
    trainer = {"mode": "minibatch", "batch_size": 15, "grad_accum_steps": 2, "epochs": 3, "log_every": 4,
               "eval_every": 3}  # fmt: skip
    whole, resumed = stopped_and_resumed(tmp_path, stop_after_calls, trainer=trainer, output={"checkpoint_every": 6},
                                         scheduler={"name": "cosine", "warmup_steps": 2})
    assert resumed.resume.state["loop"]["step"] == stop_after_calls
    assert (resumed.resume.state["loop"]["order"] is None) == (stop_after_calls == 5)  # between epochs
    assert_same_run(whole, resumed)


def test_a_finished_run_trained_further_equals_the_longer_run(tmp_path):
    # Without a schedule (which a longer run stretches) 2 epochs then 1 more are the 3-epoch run:
    # the evaluation and log the first run's end deferred are done when it continues.
    longer = run(make_cfg(tmp_path, "whole", trainer={"epochs": 3}, scheduler=None))
    first = run(make_cfg(tmp_path, "parts", scheduler=None))
    assert first.state.step == 300
    more = resume_from(make_cfg(tmp_path, "parts", trainer={"epochs": 3}, scheduler=None), first.run_dir)
    assert_same_run(longer, more)
    assert [m["step"] for m in metrics(more.run_dir) if m["split"] == "val"] == [70, 140, 210, 280, 350, 420, 450]
    # The step-300 line, logged again by the resumed process, keeps its window's samples (not 0/s).
    lines = [json.loads(line) for line in (more.run_dir / "metrics.jsonl").read_text().splitlines()]
    [logged] = [m for m in lines if m["event"] == "train" and m["step"] == 300]
    assert logged["samples_per_second"] > 0


def test_a_checkpoint_without_the_log_window_logs_no_rate_rather_than_zero(tmp_path):
    # Checkpoints from before the window was carried: the re-logged line's rate is unknown (null).
    first = run(make_cfg(tmp_path, "parts", scheduler=None))
    _, path = checkpoint.find_checkpoint(first.run_dir)
    state = checkpoint.load_checkpoint(path)
    del state["loop"]["window"]
    more = run(make_cfg(tmp_path, "parts", trainer={"epochs": 3}, scheduler=None), resume=Resume(first.run_dir, path, state))
    lines = [json.loads(line) for line in (more.run_dir / "metrics.jsonl").read_text().splitlines()]
    [logged] = [m for m in lines if m["event"] == "train" and m["step"] == 300]
    assert logged["samples_per_second"] is None


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    cfg = make_cfg(tmp_path, "run")
    first = run(cfg)
    folder = first.run_dir / "checkpoints"
    older = sorted(folder.glob("step-*.pt"))[0]
    again = run(cfg, resume=Resume(first.run_dir, older, checkpoint.load_checkpoint(older)))
    assert again.state.step == 300
    aside = [p for p in folder.iterdir() if p.is_dir()]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir())  # kept, not deleted
    assert checkpoint.find_checkpoint(first.run_dir)[1].name == "step-000000300.pt"
    whole = run(make_cfg(tmp_path, "whole"))
    assert metrics(again.run_dir) == metrics(whole.run_dir)


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    a = run(make_cfg(tmp_path, "a"))
    b = run(make_cfg(tmp_path, "b"))
    assert metrics(a.run_dir) == metrics(b.run_dir) and len(metrics(a.run_dir)) > 5


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    trainer = run(make_cfg(tmp_path, "run", output={"checkpoint_every": 20, "keep_checkpoints": 2}))
    names = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    assert names == ["step-000280.pt".replace("000280", "000000280"), "step-000000300.pt"]


@pytest.mark.slow
def test_compiled_per_sample_resumes_bit_exact(tmp_path):
    # The resumed run runs each step the way the whole run did (eagerly or in a compiled chunk:
    # their last bits differ), without a new first-chunk check.
    kw = {"model": {"name": "linear"}, "trainer": {"engine": "compiled", "chunk_size": 8, "epochs": 2}}
    whole, resumed = stopped_and_resumed(tmp_path, 4, **kw)
    assert whole.engine.label == resumed.engine.label == "compiled"
    assert resumed.engine._verified and resumed.engine._fns  # it ran compiled chunks after the resume
    assert_same_run(whole, resumed)


@pytest.mark.slow
def test_auto_keeps_its_choice_on_resume(tmp_path, monkeypatch):
    # The first run's auto is made to compile; after the resume the real cost model would decline
    # (this run is far too short to pay for a load), but the run keeps compiling, bit for bit.
    kw = {"model": {"name": "linear"}, "trainer": {"engine": "auto", "chunk_size": 8, "epochs": 2}}
    with monkeypatch.context() as m:
        m.setattr(policy, "CACHED_LOAD_S", -1.0)
        m.setattr(policy, "COMPILE_BASE_S", -1.0)
        m.setattr("singlestep.engine.compiled.CACHED_LOAD_S", -1.0)
        whole = run(make_cfg(tmp_path, "whole", **kw))
        cfg = make_cfg(tmp_path, "parts", **kw)
        stopped = run(cfg, stop_after_calls=4)
    assert stopped.engine.choice == "compiled"
    resumed = resume_from(cfg, stopped.run_dir)
    assert resumed.engine.label == "auto (compiled)"
    assert any(fn is not None for fn in resumed.engine._fns.values())  # it compiled, not only its label
    assert_same_run(whole, resumed)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(tmp_path, write_config):
    cfg = base_config(trainer={"mode": "per_sample", "epochs": 2, "log_every": 1000, "progress": False, "engine": "eager"})
    cfg["data"] = {"name": "synthetic_regression", "in_features": 16, "train_size": 8000, "val_size": 100, "test_size": 100}
    cfg["optimizer"] = {"name": "adagrad", "lr": 0.05}
    cfg["output"] = {"checkpoint_every": 3000, "curves": False}
    path = write_config(cfg)
    whole = run_cli("--config", str(path), f"output.run_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "singlestep.train", "--config", str(path),
                             f"output.run_dir={tmp_path / 'killed'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    folder = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not checkpoint.checkpoints(folder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = run_cli("--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "killed")


def interrupted_in_final_evaluation(cfg, signum, *, stop_after_calls=None):
    """Train ``cfg``; a real ``signum`` arrives in the final evaluation (and SIGTERM after
    ``stop_after_calls`` engine calls). Returns the trainer and what it printed."""
    out = io.StringIO()
    trainer = Trainer(cfg, out=out)
    evaluate = trainer._evaluate

    def evaluate_then_signal(split):
        if trainer.phase == "final":
            os.kill(os.getpid(), signum)
        return evaluate(split)

    trainer._evaluate = evaluate_then_signal
    if stop_after_calls is not None:
        sigterm_after_calls(trainer, stop_after_calls)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # torch's handlers are back, after an interruption as after a run (the API's callers keep theirs)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    return trainer, out.getvalue()


def test_a_signal_in_the_final_evaluation_says_how_to_finish(tmp_path):
    # Every step is done and checkpointed: SIGTERM there (as Ctrl-C) says how to get the final
    # metrics, and that resume gives the uninterrupted run's.
    cfg = make_cfg(tmp_path, "run")
    trainer, printed = interrupted_in_final_evaluation(cfg, signal.SIGTERM)
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 300
    expected = (f"interrupted in the final evaluation, at step 300 of 300; python -m singlestep.train --resume "
                f"{trainer.run_dir} evaluates it")  # fmt: skip
    assert summary["error"] == expected and expected in printed
    finished = resume_from(cfg, trainer.run_dir)
    whole = run(make_cfg(tmp_path, "whole"))
    done = json.loads((finished.run_dir / "summary.json").read_text())
    assert done["status"] == "ok" and done["final"] == json.loads((whole.run_dir / "summary.json").read_text())["final"]
    assert metrics(finished.run_dir) == metrics(whole.run_dir)


def test_a_second_ctrl_c_in_the_final_evaluation_of_a_stopped_run_says_what_is_left(tmp_path):
    cfg = make_cfg(tmp_path, "run")
    trainer, printed = interrupted_in_final_evaluation(cfg, signal.SIGINT, stop_after_calls=3)
    expected = (f"interrupted in the final evaluation, at step 70 of 300; python -m singlestep.train --resume "
                f"{trainer.run_dir} trains the 230 steps left and evaluates")  # fmt: skip
    assert expected in printed
    assert json.loads((trainer.run_dir / "summary.json").read_text())["error"] == expected


def test_a_diverged_run_interrupted_in_its_final_evaluation_keeps_the_reason(tmp_path):
    cfg = make_cfg(tmp_path, "run", trainer={"divergence_threshold": 1e-9})
    trainer, printed = interrupted_in_final_evaluation(cfg, signal.SIGINT)
    error = json.loads((trainer.run_dir / "summary.json").read_text())["error"]
    assert error.startswith("stopped at step 40: the training loss") and error in printed
    assert error.endswith("then interrupted in the final evaluation, at step 40 of 300") and "--resume" not in error


def test_a_signal_after_the_summary_is_written_changes_nothing(tmp_path):
    # A run stopped early (a second signal would raise) has written its summary: a signal now
    # neither replaces the summary with a failure nor makes fit() raise.
    trainer = Trainer(make_cfg(tmp_path, "run"), out=open(os.devnull, "w"))
    trainer.stop_requested = True  # as after a first Ctrl-C: the loop ends at once
    write_json = RunDir.write_json

    def write_then_signal(run, name, data):
        write_json(run, name, data)
        if name == "summary.json" and trainer.phase == "final":
            trainer.phase = "done"  # what _finish sets next
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "write_json", write_then_signal)
        summary = trainer.fit()
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["status"] == saved["status"] == "interrupted" and saved["final"] is not None and saved["error"] is None


def test_a_first_signal_says_the_run_is_stopping(tmp_path):
    out = io.StringIO()
    trainer = Trainer(make_cfg(tmp_path, "run"), out=out)
    sigterm_after_calls(trainer, 3)
    assert trainer.fit()["status"] == "interrupted"
    assert "stopping at step 70: a checkpoint, the final evaluation (Ctrl-C again: now)" in out.getvalue()


def test_train_seconds_leave_out_the_final_evaluation(tmp_path):
    # A final evaluation that takes 2 s counts in the wall time, not in the training time.
    trainer = Trainer(make_cfg(tmp_path, "run"), out=open(os.devnull, "w"))
    evaluate = trainer._evaluate
    trainer._evaluate = lambda split: (time.sleep(1.0), evaluate(split))[1] if trainer.phase == "final" else evaluate(split)
    summary = trainer.fit()  # two splits: val and test
    assert summary["wall_seconds"] - summary["train_seconds"] >= 2.0
