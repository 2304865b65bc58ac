"""The CLI as a user runs it: a subprocess, its exit code, its files, its messages."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import ROOT, base_config, run_cli


def test_run_writes_config_metrics_summary(tmp_path, write_config):
    run_dir = tmp_path / "out" / "r1"
    path = write_config(base_config())
    result = run_cli("--config", str(path), f"output.run_dir={run_dir}", "trainer.epochs=2")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["trainer"]["epochs"] == 2 and resolved["optimizer"]["lr"] == 0.05
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert train_events and {"step", "epoch", "split", "loss", "lr", "grad_norm", "samples_per_second"} <= set(train_events[0])
    assert {e["split"] for e in events if e["event"] == "eval"} == {"val", "test"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 128 and summary["epochs"] == 2
    assert {"val", "test", "train"} <= set(summary["final"])
    assert summary["torch_version"] and summary["device"] == "cpu" and summary["wall_seconds"] > 0
    assert (run_dir / "model.pt").exists()
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: t") and str(run_dir) in last


def test_default_run_dir_is_a_new_subfolder(tmp_path, write_config):
    path = write_config(base_config())
    for _ in range(2):
        assert run_cli("--config", str(path), f"output.dir={tmp_path / 'runs'}").returncode == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_bad_config_exits_2_without_traceback(write_config):
    cfg = base_config(optimizer={"name": "torch.optim.SGD", "lr": "fast", "momentun": 0.9})
    result = run_cli("--config", str(write_config(cfg)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "optimizer.lr" in result.stderr and "did you mean 'momentum'" in result.stderr
    assert result.stderr.startswith("error: 2 config errors")


def test_user_errors_exit_2(tmp_path, write_config):
    cases = [
        ["--config", str(tmp_path / "missing.yaml")],
        ["--config", str(write_config(base_config()))] + ["trainer.epochs"],
        ["--config", str(write_config(base_config(), "b.yaml")), "device=cuda:7"],
        ["--config", str(write_config(base_config(optimizer={"name": "torch.optim.SGD", "lr": -1.0}), "c.yaml"))],
        ["--bogus-flag"],
        [],
    ]
    for args in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith("error:"), (args, result.stderr)


def test_existing_run_dir_is_never_overwritten(tmp_path, write_config):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("precious")
    result = run_cli("--config", str(write_config(base_config())), f"output.run_dir={run_dir}")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (run_dir / "summary.json").read_text() == "precious"


def test_print_config_prints_resolved_yaml(write_config):
    result = run_cli("--config", str(write_config(base_config())), "--print-config", "optimizer.momentum=0.9")
    assert result.returncode == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optimizer"] == {**resolved["optimizer"], "name": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}
    assert resolved["trainer"]["clip_grad_norm"] is None


def test_list_names_every_kind():
    result = run_cli("--list")
    assert result.returncode == 0
    for word in ("models:", "datasets:", "optimizers:", "schedulers:", "linear", "synthetic_regression"):
        assert word in result.stdout


def test_sigint_stops_cleanly_with_130(tmp_path, write_config):
    run_dir = tmp_path / "r"
    cfg = base_config(data={"name": "synthetic_regression", "in_features": 4, "train_size": 200000, "val_size": 16, "test_size": 16},
                      trainer={"mode": "per_sample", "epochs": 1, "log_every": 1000, "progress": False})  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "singlestep.train", "--config", str(write_config(cfg)), f"output.run_dir={run_dir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and 0 < summary["steps"] < 200000
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith("interrupted: t")
