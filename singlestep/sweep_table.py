"""A sweep's results: what each run left behind, and the table of one row per grid combination.

``python -m singlestep.sweep`` runs the training runs; this module reads their outcomes
(:func:`read_summary`, :func:`failure_reason`), folds each combination's seeds into a row
(:func:`aggregate`), sorts the rows best first and marks the best learning rate per group
(:func:`rank`), and writes ``summary.csv``, ``summary.md``, ``sweep.json`` (:func:`write_tables`)
and the two pictures (:func:`draw_plots`); :func:`report` does all of that in order.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from singlestep.errors import UserError
from singlestep.runlog import write_atomic

__all__ = ["Row", "Run", "aggregate", "draw_plots", "failure_reason", "finished_run", "fmt_value", "higher_is_better",
           "markdown", "metric_value", "rank", "read_summary", "report", "short_label", "short_reason",
           "summary_error", "write_tables"]  # fmt: skip

# Every other metric (loss, mse, mae, perplexity, bits_per_char) ranks lower-is-better.
HIGHER_IS_BETTER = {"accuracy", "f1", "precision", "recall", "r2"}
# Rows without a mean go after the ranked ones, in this order; "failed" is always last.
_UNRANKED_ORDER = ("diverged", "interrupted", "not run", "failed")
MAX_BEST_CURVES = 10  # best.png stays readable; the table has every row
MAX_REASON = 160  # a reason in the table's status cell; sweep.json keeps the whole line


@dataclass
class Run:
    """The outcome of one (combination, seed) training run.

    ``status`` is ``ok`` (finished; :func:`aggregate` turns it into ``diverged`` when the metric is
    not finite), ``diverged`` (the run stopped itself, exit code 3; ``reason`` says why), ``failed``
    (``reason`` says why), ``interrupted`` or ``not run``. ``ok`` and ``diverged`` are finished: a
    rerun of the sweep skips them.
    """

    seed: int
    status: str
    reason: str = ""
    summary: dict[str, Any] | None = None
    run_dir: Path | None = None


@dataclass
class Row:
    """One grid combination with its seeds aggregated; ``mean``/``std`` over the seeds that finished."""

    values: dict[str, Any]
    status: str
    mean: float | None = None
    std: float | None = None  # sample std (n - 1); None with fewer than two finished seeds
    n_ok: int = 0
    n_seeds: int = 1
    steps: int | None = None
    wall_seconds: float | None = None
    best: bool = False
    index: int = 0  # the combination's place in the grid: pictures keep one colour per group in grid order
    run_dirs: list[Path] = field(default_factory=list)  # the finished seeds' folders, in seed order
    best_run_dir: Path | None = None  # the finished seed with the best metric (best.png draws it)
    best_seed: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # per seed, for sweep.json


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def summary_error(summary: Mapping[str, Any] | None) -> str:
    """The summary's ``error`` as one line (a run that diverged or failed says why there), or ``""``."""
    error = (summary or {}).get("error")
    if not isinstance(error, str):
        return ""
    return " ".join(error.split()).removeprefix("error:").strip()


def short_reason(text: str, limit: int = MAX_REASON) -> str:
    """A reason short enough for a table cell: a trailing ``(...)`` hint goes first, then words."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    if text.endswith(")") and " (" in text:
        head = text[: text.rindex(" (")]
        if head and len(head) <= limit:
            return head
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2 :] else cut).rstrip(" ,;:") + "…"


def finished_run(seed: int, run_dir: Path, summary: Mapping[str, Any] | None) -> Run | None:
    """The run's outcome from its ``summary.json`` when it finished (``ok`` or ``diverged``), else None.

    A summary with ``status`` says it (``interrupted`` and ``failed`` are not finished: a rerun
    resumes or retries them); an older one without it is finished unless ``interrupted`` is true.
    """
    if summary is None:
        return None
    status = summary.get("status")
    if status == "diverged":
        return Run(seed, "diverged", reason=summary_error(summary), summary=dict(summary), run_dir=run_dir)
    if status == "ok" or (status is None and not summary.get("interrupted")):
        return Run(seed, "ok", summary=dict(summary), run_dir=run_dir)
    return None


def failure_reason(log: Path, offset: int, rc: int) -> str:
    """The last ``error:`` line the run printed, else its exit code and last line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()[:300]
    why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    return f"{why}: {lines[-1][:200]}" if lines else why


