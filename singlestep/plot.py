"""Draw training curves from run folders, and a metric against the learning rate for a sweep.

    python -m singlestep.plot RUN_DIR [...] [--out FILE.png|DIR] [--metric NAME ...] [--x step|epoch|time] [--title TEXT]

:func:`plot_runs` reads each run's ``metrics.jsonl`` and draws one panel per metric, in a grid:
the loss (train solid, val dashed with markers), the task's metric (``accuracy``, ``perplexity``
or ``r2``: val, and the test point), the learning rate and the pre-clip gradient norm (train; log
axes when positive), one colour per run, in one legend naming the config keys that differ between
runs (:func:`run_labels`). :func:`plot_metric_vs_lr` draws a sweep's metric against the learning rate.

matplotlib is optional (``pip install 'singlestep[plot]'``) and imported only when drawing, onto an
Agg canvas through its object API, never pyplot: nothing opens a window, a notebook's backend stays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from singlestep import cli
from singlestep.errors import UserError

__all__ = ["differing_keys", "main", "plot_metric_vs_lr", "plot_runs", "run_labels", "write_run_curves"]

FIGSIZE, DPI = (12.0, 8.0), 100  # 1200 x 800 pixels: readable on a laptop screen and in a report
X_LABELS = {"step": "optimizer step", "epoch": "epoch", "time": "time since start (s)"}
DEFAULT_METRICS = ("loss", "accuracy", "perplexity", "r2", "lr", "grad_norm")  # the panels, in order, where logged
TITLES = {"lr": "learning rate", "grad_norm": "gradient norm (pre-clip)", "r2": "R²"}
LOG_METRICS = {"lr", "grad_norm", "perplexity"}
# How each split is drawn: train solid, val dashed with markers, test as stars.
SPLIT_STYLE = {"train": {"linestyle": "-", "linewidth": 1.6},
               "val": {"linestyle": "--", "marker": "o", "markersize": 4, "linewidth": 1.4},
               "test": {"linestyle": ":", "marker": "*", "markersize": 11, "linewidth": 1.0}}  # fmt: skip
_IGNORED_KEYS = ("name", "output")  # a run's name and folder differ by design, not by experiment


def _flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _flat_configs(configs: Sequence[Mapping]) -> list[dict[str, Any]]:
    flats = [{k: v for k, v in _flatten(c).items() if k.split(".")[0] not in _IGNORED_KEYS} for c in configs]
    prefixes = {k.rsplit(".", 1)[0] for f in flats for k in f if "." in k}
    # `scheduler: null` beside `scheduler: {name: cosine}` reads `scheduler.name=null`
    return [{f"{k}.name" if v is None and k in prefixes else k: v for k, v in f.items()} for f in flats]


def differing_keys(configs: Sequence[Mapping]) -> list[str]:
    """The dotted config keys whose values differ between runs, in config order.

    ``name`` and ``output.*`` are ignored. A key that only some configs have counts only when its
    component's ``name`` is the same everywhere, or when the configs that have it disagree: the
    arguments that come with another optimizer (adagrad's ``lr_decay`` beside sgd) follow from
    ``optimizer.name``, which is already listed.

    Args:
        configs: the runs' resolved configs (``config.yaml`` as mappings).

    Returns:
        The keys, e.g. ``["optimizer.name", "optimizer.lr"]``; empty with fewer than two configs.

    >>> differing_keys([{"name": "a", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0}},
    ...                 {"name": "b", "optimizer": {"name": "adagrad", "lr": 0.01, "lr_decay": 0.0}}])
    ['optimizer.name', 'optimizer.lr']
    """
    flats = _flat_configs(configs)
    keys = list(dict.fromkeys(k for f in flats for k in f))
    nodes = list(dict.fromkeys(k.rpartition(".")[0] for k in keys))
    keys.sort(key=lambda k: (nodes.index(k.rpartition(".")[0]), k.rpartition(".")[2] != "name"))  # name first
    out = []
    for key in keys:
        present = [repr(f[key]) for f in flats if key in f]
        node = key.rpartition(".")[0]
        names_differ = bool(node) and len({repr(f.get(f"{node}.name")) for f in flats}) > 1
        if len(set(present)) > 1 or (len(present) < len(flats) and not names_differ):
            out.append(key)
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:  # as YAML writes them, the way configs are typed
        return {True: "true", False: "false", None: "null"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(configs: Sequence[Mapping], names: Sequence[str]) -> list[str]:
    """A legend label per run naming what differs from the other runs (:func:`differing_keys`).

    Args:
        configs: the runs' resolved configs.
        names: the runs' folder names: the labels when one run is given or nothing differs, and
            appended to labels that would otherwise be the same.

    Returns:
        One label per run, e.g. ``"optimizer.name=adagrad, optimizer.lr=0.1"``.

    >>> run_labels([{"optimizer": {"lr": 0.1}}, {"optimizer": {"lr": 0.003}}], ["a", "b"])
    ['optimizer.lr=0.1', 'optimizer.lr=0.003']
    """
    keys = differing_keys(configs)
    if not keys:
        return [str(n) for n in names]
    flats = _flat_configs(configs)
    labels = [", ".join(f"{k}={_format_value(f[k])}" for k in keys if k in f) for f in flats]
    return [f"{lab} ({n})" if labels.count(lab) > 1 or not lab else lab for lab, n in zip(labels, names)]


class _Run(NamedTuple):
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]  # train and eval events, in file order


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror}") from None
    lines = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    records = []
    for i, (n, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if i == len(lines) - 1:  # a run that crashed mid-write leaves half a last line (half a character too)
                break
            if isinstance(exc, UnicodeDecodeError):
                raise UserError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "the file is damaged") from None  # fmt: skip
            raise UserError(f"{path}:{n}: not a JSON object; the file is damaged") from None
        if isinstance(record, dict) and record.get("event") in ("train", "eval"):
            records.append(record)
    return records


def _load_run(run_dir: str | Path) -> _Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run folder '{path}' does not exist" if not path.exists() else f"'{path}' is not a folder")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"'{path}' has no metrics.jsonl; is it a run folder written by python -m singlestep.train?")
    records = _read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics}: no train or eval metrics yet (the first line comes after trainer.log_every steps)")
    try:  # without a config (never the case for a trainer's run) the label is the folder name
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except OSError:
        config = {}
    except UnicodeDecodeError:
        raise UserError(f"{path / 'config.yaml'}: not UTF-8 text; the file is damaged") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path / 'config.yaml'}: not valid YAML ({exc})") from None
    return _Run(path, config if isinstance(config, dict) else {}, records)


def _available(runs: Sequence[_Run]) -> list[str]:
    numeric = (int, float, type(None))  # null: a value that was not finite
    found = {k for r in runs for rec in r.records for k, v in rec.items()
             if k not in X_LABELS and isinstance(v, numeric) and not isinstance(v, bool)}  # fmt: skip
    return [m for m in DEFAULT_METRICS if m in found] + sorted(found - set(DEFAULT_METRICS))


def _series(run: _Run, metric: str, x: str) -> dict[str, tuple[list[float], list[float]]]:
    """split -> (xs, ys) for one metric; a null (non-finite) value becomes NaN, a gap in the line."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in run.records:
        if metric in rec and rec.get(x) is not None:
            xs, ys = out.setdefault(str(rec.get("split", rec["event"])), ([], []))
            xs.append(float(rec[x]))
            ys.append(math.nan if rec[metric] is None else float(rec[metric]))
    return out


