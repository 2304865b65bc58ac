"""``python -m singlestep.sweep``: the grid, the slugs, the table, and sweeps run as a user runs them."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from singlestep import sweep
from singlestep.sweep import main, make_slugs, parse_grid
from singlestep.sweep_table import Row, Run, aggregate, draw_plots, markdown, rank, short_reason
from tests.conftest import ROOT, base_config

PNG = b"\x89PNG\r\n\x1a\n"
OUTPUT = {"dir": "runs", "curves": False}  # each run's own curves.png costs ~1 s of matplotlib; best.png is tested

# ----------------------------------------------------------------------------- the grid


def _values(grid, key):
    return [v for v, _ in grid[key]]


def test_grid_values_are_yaml_and_split_outside_brackets():
    grid = parse_grid(["optimizer=sgd,adagrad", "optimizer.lr=1e-3, 0.1", "optimizer.betas=[0.9,0.99],[0.8,0.9]"])
    assert list(grid) == ["optimizer.name", "optimizer.lr", "optimizer.betas"]  # optimizer= is optimizer.name=
    assert _values(grid, "optimizer.name") == ["sgd", "adagrad"]
    lrs = _values(grid, "optimizer.lr")
    assert lrs == [0.001, 0.1] and all(type(v) is float for v in lrs)
    assert _values(grid, "optimizer.betas") == [[0.9, 0.99], [0.8, 0.9]]
    assert grid["optimizer.lr"][0][1] == "1e-3"  # the override text passed to the run, as typed


def test_grid_log_and_lin_spacing():
    log = _values(parse_grid(["optimizer.lr=log:1e-3:1:7"]), "optimizer.lr")
    assert log == [0.001, 0.003162, 0.01, 0.03162, 0.1, 0.3162, 1.0]  # endpoints in, 4 significant digits
    assert _values(parse_grid(["optimizer.momentum=lin:0:0.9:4"]), "optimizer.momentum") == [0.0, 0.3, 0.6, 0.9]
    ints = _values(parse_grid(["trainer.batch_size=lin:16:64:4"]), "trainer.batch_size")
    assert ints == [16, 32, 48, 64] and all(type(v) is int for v in ints)
    assert _values(parse_grid(["optimizer.lr=log:0.01:0.01:1"]), "optimizer.lr") == [0.01]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("optimizer.lr", "expected key=v1,v2"),
        ("optimizer.lr=", "expected key=v1,v2"),
        ("optimizer.lr=0.1,,0.2", "an empty value"),
        ("optimizer.lr=log:0:1:3", "log: needs LO > 0"),
        ("optimizer.lr=log:1e-3:1", "takes LO:HI:N"),
        ("optimizer.lr=lin:a:1:3", "must be numbers"),
        ("optimizer.lr=lin:0:1:0", "N >= 1"),
        ("optimizer.lr=0.1,0.10", "value 0.1 appears twice"),
        ("optimizer.lr=log:1:1.00001:3", "after rounding"),
        ("optimizer.betas=[0.9,0.99", "not valid YAML"),
        ("seed=0,1", "use --seeds"),
        ("output.run_dir=a,b", "sets output.run_dir itself"),
    ],
)
def test_malformed_grid_is_one_error_line_exit_2(spec, words, tmp_path, write_config, capsys):
    out = tmp_path / "sweep"
    assert main(["--config", str(write_config(base_config())), "--grid", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grid") and words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_typo_anywhere_is_one_error_before_anything_runs(tmp_path, write_config, capsys):
    cfg = str(write_config(base_config()))
    out = tmp_path / "sweep"
    assert main(["--config", cfg, "--grid", "optimizer.lrr=0.1,0.2", "--out", str(out)]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["--config", cfg, "--grid", "optimizer.lr=0.1,0.2", "trainer.epoch=2", "--out", str(out)]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
    assert main(["--config", cfg, "--grid", "optimizer.lr=0.1,0.2", "optimizer.lr=0.3", "--out", str(out)]) == 2
    assert "also a --grid key" in capsys.readouterr().err
    assert main(["--config", cfg, "--metric", "accuracy", "--out", str(out)]) == 2
    assert "expected split.name" in capsys.readouterr().err
    assert main(["--config", cfg, "--jobs", "0", "--out", str(out)]) == 2
    assert main(["--config", cfg, "--seeds", "0,x", "--out", str(out)]) == 2
    assert main(["--bogus"]) == 2
    assert not out.exists()  # nothing was started


def test_slugs_are_readable_filesystem_safe_and_unique():
    combos = [
        {"optimizer.name": "sgd", "optimizer.lr": 0.001},
        {"optimizer.name": "adagrad", "optimizer.lr": 1e-05},
        {"optimizer.name": "my/opts:Sign SGD", "optimizer.lr": 0.001},  # cleans to the same text as the next
        {"optimizer.name": "my-opts-Sign-SGD", "optimizer.lr": 0.001},
        {"optimizer.name": "sgd", "optimizer.lr": 0.001, "optimizer.betas": [0.9, 0.99]},
    ]
    slugs = make_slugs(combos, [0, 1])
    assert slugs[0, 0] == "sgd_lr0.001_s0" and slugs[0, 1] == "sgd_lr0.001_s1"
    assert slugs[1, 0] == "adagrad_lr1e-05_s0"
    assert slugs[4, 0] == "sgd_lr0.001_betas-0.9-0.99-_s0"
    assert len(set(slugs.values())) == len(slugs) == 10
    assert slugs[2, 0] != slugs[3, 0] and slugs[2, 0].startswith("my-opts-Sign-SGD_lr0.001_s0-")  # a hash added
    assert all(s.replace(".", "").replace("_", "").replace("-", "").replace("=", "").isalnum() for s in slugs.values())
    assert make_slugs([{}], [3]) == {(0, 3): "s3"}
    assert make_slugs(combos, [0, 1]) == slugs  # stable: the same command finds the same folders


def test_jobs_divide_the_cores_between_the_children(tmp_path):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for n in (1, 2, 64):
        env = sweep._Sweep([], tmp_path, "c.yaml", [], n, None).env
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, cpus // n))
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


# ----------------------------------------------------------------------------- the table (no training)


def _ok(seed, value, metric="accuracy", steps=100, wall=2.0):
    return Run(seed, "ok", summary={"final": {"val": {metric: value}}, "steps": steps, "wall_seconds": wall},
               run_dir=Path(f"r{seed}"))  # fmt: skip


def test_mean_and_std_over_the_seeds_that_finished():
    row = aggregate({"optimizer.lr": 0.1}, [_ok(0, 0.8, wall=1.0), _ok(1, 0.9, wall=2.0), _ok(2, 1.0, wall=3.0)],
                    "val.accuracy")  # fmt: skip
    assert row.status == "ok" and (row.n_ok, row.n_seeds) == (3, 3)
    assert row.mean == pytest.approx(0.9) and row.std == pytest.approx(0.1)  # sample std (n - 1)
    assert row.wall_seconds == pytest.approx(2.0) and row.steps == 100
    assert row.run_dirs == [Path("r0"), Path("r1"), Path("r2")]

    partial = aggregate({}, [_ok(0, 0.7), Run(1, "failed", reason="boom"), _ok(2, None)], "val.accuracy")
    assert partial.status == "partial: seed 1 failed: boom; seed 2 diverged"
    assert partial.mean == 0.7 and partial.std is None and (partial.n_ok, partial.n_seeds) == (1, 3)

    assert aggregate({}, [_ok(0, None), _ok(1, None)], "val.accuracy").status == "diverged"
    failed = aggregate({}, [Run(0, "failed", reason="config error: x"), _ok(1, None)], "val.accuracy")
    assert failed.status == "failed: config error: x" and failed.mean is None
    assert aggregate({}, [_ok(0, 0.5), Run(1, "interrupted")], "val.accuracy").status == "interrupted"
    assert aggregate({}, [_ok(0, 0.5), Run(1, "not run")], "val.accuracy").status == "interrupted"
    assert aggregate({}, [Run(0, "not run")], "val.accuracy").status == "not run"


def _row(name, lr, mean, status="ok"):
    return Row({"optimizer.name": name, "optimizer.lr": lr}, status, mean=mean, n_ok=int(mean is not None))


def _hand_made_rows():
    return [
        _row("sgd", 0.01, 0.80), _row("sgd", 0.1, 0.85), _row("sgd", 1.0, None, "failed: exit code 1"),
        _row("adagrad", 0.01, 0.83), _row("adagrad", 0.1, None, "diverged"), _row("adagrad", 1.0, 0.60, "partial: x"),
    ]  # fmt: skip


def test_rows_sort_by_the_metric_failed_last_and_best_lr_per_optimizer_marked():
    rows = rank(_hand_made_rows(), "val.accuracy", "optimizer.lr")  # higher is better
    order = [(r.values["optimizer.name"], r.values["optimizer.lr"]) for r in rows]
    assert order == [("sgd", 0.1), ("adagrad", 0.01), ("sgd", 0.01), ("adagrad", 1.0), ("adagrad", 0.1), ("sgd", 1.0)]
    assert [r.best for r in rows] == [True, True, False, False, False, False]

    rows = rank(_hand_made_rows(), "val.loss", "optimizer.lr")  # the same numbers read as a loss: lower first
    order = [(r.values["optimizer.name"], r.values["optimizer.lr"]) for r in rows]
    assert order == [("adagrad", 1.0), ("sgd", 0.01), ("adagrad", 0.01), ("sgd", 0.1), ("adagrad", 0.1), ("sgd", 1.0)]
    assert [r.best for r in rows] == [True, True, False, False, False, False]

    rows = rank(_hand_made_rows(), "val.accuracy", None)  # no lr key: only the single best row
    assert [r.best for r in rows] == [True] + [False] * 5


def test_markdown_table_is_a_github_table():
    rows = rank([Row({"optimizer.name": "sgd", "optimizer.lr": 0.1}, "ok", 0.85, 0.0123, 2, 2, 640, 3.21),
                 Row({"optimizer.name": "a|b", "optimizer.lr": -1}, "failed: bad | value")],
                "val.accuracy", "optimizer.lr")  # fmt: skip
    lines = markdown(rows, ["optimizer.name", "optimizer.lr"], "val.accuracy", "caption").splitlines()
    assert lines[0] == "caption" and lines[1] == ""
    head = "| optimizer.name | optimizer.lr | val.accuracy (mean ± std) | seeds ok | steps | wall s | status | best |"
    assert lines[2] == head
    assert lines[3] == "|---|---|---:|---:|---:|---:|---|:-:|"
    assert lines[4] == "| sgd | 0.1 | 0.85 ± 0.012 | 2/2 | 640 | 3.21 | ok | * |"
    assert lines[5] == "| a\\|b | -1 |  | 0/1 |  |  | failed: bad \\| value |  |"


DIVERGED = "the training loss 3.1e+05 is over trainer.divergence_threshold 1000 (the window ending at step 2000)"


def test_diverged_and_failed_runs_carry_their_reason_into_the_status():
    row = aggregate({}, [Run(0, "diverged", reason=DIVERGED), Run(1, "diverged", reason="other")], "val.loss")
    assert row.status == f"diverged: {DIVERGED}" and row.mean is None and row.n_ok == 0
    assert [r["reason"] for r in row.runs] == [DIVERGED, "other"] and row.runs[0]["status"] == "diverged"
    partial = aggregate({}, [_ok(0, 0.5), Run(1, "diverged", reason=DIVERGED), _ok(2, None)], "val.accuracy")
    assert partial.status == f"partial: seed 1 diverged: {DIVERGED}; seed 2 diverged" and partial.mean == 0.5
    assert aggregate({}, [Run(0, "diverged")], "val.loss").status == "diverged"  # no reason: the word alone
    # diverged before failed, as for a NaN metric
    ranked = rank([Row({"x": 1}, "failed: boom"), Row({"x": 2}, f"diverged: {DIVERGED}")], "val.loss", None)
    assert [r.values["x"] for r in ranked] == [2, 1]

    long = "non-finite loss or gradients: 3 of the 100 steps up to step 100 were skipped " * 3
    assert len(short_reason(long)) <= 160 and short_reason(long).endswith("skipped…")
    hint = "x" * 150 + " (trainer.on_nonfinite: stop; 'skip' trains on past them)"
    assert short_reason(hint) == "x" * 150  # a trailing hint goes first
    assert short_reason("a\n  b") == "a b"


def test_best_png_draws_the_best_seed_of_the_best_row(tmp_path, monkeypatch):
    pytest.importorskip("singlestep.plot")
    drawn = {}

    def fake_plot_runs(run_dirs, out, **kwargs):
        drawn["run_dirs"], drawn["labels"] = list(run_dirs), kwargs["labels"]
        return out

    monkeypatch.setattr("singlestep.plot.plot_runs", fake_plot_runs)
    seeds = [_ok(0, 0.8), _ok(1, 0.95), Run(2, "failed", reason="boom"), _ok(3, 0.9)]
    row = aggregate({"optimizer.name": "sgd"}, seeds, "val.accuracy")  # higher is better: seed 1
    assert row.best_run_dir == Path("r1") and row.best_seed == 1 and row.run_dirs[0] == Path("r0")
    draw_plots(tmp_path, rank([row], "val.accuracy", None), "val.accuracy", None, "sgd")
    assert drawn == {"run_dirs": [Path("r1")], "labels": ["sgd seed=1"]}

    seeds = [_ok(0, 0.8, "loss"), _ok(1, 0.95, "loss"), Run(2, "failed", reason="boom"), _ok(3, 0.9, "loss")]
    row = aggregate({"optimizer.name": "sgd"}, seeds, "val.loss")  # the same numbers as a loss: seed 0
    draw_plots(tmp_path, rank([row], "val.loss", None), "val.loss", None, "sgd")
    assert drawn["run_dirs"] == [Path("r0")]


def _write_summary(run_dir: Path, **summary) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir


def test_a_diverged_run_is_finished_and_a_failed_one_is_retried(tmp_path, write_config, capsys):
    runs = tmp_path / "sweep" / "runs"
    finals = {"val": {"loss": 0.5, "mse": 0.5}, "test": {"loss": 0.6, "mse": 0.6, "r2": 0.1}}
    _write_summary(runs / "lr0.01_s0", status="ok", error=None, interrupted=False, final=finals, steps=128)
    # diverged over the threshold with a finite final loss: the status decides, not the number
    _write_summary(runs / "lr0.1_s0", status="diverged", error=DIVERGED, interrupted=False, steps=2000,
                   final={"val": {"loss": 812.0, "mse": 812.0}, "test": {"loss": None, "mse": None, "r2": None}})  # fmt: skip
    _write_summary(runs / "lr0.05_s0", status="failed", error="cannot write checkpoint: disk full",
                   interrupted=False, final=None)  # fmt: skip
    argv = ["--config", str(write_config(base_config(output=OUTPUT))), "--grid", "optimizer.lr=0.01,0.1,0.05",
            "--out", str(tmp_path / "sweep")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"lr=0.1 seed=0: skipped (finished earlier) diverged: {DIVERGED}" in printed
    assert "lr=0.05 seed=0: ok val.loss" in printed and "done: 3/3 runs finished (2 skipped" in printed
    assert not (runs / "lr0.1_s0.log").exists() and not (runs / "lr0.01_s0.log").exists()  # not run again
    assert (runs / "lr0.05_s0.incomplete-1" / "summary.json").exists()  # the failed one retried from scratch
    rows = {r["values"]["optimizer.lr"]: r for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]}
    assert rows[0.1]["status"] == f"diverged: {DIVERGED}" and rows[0.1]["mean"] is None
    assert rows[0.1]["runs"][0]["reason"] == DIVERGED
    assert rows[0.01]["status"] == rows[0.05]["status"] == "ok"
    assert f"| 0.1 |  | 0/1 |  |  | diverged: {DIVERGED} |  |" in (tmp_path / "sweep" / "summary.md").read_text()


def test_a_finished_child_is_read_from_its_exit_code_and_summary(tmp_path, capsys):
    runs = tmp_path / "runs"
    job = sweep._Job(0, 0, "r", "lr=0.1 seed=0", {}, [], {})
    s = sweep._Sweep([job], tmp_path, "c.yaml", [], 1, "val.loss")
    log = runs / "r.log"

    def finish(rc, log_text="", **summary):
        run_dir = runs / "r"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)
        if summary:
            (run_dir / "summary.json").write_text(json.dumps(summary))
        log.write_text("# start\n" + log_text)
        s.running[object()] = (job, log, len("# start\n"), time.perf_counter())
        s._finish(next(iter(s.running)), rc)
        return job.run

    run = finish(3, "error: training stopped\n", status="diverged", error=DIVERGED, final={"val": {"loss": None}})
    assert (run.status, run.reason) == ("diverged", DIVERGED) and run.summary["status"] == "diverged"
    assert finish(3, "error: the loss is nan at step 7\n").reason == "the loss is nan at step 7"  # no summary
    run = finish(2, "error: cannot write\n", status="failed", error="cannot write checkpoint: disk full", final=None)
    assert (run.status, run.reason) == ("failed", "cannot write checkpoint: disk full")
    run = finish(1, "Traceback ...\nerror: internal\n", status="failed", error=None, final=None)
    assert (run.status, run.reason) == ("failed", "internal")  # no error in the summary: the log's line
    assert (finish(1, "boom\n").status, finish(1, "boom\n").reason) == ("failed", "exit code 1: boom")
    assert finish(130, status="interrupted", interrupted=True, error=None).status == "interrupted"
    assert finish(0, status="ok", interrupted=False, error=None, final={"val": {"loss": 0.1}}).status == "ok"
    assert finish(0, interrupted=False, final={"val": {"loss": float("nan")}}).status == "ok"  # older: aggregate says
    printed = capsys.readouterr().out
    assert f"lr=0.1 seed=0: diverged: {DIVERGED}" in printed and "failed: cannot write checkpoint: disk full" in printed


def test_without_the_plot_module_the_sweep_only_notes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "singlestep.plot", None)  # as if plot.py or matplotlib were missing
    notes = draw_plots(tmp_path, [_row("sgd", 0.1, 0.5)], "val.accuracy", "optimizer.lr", "sgd")
    assert len(notes) == 1 and notes[0].startswith("note: no pictures") and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- sweeps, as a user runs them


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_sweep_with_a_failing_combination_then_a_rerun_skips_what_finished(tmp_path, write_config, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", str(write_config(base_config(output=OUTPUT))), "--grid", "optimizer.lr=0.05,-1",
            "--seeds", "0,1", "--jobs", "2", "--out", str(out), "trainer.epochs=2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "lr=-1 seed=1: failed: config error: optimizer: Invalid learning rate: -1" in printed
    assert "lr=0.05 seed=0: ok val.loss" in printed  # regression runs: the default metric is val.loss

    finals = [json.loads((out / "runs" / f"lr0.05_s{s}" / "summary.json").read_text()) for s in (0, 1)]
    losses = [f["final"]["val"]["loss"] for f in finals]
    assert all(f["steps"] == 128 for f in finals) and losses[0] != losses[1]  # the seed changes the run
    data = json.loads((out / "sweep.json").read_text())
    assert data["metric"] == "val.loss" and data["higher_is_better"] is False
    assert data["grid"] == {"optimizer.lr": [0.05, -1]} and data["seeds"] == [0, 1]
    good, bad = data["rows"]
    assert good["values"] == {"optimizer.lr": 0.05} and good["status"] == "ok" and good["best"] is True
    assert good["mean"] == pytest.approx(statistics.fmean(losses))
    assert good["std"] == pytest.approx(statistics.stdev(losses))
    assert (good["n_ok"], good["n_seeds"], good["steps"]) == (2, 2, 128)
    assert bad["status"] == "failed: config error: optimizer: Invalid learning rate: -1" and bad["n_ok"] == 0
    assert bad["best"] is False and bad["mean"] is None
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["optimizer.lr"] for r in table] == ["0.05", "-1"] and float(table[0]["val.loss_mean"]) == good["mean"]
    md = (out / "summary.md").read_text()
    assert f"| 0.05 | {good['mean']:.4g} ± {good['std']:.2g} | 2/2 | 128 |" in md
    assert "| -1 |  | 0/2 |  |  | failed: config error: optimizer: Invalid learning rate: -1 |  |" in md
    assert "Invalid learning rate" in (out / "runs" / "lr-1_s0.log").read_text()
    assert not (out / "runs" / "lr-1_s0").exists()
    for picture in ("best.png", "lr.png"):
        assert (out / picture).read_bytes()[:8] == PNG, picture

    # The same command again: the finished runs are skipped, the failed ones retried.
    before = _mtimes(out)
    assert set(before) == {"lr0.05_s0", "lr0.05_s1"}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lr=0.05 seed=0: skipped (finished earlier) val.loss" in printed and "lr=0.05 seed=1: skipped" in printed
    assert "(2 skipped, finished earlier)" in printed
    assert _mtimes(out) == before
    assert (out / "runs" / "lr0.05_s0.log").read_text().count("\n# ") == 0  # one start only (the first line)
    assert (out / "runs" / "lr-1_s0.log").read_text().count("\n# ") == 1  # retried once
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["mean"] == good["mean"]

    # A metric the finished runs do not report: one clear error, nothing started.
    assert main([*argv, "--metric", "val.accuracy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --metric val.accuracy: the runs report val.loss, val.mse") and "test.r2" in err
    assert (out / "runs" / "lr-1_s0.log").read_text().count("\n# ") == 1

    # A folder left unfinished without checkpoints is moved aside, never deleted, and run again.
    (out / "runs" / "lr0.05_s1" / "summary.json").unlink()
    for ckpt in (out / "runs" / "lr0.05_s1" / "checkpoints").glob("*"):
        ckpt.unlink()
    (out / "runs" / "lr0.05_s1" / "checkpoints").rmdir()
    smaller = [a.replace("optimizer.lr=0.05,-1", "optimizer.lr=0.05") for a in argv]  # the same folders for 0.05
    assert main(smaller) == 0
    assert "moved unfinished" in capsys.readouterr().out
    assert (out / "runs" / "lr0.05_s1.incomplete-1" / "metrics.jsonl").exists()
    summary = json.loads((out / "runs" / "lr0.05_s1" / "summary.json").read_text())
    assert summary["final"]["val"]["loss"] == losses[1] and summary["interrupted"] is False  # same seed, same run
    assert _mtimes(out)["lr0.05_s0"] == before["lr0.05_s0"]


def test_a_checkpoints_folder_without_a_checkpoint_file_starts_over(tmp_path, write_config, capsys):
    # A first checkpoint write that failed or was killed: checkpoints/ empty, or only a hidden temporary.
    out = tmp_path / "sweep"
    for slug, leftover in (("lr0.05_s0", None), ("lr0.1_s0", ".step-00000016.pt.4242.tmp")):
        (out / "runs" / slug / "checkpoints").mkdir(parents=True)
        (out / "runs" / slug / "metrics.jsonl").write_text('{"event": "train", "step": 8}\n')
        if leftover:
            (out / "runs" / slug / "checkpoints" / leftover).write_bytes(b"half a checkpoint")
    argv = ["--config", str(write_config(base_config(output=OUTPUT))), "--grid", "optimizer.lr=0.05,0.1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("moved unfinished") == 2 and "done: 2/2 runs finished" in printed, printed
    for slug in ("lr0.05_s0", "lr0.1_s0"):
        assert "--resume" not in (out / "runs" / f"{slug}.log").read_text()
        assert (out / "runs" / f"{slug}.incomplete-1" / "metrics.jsonl").exists()  # kept, never deleted
        assert json.loads((out / "runs" / slug / "summary.json").read_text())["steps"] == 64


def test_ctrl_c_stops_the_children_cleanly_and_the_rerun_resumes(tmp_path, write_config):
    data = {"name": "synthetic_regression", "in_features": 4, "train_size": 20000, "val_size": 16, "test_size": 16}
    trainer = {"mode": "per_sample", "epochs": 1, "log_every": 200, "progress": False, "engine": "eager"}
    cfg = write_config(base_config(data=data, trainer=trainer, output=OUTPUT))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "singlestep.sweep", "--config", str(cfg), "--grid", "data.train_size=20000,64",
           "--out", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "train_size20000_s0" / "metrics.jsonl"
    deadline = time.time() + 60
    while not metrics.exists() or not metrics.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopping: waiting for 1 run(s)" in stderr
    assert stdout.strip().splitlines()[-1].startswith("interrupted: 0/2 runs finished")
    first = json.loads((metrics.parent / "summary.json").read_text())
    assert first["interrupted"] is True and 0 < first["steps"] < 20000
    assert (metrics.parent / "checkpoints").is_dir()
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["values"]["data.train_size"], r["status"]) for r in rows] == [(20000, "interrupted"), (64, "not run")]
    assert not (out / "runs" / "train_size64_s0").exists()

    # The same command continues: the interrupted run resumes from its checkpoint.
    result = subprocess.run([*cmd, "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (out / "runs" / "train_size20000_s0.log").read_text()
    starts = [line for line in log.splitlines() if line.startswith("# ")]
    assert len(starts) == 2 and starts[1].endswith(f"--resume {metrics.parent}")
    resumed = json.loads((metrics.parent / "summary.json").read_text())
    assert resumed["interrupted"] is False and resumed["steps"] == 20000
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert sorted(r["status"] for r in rows) == ["ok", "ok"] and not list((out / "runs").glob("*.incomplete-*"))