def metric_value(summary: Mapping[str, Any], metric: str) -> float | None:
    """``summary["final"][split][name]`` for ``metric = "split.name"``; None when not finite.

    Raises:
        KeyError: the summary has no such split or metric.
    """
    split, _, name = metric.partition(".")
    value = summary["final"][split][name]
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def higher_is_better(metric: str) -> bool:
    """True for accuracy, f1, precision, recall, r2; False for everything else (losses, errors, perplexity)."""
    return metric.rpartition(".")[2] in HIGHER_IS_BETTER


def aggregate(values: dict[str, Any], runs: Sequence[Run], metric: str) -> Row:
    """Fold one combination's runs (one per seed) into a row.

    Status: ``ok`` when every seed finished with a finite metric; ``interrupted`` when a seed was
    interrupted or not run; else ``diverged`` / ``diverged: <reason>`` / ``failed: <reason>`` when
    no seed finished, and ``partial: ...`` (naming the seeds that did not) when some did. Reasons
    are shortened (:func:`short_reason`); ``runs`` keeps each seed's whole one.
    """
    finished: list[tuple[Run, float]] = []
    outcome: list[tuple[Run, str]] = []  # (run, "ok" | "diverged" | other status)
    for run in runs:
        status = run.status
        if status == "ok":
            value = metric_value(run.summary or {}, metric)
            if value is None:
                status = "diverged"
            else:
                finished.append((run, value))
        outcome.append((run, status))
    statuses = [s for _, s in outcome]
    if len(finished) == len(runs):
        status = "ok"
    elif "interrupted" in statuses or ("not run" in statuses and len(set(statuses)) > 1):
        status = "interrupted"
    elif all(s == "not run" for s in statuses):
        status = "not run"
    elif not finished:
        failed = [r for r, s in outcome if s == "failed"]
        diverged = [r for r, s in outcome if s == "diverged" and r.reason]
        status = (f"failed: {short_reason(failed[0].reason)}" if failed
                  else f"diverged: {short_reason(diverged[0].reason)}" if diverged else "diverged")  # fmt: skip
    else:
        why = [f"seed {r.seed} {s}: {short_reason(r.reason)}" if s in ("failed", "diverged") and r.reason
               else f"seed {r.seed} {s}" for r, s in outcome if s != "ok"]  # fmt: skip
        status = "partial: " + "; ".join(why)
    values_ok = [v for _, v in finished]
    summaries = [r.summary or {} for r, _ in finished]
    steps = [s["steps"] for s in summaries if isinstance(s.get("steps"), int)]
    walls = [s["wall_seconds"] for s in summaries if isinstance(s.get("wall_seconds"), (int, float))]
    per_seed = [{"seed": r.seed, "status": s, "reason": r.reason, "run_dir": str(r.run_dir) if r.run_dir else None,
                 "metric": metric_value(r.summary, metric) if s == "ok" else None} for r, s in outcome]  # fmt: skip
    sign = -1.0 if higher_is_better(metric) else 1.0
    best = min(finished, key=lambda rv: sign * rv[1], default=None)  # ties: the first seed
    return Row(
        values=dict(values),
        status=status,
        mean=statistics.fmean(values_ok) if values_ok else None,
        std=statistics.stdev(values_ok) if len(values_ok) > 1 else None,
        n_ok=len(values_ok),
        n_seeds=len(runs),
        steps=max(steps) if steps else None,
        wall_seconds=statistics.fmean(walls) if walls else None,
        run_dirs=[r.run_dir for r, _ in finished if r.run_dir is not None],
        best_run_dir=best[0].run_dir if best else None,
        best_seed=best[0].seed if best else None,
        runs=per_seed,
    )


def _group(values: Mapping[str, Any], lr_key: str | None) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in values.items() if k != lr_key)


