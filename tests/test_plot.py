"""``singlestep.plot``: curves from run folders, legend labels from config differences, CLI errors.

Run folders are written by hand (a config.yaml and a few metrics lines) so each test takes well
under a second; one test trains a real tiny run and plots it through ``python -m singlestep.plot``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from singlestep import plot
from singlestep.plot import differing_keys, main, plot_metric_vs_lr, plot_runs, run_labels, write_run_curves
from tests.conftest import ROOT, base_config

imread = pytest.importorskip("matplotlib.image").imread


def make_run(path, *, lr=0.01, optimizer="sgd", times=True, steps=(10, 20, 30, 40), tail=""):
    """A classification run folder: train lines every 10 steps, val at 20 and 40, test at 40."""
    path.mkdir(parents=True)
    cfg = {"name": "t", "seed": 0, "model": {"name": "linear"},
           "optimizer": {"name": optimizer, "lr": lr}, "output": {"run_dir": str(path)}}  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    lines = []
    for s in steps:
        lines.append({"event": "train", "step": s, "epoch": s / 40, "split": "train", "loss": 1.0 / s,
                      "lr": lr, "grad_norm": 2.0 / s, "grad_norm_max": 3.0 / s, "skipped_steps": 0})  # fmt: skip
        if s % 20 == 0:
            lines.append({"event": "eval", "step": s, "epoch": s / 40, "split": "val", "loss": 1.5 / s,
                          "accuracy": 0.5 + s / 100, "f1": 0.4 + s / 100})  # fmt: skip
    lines.append({"event": "eval", "step": steps[-1], "epoch": 1.0, "split": "test", "loss": 0.05, "accuracy": 0.88})
    for i, line in enumerate(lines):
        if times:
            line["time"] = 0.5 * i
    text = "".join(json.dumps(line) + "\n" for line in lines) + tail
    (path / "metrics.jsonl").write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def figures(monkeypatch):
    """Every Figure the plot functions create, kept for inspection."""
    made = []
    original = plot._figure

    def keep(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plot, "_figure", keep)
    return made


def panel_titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def legend_texts(fig) -> list[str]:
    legends = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1, "one legend per figure"
    return [t.get_text() for t in legends[0].get_texts()]


def test_png_is_an_image_of_the_figure_size(tmp_path, figures):
    out = plot_runs([make_run(tmp_path / "a")], tmp_path / "sub" / "c.png")
    image = imread(out)
    assert out == tmp_path / "sub" / "c.png"
    assert image.shape[:2] == (800, 1200)  # 12 x 8 inches at 100 dpi
    assert panel_titles(figures[0]) == ["loss", "accuracy", "learning rate", "gradient norm (pre-clip)"]
    assert figures[0].axes[2].get_yscale() == "log" and figures[0].axes[3].get_yscale() == "log"
    assert legend_texts(figures[0]) == ["a", "train", "val", "test"]


def test_cli_one_run_writes_curves_png_in_its_folder(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    assert imread(run / "curves.png").shape[:2] == (800, 1200)


def test_cli_two_runs_default_to_the_working_folder_and_label_the_lr(tmp_path, monkeypatch, capsys, figures):
    a, b = make_run(tmp_path / "a", lr=0.1), make_run(tmp_path / "b", lr=0.003)
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b), "--title", "lr sweep"]) == 0
    assert capsys.readouterr().out.strip() == "curves.png"
    assert (tmp_path / "curves.png").is_file()
    assert legend_texts(figures[0])[:2] == ["optimizer.lr=0.1", "optimizer.lr=0.003"]
    assert figures[0].get_suptitle() == "lr sweep"


def test_cli_out_folder_writes_curves_png_in_it_and_prints_the_path_written(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    (tmp_path / "pics").mkdir()
    assert main([str(run), "--out", str(tmp_path / "pics")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pics" / "curves.png")
    assert imread(tmp_path / "pics" / "curves.png").shape[:2] == (800, 1200)
    assert not (tmp_path / "pics.png").exists()
    assert main([str(run), "--out", str(tmp_path / "new") + os.sep]) == 0  # a trailing slash: a folder to create
    assert capsys.readouterr().out.strip() == str(tmp_path / "new" / "curves.png")
    assert (tmp_path / "new" / "curves.png").is_file()
    assert main([str(run), "--out", str(tmp_path / "plain")]) == 0  # no suffix: matplotlib adds .png; say so
    assert capsys.readouterr().out.strip() == str(tmp_path / "plain.png")
    assert (tmp_path / "plain.png").is_file()


def test_differing_keys_ignore_name_and_output_and_the_other_optimizers_arguments():
    sgd = {"name": "a", "seed": 0, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
           "scheduler": None, "output": {"run_dir": "x"}}  # fmt: skip
    adagrad = {"name": "b", "seed": 0, "optimizer": {"name": "adagrad", "lr": 0.1, "lr_decay": 0.0},
               "scheduler": {"name": "cosine", "warmup_steps": 0}, "output": {"run_dir": "y"}}  # fmt: skip
    assert differing_keys([sgd, adagrad]) == ["optimizer.name", "scheduler.name"]
    assert differing_keys([sgd, dict(sgd, seed=1)]) == ["seed"]
    assert differing_keys([sgd, sgd]) == [] and differing_keys([sgd]) == []
    momentum = dict(sgd, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert differing_keys([sgd, momentum, adagrad]) == ["optimizer.name", "optimizer.momentum", "scheduler.name"]


def test_run_labels_name_the_differing_values_else_the_folders():
    a = {"optimizer": {"name": "sgd", "lr": 0.1}}
    b = {"optimizer": {"name": "adagrad", "lr": 0.01}}
    assert run_labels([a, b], ["ra", "rb"]) == ["optimizer.name=sgd, optimizer.lr=0.1",
                                                "optimizer.name=adagrad, optimizer.lr=0.01"]  # fmt: skip
    assert run_labels([a, a], ["ra", "rb"]) == ["ra", "rb"]
    assert run_labels([a], ["ra"]) == ["ra"]
    assert run_labels([a, a, b], ["r1", "r2", "r3"]) == ["optimizer.name=sgd, optimizer.lr=0.1 (r1)",
        "optimizer.name=sgd, optimizer.lr=0.1 (r2)", "optimizer.name=adagrad, optimizer.lr=0.01"]  # fmt: skip


def test_metric_selects_panels_in_the_order_given(tmp_path, figures):
    assert main([str(make_run(tmp_path / "a")), "--metric", "f1", "--metric", "loss"]) == 0
    assert panel_titles(figures[0]) == ["f1", "loss"]


def test_unknown_metric_exits_2_listing_the_available_ones(tmp_path, capsys):
    assert main([str(make_run(tmp_path / "a")), "--metric", "acuracy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown metric 'acuracy'")
    assert "loss, accuracy, lr, grad_norm, f1, grad_norm_max" in err
    assert not (tmp_path / "a" / "curves.png").exists()


def test_x_epoch_puts_epochs_on_the_x_axis(tmp_path, figures):
    assert main([str(make_run(tmp_path / "a")), "--x", "epoch", "--metric", "loss"]) == 0
    ax = figures[0].axes[0]
    assert ax.get_xlabel() == "epoch"
    assert list(ax.lines[0].get_xdata()) == [0.25, 0.5, 0.75, 1.0]  # the train line
    assert list(ax.lines[1].get_xdata()) == [0.5, 1.0]  # the val line


def test_x_time_uses_seconds_and_refuses_runs_without_them(tmp_path, capsys, figures):
    assert main([str(make_run(tmp_path / "a")), "--x", "time", "--metric", "lr"]) == 0
    assert list(figures[0].axes[0].lines[0].get_xdata()) == [0.0, 0.5, 1.5, 2.0]
    old = make_run(tmp_path / "old", times=False)
    assert main([str(old), "--x", "time"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and str(old) in err and "--x step" in err


def test_a_truncated_last_line_is_skipped_and_a_damaged_middle_line_is_an_error(tmp_path, capsys, figures):
    run = make_run(tmp_path / "a", tail='{"event": "train", "step": 50, "lo')
    assert main([str(run), "--metric", "loss"]) == 0
    assert list(figures[0].axes[0].lines[0].get_xdata()) == [10, 20, 30, 40]
    bad = make_run(tmp_path / "b")
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main([str(bad)]) == 2
    expected = f"error: {bad / 'metrics.jsonl'}:2: not a JSON object; the file is damaged"
    assert capsys.readouterr().err.strip() == expected


def test_a_metrics_file_that_is_not_utf8_is_one_error_line_naming_file_and_line(tmp_path, capsys, figures):
    bad = make_run(tmp_path / "b")
    lines = (bad / "metrics.jsonl").read_bytes().splitlines()
    (bad / "metrics.jsonl").write_bytes(b"\n".join([lines[0], lines[1][:-2] + b'\xff"}', *lines[2:]]) + b"\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad / 'metrics.jsonl'}:2: not UTF-8 text (byte 0xff at column ")
    assert err.count("\n") == 1 and "Traceback" not in err
    # half a character as the last line (a run killed mid-write) is skipped, as half a JSON line is
    cut = make_run(tmp_path / "c", tail='{"event": "train", "step": 50, "note": "')
    (cut / "metrics.jsonl").write_bytes((cut / "metrics.jsonl").read_bytes() + "é".encode()[:1])
    assert main([str(cut), "--metric", "loss"]) == 0
    assert list(figures[-1].axes[0].lines[0].get_xdata()) == [10, 20, 30, 40]


def test_null_values_become_gaps_and_mark_a_diverged_run(tmp_path, figures):
    run = make_run(tmp_path / "a")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    [x for x in lines if x["event"] == "train"][-1]["loss"] = None
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plot_runs([run], tmp_path / "c.png", metrics=["loss"])
    ys = figures[0].axes[0].lines[0].get_ydata()
    assert math.isnan(ys[-1]) and ys[0] == pytest.approx(0.1)
    assert legend_texts(figures[0])[0] == "a (diverged)"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-folder", "error: run folder '{p}' does not exist"),
        ("no-metrics", "error: '{p}' has no metrics.jsonl"),
        ("empty-metrics", "error: {p}/metrics.jsonl: no train or eval metrics yet"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, case, message):
    path = tmp_path / "run"
    if case != "missing-folder":
        path.mkdir()
    if case == "empty-metrics":
        (path / "metrics.jsonl").write_text("\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(p=path)) and err.count("\n") == 1 and "Traceback" not in err


def test_argparse_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--x", "wall"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m singlestep.plot: argument --x: invalid choice: 'wall'")


def test_plot_metric_vs_lr_skips_nan_points_and_marks_an_all_diverged_label(tmp_path, figures):
    nan = float("nan")
    curves = {"sgd": [(0.1, nan, nan), (0.001, 0.8, 0.02), (0.01, 0.9, nan)],
              "lion": [(0.1, nan, 0.0), (0.01, float("inf"), 0.0)]}  # fmt: skip
    out = plot_metric_vs_lr(curves, tmp_path / "lr.png", metric="val accuracy")
    assert imread(out).ndim == 3
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "val accuracy"
    assert list(ax.lines[0].get_xdata()) == [0.001, 0.01]  # sorted by lr, the NaN point left out
    assert legend_texts(figures[0]) == ["sgd", "lion (all diverged)", "diverged"]


def test_write_run_curves_writes_curves_png(tmp_path):
    run = make_run(tmp_path / "a")
    assert write_run_curves(run) == run / "curves.png"
    assert imread(run / "curves.png").shape[:2] == (800, 1200)


def test_write_run_curves_warns_instead_of_failing_the_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.warns(UserWarning, match="curves.png not written: UserError: .*no train or eval metrics"):
        assert write_run_curves(tmp_path / "run") is None
    assert not (tmp_path / "run" / "curves.png").exists()


def test_ctrl_c_while_the_curves_are_drawn_skips_them_with_a_warning(tmp_path, monkeypatch):
    # The run is finished and saved by then: the interrupt costs the picture, not the exit code.
    run = make_run(tmp_path / "a")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "plot_runs", interrupted)
    with pytest.warns(UserWarning, match="curves.png not written: interrupted"):
        assert write_run_curves(run) is None


def test_without_matplotlib_no_curves_and_the_cli_says_how_to_install(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "a")
    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` raise ImportError
    assert write_run_curves(run) is None
    assert not (run / "curves.png").exists()
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install 'singlestep[plot]'\n"


def test_a_real_run_plots_through_the_module_entry_point(tmp_path):
    from singlestep.config import validate
    from singlestep.trainer import Trainer

    cfg = base_config()
    cfg["output"] = {"run_dir": str(tmp_path / "run")}
    with open(os.devnull, "w") as sink:
        Trainer(validate(cfg, "test.yaml"), out=sink).fit()
    # output.curves is on by default: the trainer drew the run's own curves.png
    assert imread(tmp_path / "run" / "curves.png").shape[:2] == (800, 1200)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(e["time"], float) for e in events)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "singlestep.plot", str(tmp_path / "run"), "--out", str(tmp_path / "r.png")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "r.png")
    assert imread(tmp_path / "r.png").shape[:2] == (800, 1200)