def _figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure on an Agg canvas (no pyplot: no window, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'singlestep[plot]'") from None
    return FigureCanvasAgg(Figure(figsize=figsize, dpi=dpi)).figure


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    if not out.suffix and out.name:  # matplotlib would write out.png: return the path it writes
        out = out.with_name(out.name + ".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    except (OSError, ValueError) as exc:  # an unwritable folder; a suffix matplotlib cannot write
        raise UserError(f"cannot write '{out}': {exc}") from None
    return out


def _colours(n: int) -> list:
    from matplotlib import colormaps  # a qualitative map up to 10 runs, a continuous one beyond

    return [colormaps["tab10"](i) if n <= 10 else colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, metrics: Sequence[str] | None = None,
              x: str = "step", title: str | None = None, labels: Sequence[str] | None = None) -> Path:  # fmt: skip
    """Draw the runs' curves, one panel per metric, and save them as a PNG.

    Args:
        run_dirs: run folders written by ``python -m singlestep.train``.
        out: the image to write (its folder is created).
        metrics: panels by metric name (any train or eval key, e.g. ``"f1"``); default: ``loss``,
            the task metric (``accuracy``/``perplexity``/``r2``), ``lr`` and ``grad_norm``, where logged.
        x: the x axis: ``"step"``, ``"epoch"`` or ``"time"`` (seconds since the run started).
        title: the figure's title; default: the folder name, or the number of runs.
        labels: one legend label per run; default: :func:`run_labels`.

    Returns:
        The path written.

    Raises:
        UserError: no runs, a folder without metrics, an unknown metric or x axis, ``x="time"``
            on a run that did not log times, wrong number of labels, or matplotlib missing.
    """
    if not run_dirs:
        raise UserError("no run folders given")
    if x not in X_LABELS:
        raise UserError(f"unknown x axis '{x}'; choose one of: {', '.join(X_LABELS)}")
    runs = [_load_run(d) for d in run_dirs]
    untimed = [r.path for r in runs if x == "time" and any("time" not in rec for rec in r.records)]
    if untimed:
        raise UserError(f"run '{untimed[0]}' has no 'time' in metrics.jsonl (an older run); use --x step or --x epoch")
    available = _available(runs)
    chosen = list(dict.fromkeys(metrics)) if metrics else [m for m in available if m in DEFAULT_METRICS]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise UserError(f"unknown metric '{unknown[0]}'; these runs have: {', '.join(available)}")
    if labels is None:
        labels = run_labels([r.config for r in runs], [r.path.resolve().name for r in runs])
        last = [[rec.get("loss") for rec in r.records if rec["event"] == "train"][-1:] for r in runs]
        labels = [f"{lab} (diverged)" if loss == [None] else lab for lab, loss in zip(labels, last)]
    elif len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels given for {len(runs)} runs")

    fig = _figure(FIGSIZE, DPI)
    ncols = 1 if len(chosen) == 1 else 2 if len(chosen) <= 4 else 3
    axes = fig.subplots(math.ceil(len(chosen) / ncols), ncols, squeeze=False).ravel()
    colours = _colours(len(runs))
    splits_drawn: set[str] = set()
    for ax, metric in zip(axes, chosen):
        ys_all: list[float] = []
        for run, colour in zip(runs, colours):
            for split, (xs, ys) in _series(run, metric, x).items():
                style = SPLIT_STYLE.get(split, SPLIT_STYLE["val"])
                if len(xs) < 3 and "marker" not in style:  # a line of one point draws nothing
                    style = {**style, "marker": "o", "markersize": 5}
                ax.plot(xs, ys, color=colour, **style)
                splits_drawn.add(split)
                ys_all += [y for y in ys if math.isfinite(y)]
        if not ys_all:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="grey")
        # lr, grad norms and perplexities span decades; a loss only when it does (a first window far
        # above the rest would flatten every later difference on a linear axis).
        lo, hi = (min(ys_all), max(ys_all)) if ys_all else (0.0, 0.0)
        if lo > 0 and (metric in LOG_METRICS or (metric == "loss" and hi / lo > 30)):
            ax.set_yscale("log")
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(metric)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)

    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2.5, label=lab) for c, lab in zip(colours, labels)]
    handles += [Line2D([], [], color="grey", label=s, **SPLIT_STYLE.get(s, SPLIT_STYLE["val"]))
                for s in ("train", "val", "test") if s in splits_drawn]  # fmt: skip
    if title is None:
        names = {str(r.config.get("name", "")) for r in runs}
        title = runs[0].path.resolve().name if len(runs) == 1 else f"{len(runs)} runs"
        title = f"{names.pop()}: {title}" if len(runs) > 1 and len(names) == 1 and "" not in names else title
    fig.suptitle(title, fontsize=13)
    # One legend under the panels, as many columns as its longest label allows in 12 inches.
    ncol = max(1, min(len(handles), 170 // (max(len(h.get_label()) for h in handles) + 6)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.015 + 0.032 * math.ceil(len(handles) / ncol), 1, 1))
    return _save(fig, out)


def plot_metric_vs_lr(curves: Mapping[str, Sequence[tuple[float, float, float]]], out: str | Path, *,
                      metric: str, title: str | None = None) -> Path:  # fmt: skip
    """Draw a metric against the learning rate (log axis), one line per label, shaded by the std.

    Args:
        curves: label (e.g. ``"sgd"``) -> ``[(lr, mean, std), ...]`` in any order. A point with a
            non-finite mean (diverged) is an ``x`` in a band below the lines; a label with no finite
            point is listed as ``(all diverged)``; a non-finite std draws no band; lr <= 0 is skipped.
        out: the image to write.
        metric: the y axis's name, e.g. ``"val accuracy"``.
        title: the figure's title; default: ``"<metric> vs learning rate"``.

    Returns:
        The path written.

    Raises:
        UserError: matplotlib is not installed.
    """
    fig = _figure((10.0, 6.5), DPI)
    ax = fig.subplots()
    from matplotlib.lines import Line2D  # after _figure, which says how to install matplotlib

    handles, diverged = [], []
    for (label, points), colour in zip(curves.items(), _colours(len(curves))):
        pts = sorted((float(lr), float(m), float(s)) for lr, m, s in points)
        good = [(lr, m, s if math.isfinite(s) else 0.0) for lr, m, s in pts if math.isfinite(m) and lr > 0]
        bad = [lr for lr, m, _ in pts if not math.isfinite(m) and lr > 0]
        if good:
            lrs, means, stds = zip(*good)
            ax.plot(lrs, means, color=colour, marker="o", linewidth=1.8)
            ax.fill_between(lrs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.2, linewidth=0)  # fmt: skip
        diverged += [(bad, colour)] if bad else []
        text = str(label) if good else f"{label} (all diverged)"
        handles.append(Line2D([], [], color=colour, marker="o", linewidth=1.8, label=text))
    if not ax.has_data():
        ax.set_yticks([])  # nothing finite: no scale to read
    if diverged:  # x marks in a band added below the data, a row per label, so none reads as a value
        lo, hi = ax.get_ylim()
        ax.axhline(lo, color="grey", linewidth=0.8, alpha=0.5)
        band = 0.07 * len(diverged)
        ax.set_ylim(lo - band * (hi - lo), hi)
        for row, (bad, colour) in enumerate(diverged):
            y = band / (1 + band) * (row + 0.5) / len(diverged)  # axes units: inside the band
            ax.plot(bad, [y] * len(bad), linestyle="none", marker="x", markersize=9, markeredgewidth=2,
                    color=colour, transform=ax.get_xaxis_transform())  # fmt: skip
        handles.append(Line2D([], [], color="grey", marker="x", linestyle="none", markeredgewidth=2, label="diverged"))
    if ax.has_data():  # an empty log axis would warn about its default limits of 0..1
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else f"{metric} vs learning rate", fontsize=13)
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def write_run_curves(run_dir: str | Path) -> Path | None:
    """Write ``RUN_DIR/curves.png`` at the end of a run; never fails the run for a plot.

    Returns:
        The path written; None when matplotlib is not installed (nothing is done) or the curves
        could not be drawn, or Ctrl-C came while they were (one warning says why).
    """
    try:
        import matplotlib  # noqa: F401 - only asking whether it is installed

        return plot_runs([run_dir], Path(run_dir) / "curves.png")
    except ImportError as exc:
        if exc.name == "matplotlib":
            return None
        warnings.warn(f"curves.png not written: {type(exc).__name__}: {exc}", stacklevel=2)
    except KeyboardInterrupt:  # the run is finished and saved: a Ctrl-C here skips only the picture
        warnings.warn("curves.png not written: interrupted (python -m singlestep.plot RUN_DIR draws it)", stacklevel=2)
    except Exception as exc:  # noqa: BLE001 - a finished run's exit code must not depend on a plot
        warnings.warn(f"curves.png not written: {type(exc).__name__}: {exc}", stacklevel=2)
    return None


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m singlestep.plot",
        description="Draw training curves (loss, task metric, lr, grad norm) of one or more run folders.",
        epilog="example: python -m singlestep.plot runs/a runs/b --metric loss --metric accuracy --x epoch",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by singlestep.train")
    p.add_argument("--out", help="PNG to write, or a folder to write curves.png into "
                   "(default: RUN_DIR/curves.png for one run, else ./curves.png)")  # fmt: skip
    p.add_argument("--metric", action="append", dest="metrics", metavar="NAME", help="a panel; repeat for more")
    p.add_argument("--x", default="step", choices=list(X_LABELS), help="x axis (default: step)")
    p.add_argument("--title", help="figure title")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 done, 2 user error)."""
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
    if args.out and (Path(args.out).is_dir() or args.out.endswith(("/", os.sep))):  # a folder: curves.png in it
        out = Path(args.out) / "curves.png"
    print(plot_runs(args.run_dirs, out, metrics=args.metrics, x=args.x, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