def rank(rows: Sequence[Row], metric: str, lr_key: str | None) -> list[Row]:
    """Sort rows best first and mark ``best`` on each group's best row.

    Rows with a mean come first, by the metric (higher first for accuracy-like metrics, lower
    first for losses); the rest follow by status (diverged, interrupted, not run, failed), each in
    grid order. A group is every grid key but ``lr_key``: the best learning rate per optimizer.
    Without an lr key only the single best row is marked.
    """
    sign = -1.0 if higher_is_better(metric) else 1.0
    ranked = sorted((r for r in rows if r.mean is not None), key=lambda r: sign * r.mean)
    rest = [r for r in rows if r.mean is None]
    rest.sort(key=lambda r: _UNRANKED_ORDER.index(r.status.partition(":")[0]) if r.status.partition(":")[0]
              in _UNRANKED_ORDER else 0)  # fmt: skip
    seen: set[tuple] = set()
    for row in ranked:
        group = _group(row.values, lr_key) if lr_key is not None else ()
        row.best = group not in seen
        seen.add(group)
    for row in rest:
        row.best = False
    return ranked + rest


# --------------------------------------------------------------------------- formatting


def fmt_value(value: Any) -> str:
    """A grid value as typed: ``sgd``, ``0.001``, ``1e-05``, ``true``, ``[0.9,0.99]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def short_label(values: Mapping[str, Any], fallback: str = "") -> str:
    """A short label for a combination: a ``name`` key shows its value only, others ``last part=value``.

    >>> short_label({"optimizer.name": "sgd", "optimizer.lr": 0.01, "trainer.batch_size": 32})
    'sgd lr=0.01 batch_size=32'
    """
    parts = [fmt_value(v) if k.rpartition(".")[2] == "name" else f"{k.rpartition('.')[2]}={fmt_value(v)}"
             for k, v in values.items()]  # fmt: skip
    return " ".join(parts) or fallback


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _mean_std(row: Row) -> str:
    if row.mean is None:
        return ""
    return _num(row.mean) if row.std is None else f"{_num(row.mean)} ± {_num(row.std, 2)}"


def markdown(rows: Sequence[Row], grid_keys: Sequence[str], metric: str, caption: str = "") -> str:
    """A GitHub table (a caption line above it when given), ready to paste into a README."""
    head = [*grid_keys, f"{metric} (mean ± std)", "seeds ok", "steps", "wall s", "status", "best"]
    align = ["---"] * len(grid_keys) + ["---:", "---:", "---:", "---:", "---", ":-:"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"{caption}\n"] if caption else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [fmt_value(r.values.get(k)) for k in grid_keys]
        cells += [_mean_std(r), f"{r.n_ok}/{r.n_seeds}", "" if r.steps is None else str(r.steps),
                  _num(r.wall_seconds, 3), r.status, "*" if r.best else ""]  # fmt: skip
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def report(out: Path, grid: Mapping[str, Sequence[Any]], outcomes: Sequence[tuple[dict[str, Any], Sequence[Run]]],
           metric: str, info: Mapping[str, Any], fallback_label: str = "") -> list[Row]:  # fmt: skip
    """Aggregate, rank, write the tables, print the markdown one, draw the pictures.

    Args:
        out: the sweep folder.
        grid: key -> values, in grid order.
        outcomes: per combination, its values and its runs (one per seed).
        metric: ``split.name`` to rank by.
        info: what else ``sweep.json`` records (base config, overrides, seeds).
        fallback_label: a group's label when the grid has no key besides the lr (the optimizer's name).

    Returns:
        The rows, best first.
    """
    lr_key = next((k for k in grid if k.rpartition(".")[2] == "lr"), None)
    rows = [aggregate(values, runs, metric) for values, runs in outcomes]
    for i, row in enumerate(rows):
        row.index = i
    rows = rank(rows, metric, lr_key)
    n_seeds = len(info.get("seeds", ())) or 1
    caption = (f"Sweep of `{info.get('config')}` ({n_seeds} seed{'s' if n_seeds > 1 else ''} each): {metric}, "
               f"{'higher' if higher_is_better(metric) else 'lower'} is better; `*` = best"
               + (f" {lr_key.rpartition('.')[2]} per group." if lr_key else "."))  # fmt: skip
    write_tables(out, rows, grid, metric, caption, info)
    print()
    print(markdown(rows, list(grid), metric), end="")
    for note in draw_plots(out, rows, metric, lr_key, fallback_label):
        print(note)
    return rows


def write_tables(out: Path, rows: Sequence[Row], grid: Mapping[str, Sequence[Any]], metric: str,
                 caption: str, info: Mapping[str, Any]) -> None:  # fmt: skip
    """Write ``summary.csv``, ``summary.md`` and ``sweep.json`` (the grid, ``info`` and the rows) into ``out``."""
    keys = list(grid)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, f"{metric}_mean", f"{metric}_std", "n_ok", "n_seeds", "steps", "wall_seconds",
                     "status", "best"])  # fmt: skip
    for r in rows:
        writer.writerow([*(fmt_value(r.values.get(k)) for k in keys), "" if r.mean is None else repr(r.mean),
                         "" if r.std is None else repr(r.std), r.n_ok, r.n_seeds, "" if r.steps is None else r.steps,
                         "" if r.wall_seconds is None else round(r.wall_seconds, 3), r.status,
                         "*" if r.best else ""])  # fmt: skip
    write_atomic(out / "summary.csv", buf.getvalue())
    write_atomic(out / "summary.md", markdown(rows, keys, metric, caption))
    data = {**info, "metric": metric, "higher_is_better": higher_is_better(metric),
            "grid": {k: list(v) for k, v in grid.items()},
            "rows": [{"values": r.values, "mean": r.mean, "std": r.std, "n_ok": r.n_ok, "n_seeds": r.n_seeds,
                      "steps": r.steps, "wall_seconds": r.wall_seconds, "status": r.status, "best": r.best,
                      "runs": r.runs} for r in rows]}  # fmt: skip
    write_atomic(out / "sweep.json", json.dumps(data, indent=2, default=str) + "\n")


def draw_plots(out: Path, rows: Sequence[Row], metric: str, lr_key: str | None, fallback_label: str) -> list[str]:
    """Draw ``best.png`` (the best row of each group, by its best seed's run, overlaid) and ``lr.png``
    (the metric against the learning rate, a line per group; only with an lr key).

    Returns:
        One line per picture: the path written, or a note saying why not (matplotlib missing,
        nothing finished). A picture never fails the sweep: the tables are already written.
    """
    try:
        from singlestep.plot import plot_metric_vs_lr, plot_runs  # lazy: matplotlib is optional
    except ImportError as exc:
        return [f"note: no pictures ({exc}); the tables are written"]
    notes = []
    best: dict[tuple, Row] = {}
    for row in rows:  # ranked: the first row seen of a group is its best
        if row.run_dirs:
            best.setdefault(_group(row.values, lr_key), row)
    chosen = sorted(list(best.values())[:MAX_BEST_CURVES], key=lambda r: r.index)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    if lr_key is not None:
        for row in sorted(rows, key=lambda r: r.index):
            diverged = row.status.partition(":")[0] == "diverged"
            if isinstance(row.values.get(lr_key), (int, float)) and (row.mean is not None or diverged):
                label = short_label({k: v for k, v in row.values.items() if k != lr_key}, fallback_label)
                mean = math.nan if row.mean is None else row.mean
                std = math.nan if row.std is None else row.std
                curves.setdefault(label, []).append((float(row.values[lr_key]), mean, std))

    def attempt(name: str, draw) -> None:
        try:
            notes.append(str(draw()))
        except (ImportError, UserError) as exc:  # matplotlib missing, or a run folder the plot cannot read
            notes.append(f"note: no {name} ({exc}); the tables are written")
        except Exception as exc:  # noqa: BLE001 - as plot.write_run_curves: results must not hang on a picture
            notes.append(f"warning: no {name} ({type(exc).__name__}: {exc}); the tables are written")

    if chosen:
        labels = [short_label(r.values, fallback_label) + (f" seed={r.best_seed}" if r.n_seeds > 1 and
                  r.best_seed is not None else "") for r in chosen]  # fmt: skip
        title = f"best run per group by {metric}" + (f" (top {MAX_BEST_CURVES})" if len(best) > len(chosen) else "")
        attempt("best.png", lambda: plot_runs([r.best_run_dir or r.run_dirs[0] for r in chosen], out / "best.png",
                                              title=title, labels=labels))  # fmt: skip
    else:
        notes.append("note: no best.png: no run finished")
    if curves:
        lr_title = f"{metric} vs {lr_key}"
        attempt("lr.png", lambda: plot_metric_vs_lr(curves, out / "lr.png", metric=metric, title=lr_title))
    elif lr_key is not None:
        notes.append("note: no lr.png: no run finished")
    return notes
