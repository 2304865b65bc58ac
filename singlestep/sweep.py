"""``python -m singlestep.sweep``: train every combination of a grid of config values, and table them.

    python -m singlestep.sweep --config base.yaml --grid optimizer.name=sgd,adagrad \\
        --grid optimizer.lr=log:1e-3:1:7 [--seeds 0,1,2] [--jobs N] [--metric val.accuracy] \\
        [--out DIR] [key=value ...]

Each (combination, seed) is its own ``python -m singlestep.train`` subprocess writing
``OUT/runs/<slug>/`` (its output in ``OUT/runs/<slug>.log``). Every combination is validated before
anything starts, so a typo is one error, not N failed runs; a value the optimizer itself refuses
(a negative lr) is a failed row. The table (:mod:`singlestep.sweep_table`) goes to ``summary.csv``,
``summary.md`` and ``sweep.json``, with ``best.png`` and ``lr.png`` beside them.

A run that stops itself because training went wrong (``train`` exit code 3, ``summary.json``
status ``diverged``) is a ``diverged`` row with the summary's reason; one that failed (status
``failed``, or no summary) a ``failed`` row with the summary's ``error`` (else the run's last
``error:`` line or its exit code).

The same ``--out`` again continues the sweep: finished runs (ok or diverged) are skipped, an
unfinished one with a checkpoint file in ``checkpoints/`` is resumed (``train --resume``), any other
unfinished folder is moved aside to ``<slug>.incomplete-N`` and the run starts over; failed runs are
retried.

Exit codes: 0 done (failed and diverged rows included), 2 user error, 130 interrupted. Ctrl-C (or SIGTERM)
forwards one SIGINT to each running child, which checkpoints and exits; a second Ctrl-C kills
them. Children run in their own session, so a terminal's Ctrl-C reaches them only through the
sweep (once), and a sweep killed with SIGKILL leaves them running.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from singlestep import cli
from singlestep.errors import UserError
from singlestep.sweep_table import (
    Run,
    failure_reason,
    finished_run,
    fmt_value,
    read_summary,
    report,
    short_label,
    short_reason,
    summary_error,
)

__all__ = ["main", "make_slugs", "parse_grid"]

GRID_HELP = "expected key=v1,v2,... or key=log:LO:HI:N or key=lin:LO:HI:N, e.g. optimizer.lr=log:1e-3:1:7"
MAX_SLUG = 100  # leaves room under the 255-byte file name limit for ".incomplete-N" and ".log"
_ROOT = str(Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------- the grid


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``[0.9,0.99],[0.8,0.9]`` is two values."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _spaced(spec: str, kind: str, body: str) -> list[Any]:
    """``log:LO:HI:N`` / ``lin:LO:HI:N``: N values, endpoints included, floats to 4 significant digits."""
    parts = body.split(":")
    if len(parts) != 3:
        raise UserError(f"--grid '{spec}': {kind}: takes LO:HI:N, e.g. {kind}:1e-3:1:7")
    try:
        lo, hi = float(parts[0]), float(parts[1])
        n = int(parts[2])
    except ValueError:
        raise UserError(f"--grid '{spec}': LO and HI must be numbers and N a whole number") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or n < 1:
        raise UserError(f"--grid '{spec}': LO and HI must be finite and N >= 1")
    if kind == "log" and (lo <= 0 or hi <= 0):
        raise UserError(f"--grid '{spec}': log: needs LO > 0 and HI > 0 (use lin: to include 0 or negatives)")
    if n == 1:
        raw = [lo]
    elif kind == "log":
        a, b = math.log10(lo), math.log10(hi)
        raw = [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)]
    else:
        raw = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    whole = kind == "lin" and all(re.fullmatch(r"[-+]?\d+", p.strip()) for p in parts[:2])
    if whole and all(abs(v - round(v)) < 1e-9 for v in raw):
        return [round(v) for v in raw]  # lin:16:64:4 -> 16, 32, 48, 64 (a batch size stays an int)
    return [float(f"{v:.4g}") for v in raw]


def parse_grid(specs: list[str]) -> dict[str, list[tuple[Any, str]]]:
    """Parse ``--grid`` options into ``key -> [(value, override text), ...]``, in the order given.

    ``optimizer=sgd,adagrad`` is short for ``optimizer.name=...`` (as for overrides).

    Raises:
        UserError: a malformed spec, a key given twice, a repeated value, or a key the sweep sets.
    """
    from singlestep.config import COMPONENTS, parse_yaml

    grid: dict[str, list[tuple[Any, str]]] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key, rest = key.strip(), rest.strip()
        if not sep or not key or not rest or any(not p for p in key.split(".")):
            raise UserError(f"--grid '{spec}': {GRID_HELP}")
        key = f"{key}.name" if key in COMPONENTS else key
        if key == "seed":
            raise UserError("--grid seed=...: use --seeds 0,1,2 (seeds are averaged into mean ± std)")
        if key == "output" or key.startswith("output.run_dir"):
            raise UserError(f"--grid '{spec}': the sweep sets output.run_dir itself (OUT/runs/<slug>)")
        if key in grid:
            raise UserError(f"--grid {key} given twice; list all its values in one --grid")
        spaced = re.fullmatch(r"(log|lin):(.*)", rest)
        if spaced:
            values = [(v, fmt_value(v)) for v in _spaced(spec, spaced[1], spaced[2])]
        else:
            values = []
            for item in (t.strip() for t in _split_top(rest)):
                if not item:
                    raise UserError(f"--grid '{spec}': an empty value; {GRID_HELP}")
                try:
                    values.append((parse_yaml(item), item))
                except yaml.YAMLError as exc:
                    raise UserError(f"--grid '{spec}': '{item}' is not valid YAML ({exc.problem})") from None
        seen = [fmt_value(v) for v, _ in values]
        repeated = sorted({s for s in seen if seen.count(s) > 1})
        if repeated:
            raise UserError(f"--grid '{spec}': value {repeated[0]} appears twice"
                            + (" after rounding to 4 significant digits" if spaced else ""))  # fmt: skip
        grid[key] = values
    return grid


def _slug_part(key: str, value: Any) -> str:
    last = key.rpartition(".")[2]
    return fmt_value(value) if last == "name" else f"{last}{fmt_value(value)}"


def make_slugs(combos: list[dict[str, Any]], seeds: list[int]) -> dict[tuple[int, int], str]:
    """A readable, filesystem-safe, unique folder name per (combination index, seed).

    ``{optimizer.name: sgd, optimizer.lr: 0.001}``, seed 0 -> ``sgd_lr0.001_s0``. Names that
    would collide after cleaning (or are too long) get a short hash of the combination appended.
    """
    slugs: dict[tuple[int, int], str] = {}
    canon: dict[tuple[int, int], str] = {}
    for (i, combo), seed in itertools.product(enumerate(combos), seeds):
        text = "_".join([*(_slug_part(k, v) for k, v in combo.items()), f"s{seed}"])
        text = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip(".-") or f"s{seed}"
        slugs[i, seed] = text
        canon[i, seed] = json.dumps([sorted(combo.items()), seed], default=str)
    counts = Counter(slugs.values())
    for k, s in slugs.items():
        if counts[s] > 1 or len(s) > MAX_SLUG:
            slugs[k] = s[: MAX_SLUG - 8] + "-" + hashlib.sha1(canon[k].encode()).hexdigest()[:7]
    return slugs


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Job:
    combo: int
    seed: int
    slug: str
    label: str
    values: dict[str, Any]  # grid key -> value
    overrides: list[str]  # the combination's key=value texts, then seed=S
    expected: dict[str, Any]  # the resolved config, to check an existing folder against
    run: Run | None = None
    seconds: float = 0.0


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _check_same_config(run_dir: Path, expected: dict[str, Any]) -> None:
    """A folder from an earlier sweep with another base config must not pass as this sweep's run."""
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # no readable config: an unfinished folder, moved aside or resumed by the trainer
    old, new = _flat(old), _flat(json.loads(json.dumps(expected, default=str)))
    for key in new.keys() & old.keys():
        if not key.startswith("output.") and old[key] != new[key]:
            raise UserError(f"{run_dir} was trained with {key}: {old[key]!r}, this sweep asks for {new[key]!r}; "
                            "use a new --out, or the same config and overrides as before")  # fmt: skip


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds '{text}': expected whole numbers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds '{text}': a seed appears twice")
    return seeds


def _plan(args: argparse.Namespace) -> tuple[dict[str, list[tuple[Any, str]]], list[_Job], str]:
    """Parse the grid and validate every (combination, seed) config before anything runs.

    Returns:
        The grid, the jobs in grid order (seeds innermost), and the base optimizer's name.
    """
    from singlestep.config import config_to_dict, load_config

    grid = parse_grid(args.grid or [])
    seeds = _parse_seeds(args.seeds)
    fixed = args.overrides
    for item in fixed:
        key = item.partition("=")[0].strip()
        if key == "output" or key.startswith("output.run_dir"):
            raise UserError(f"'{item}': the sweep sets output.run_dir itself (OUT/runs/<slug>)")
        if key in grid or f"{key}.name" in grid:
            raise UserError(f"'{item}': {key} is also a --grid key; give it in one place")
        if key == "seed" and seeds is not None:
            raise UserError(f"'{item}' and --seeds both set the seed; use --seeds")
    combos = [dict(zip(grid, (v for v, _ in vals))) for vals in itertools.product(*grid.values())]
    texts = [[f"{k}={t}" for k, (_, t) in zip(grid, vals)] for vals in itertools.product(*grid.values())]
    if seeds is None:  # one run per combination, with the config's own seed
        seeds = [load_config(args.config, fixed + texts[0]).seed]
    slugs = make_slugs(combos, seeds)
    jobs, optimizer = [], ""
    for i, (combo, text) in enumerate(zip(combos, texts)):
        for seed in seeds:
            overrides = [*text, f"seed={seed}"]
            cfg = load_config(args.config, fixed + overrides)  # its errors name the override at fault
            optimizer = optimizer or cfg.optimizer.name
            jobs.append(_Job(i, seed, slugs[i, seed], f"{short_label(combo, 'run')} seed={seed}", combo, overrides,
                             config_to_dict(cfg)))  # fmt: skip
    return grid, jobs, optimizer


# ----------------------------------------------------------------------------- running


class _Sweep:
    """Runs the jobs, ``n_jobs`` at a time, and keeps each job's outcome."""

    def __init__(self, jobs: list[_Job], out: Path, config: str, fixed: list[str], n_jobs: int, metric: str | None):
        self.jobs, self.out, self.config, self.fixed, self.n_jobs = jobs, out, config, fixed, n_jobs
        self.runs_dir = out / "runs"
        self.metric = metric
        self.metric_error: str | None = None  # set when a finished run lacks --metric: stop starting runs
        self.signals = self.forwarded = 0
        self.done = self.skipped = 0
        self.running: dict[subprocess.Popen, tuple[_Job, Path, int, float]] = {}
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cpus // n_jobs))  # divide the cores (those this process may use) between the children
        self.env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                        PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))  # fmt: skip

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1  # acted on by the loop: forwarding from inside a handler could race a start

    def _metric_of(self, summary: dict[str, Any]) -> str:
        finals = summary.get("final") or {}
        if self.metric is None:  # the default: accuracy where the runs report it, else the loss (val first)
            split = next((s for s in ("val", "test", "train") if isinstance(finals.get(s), dict)), "val")
            self.metric = f"{split}.accuracy" if "accuracy" in finals.get(split, {}) else f"{split}.loss"
        split, _, name = self.metric.partition(".")
        if name not in (finals.get(split) or {}) and self.metric_error is None:
            have = [f"{s}.{m}" for s, ms in finals.items() if isinstance(ms, dict) for m in ms if m != "confusion"]
            self.metric_error = (f"--metric {self.metric}: the runs report {', '.join(have)}; the finished runs "
                                 "are kept, run the same command with one of these")  # fmt: skip
        return self.metric

    def _report(self, job: _Job, skipped: bool = False) -> None:
        """One progress line per finished (or skipped) run."""
        self.done += 1
        run = job.run
        text = run.status
        if run.status == "ok":
            metric = self._metric_of(run.summary)
            split, _, name = metric.partition(".")
            value = ((run.summary.get("final") or {}).get(split) or {}).get(name)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            word = "skipped (finished earlier)" if skipped else "ok" if finite or self.metric_error else "diverged"
            text = f"{word} {metric} {value:.4g}" if finite else f"{word} {metric} {value}"
        elif run.status in ("failed", "diverged"):
            text = f"{run.status}: {short_reason(run.reason)}" if run.reason else run.status
            text = f"skipped (finished earlier) {text}" if skipped else text
        timing = "" if skipped else f" ({job.seconds:.1f} s)"
        print(f"[{self.done}/{len(self.jobs)}] {job.label}: {text}{timing}", flush=True)

    def _start(self, job: _Job) -> None:
        from singlestep.checkpoint import checkpoints

        run_dir, log = self.runs_dir / job.slug, self.runs_dir / f"{job.slug}.log"
        # Resume only from a checkpoint file: a first write that failed (or was killed) leaves
        # checkpoints/ empty or with only a hidden .step-*.tmp, and --resume would fail every time.
        if checkpoints(run_dir / "checkpoints"):
            cmd = [sys.executable, "-m", "singlestep.train", "--resume", str(run_dir)]
        else:
            if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
                n = 1
                while run_dir.with_name(f"{job.slug}.incomplete-{n}").exists():
                    n += 1
                run_dir.rename(run_dir.with_name(f"{job.slug}.incomplete-{n}"))
                print(f"moved unfinished {run_dir} aside to {job.slug}.incomplete-{n}; starting over", flush=True)
            cmd = [sys.executable, "-m", "singlestep.train", "--config", self.config, *self.fixed, *job.overrides,
                   f"output.run_dir={run_dir}"]  # fmt: skip
        with open(log, "a", encoding="utf-8") as f:  # the child writes through its own copy of the fd
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)  # fmt: skip
        self.running[proc] = (job, log, offset, time.perf_counter())

    def _finish(self, proc: subprocess.Popen, rc: int) -> None:
        job, log, offset, started = self.running.pop(proc)
        job.seconds = time.perf_counter() - started
        run_dir = self.runs_dir / job.slug
        summary = read_summary(run_dir)
        status = summary.get("status") if summary is not None else None  # None: no summary, or an older one
        interrupted = rc in (cli.EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM) or (rc == -signal.SIGKILL and
                                                                                   self.forwarded > 1)  # fmt: skip
        finished = finished_run(job.seed, run_dir, summary)
        if status == "diverged" or rc == cli.EXIT_STOPPED:
            reason = summary_error(summary) if status == "diverged" else ""
            job.run = Run(job.seed, "diverged", reason=reason or failure_reason(log, offset, rc), summary=summary,
                          run_dir=run_dir)  # fmt: skip
        elif rc == 0 and finished is not None:
            job.run = finished
        elif interrupted or status == "interrupted" or (status is None and summary and summary.get("interrupted")):
            job.run = Run(job.seed, "interrupted", run_dir=run_dir)
        else:
            reason = summary_error(summary) if status == "failed" else ""
            if not reason:
                reason = "exit code 0 but no summary.json" if rc == 0 else failure_reason(log, offset, rc)
            job.run = Run(job.seed, "failed", reason=reason, run_dir=run_dir)
        self._report(job)

    def run(self) -> bool:
        """Run what is not finished yet; returns True when stopped by a signal."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create '{self.runs_dir}': {exc.strerror}") from None
        pending = []
        for job in self.jobs:
            run_dir = self.runs_dir / job.slug
            _check_same_config(run_dir, job.expected)
            job.run = finished_run(job.seed, run_dir, read_summary(run_dir))
            if job.run is not None:  # ok or diverged: not run again
                self.skipped += 1
                self._report(job, skipped=True)
            else:
                pending.append(job)
        with cli.signals_to(self._on_signal):
            while self.running or (pending and not self.signals and not self.metric_error):
                if self.signals > self.forwarded:  # 1st: a clean stop (checkpoint, exit 130); 2nd: kill
                    sig = signal.SIGINT if self.signals == 1 else signal.SIGKILL
                    for proc in self.running:
                        proc.send_signal(sig)  # a no-op for a child that has just exited
                    if self.forwarded == 0 and self.running:
                        print(f"stopping: waiting for {len(self.running)} run(s) to checkpoint and exit "
                              "(Ctrl-C again to kill them)", file=sys.stderr, flush=True)  # fmt: skip
                    self.forwarded = self.signals
                while pending and len(self.running) < self.n_jobs and not self.signals and not self.metric_error:
                    self._start(pending.pop(0))
                for proc in list(self.running):
                    rc = proc.poll()
                    if rc is not None:
                        self._finish(proc, rc)
                time.sleep(0.05)
        for job in pending:
            job.run = Run(job.seed, "not run")
        if self.metric_error:
            raise UserError(self.metric_error)
        return self.signals > 0


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m singlestep.sweep",
        description="Train every combination of grid values (x seeds) as its own run, then table and plot them.",
        epilog="example: --grid optimizer.name=sgd,adagrad --grid optimizer.lr=log:1e-3:1:7 --seeds 0,1,2 --jobs 2",
    )
    p.add_argument("--config", required=True, help="the base YAML config")
    p.add_argument("--grid", action="append", metavar="KEY=VALUES",
                   help="key=v1,v2,...  key=log:LO:HI:N  key=lin:LO:HI:N; repeat for more keys")  # fmt: skip
    p.add_argument("--seeds", help="comma-separated seeds, each combination run once per seed (default: the config's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; the CPU cores are divided between them")
    p.add_argument("--metric", help="split.name to rank by (default: val.accuracy if reported, else val.loss)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<config name>-<timestamp>); the same again continues")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides applied to every run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be >= 1")
    if args.metric is not None and not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", args.metric):
        raise UserError(f"--metric '{args.metric}': expected split.name, e.g. val.accuracy or test.loss")
    grid, jobs, optimizer = _plan(args)
    out = Path(args.out or f"sweeps/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"sweep {out} | {len(jobs) // len({j.seed for j in jobs})} combinations x {len({j.seed for j in jobs})} "
          f"seed(s) = {len(jobs)} runs | {args.jobs} at a time", flush=True)  # fmt: skip
    sweep = _Sweep(jobs, out, args.config, args.overrides, args.jobs, args.metric)
    stopped = sweep.run()
    combos: dict[int, list[_Job]] = {}
    for job in jobs:
        combos.setdefault(job.combo, []).append(job)
    info = {"config": args.config, "overrides": args.overrides, "seeds": sorted({j.seed for j in jobs})}
    report(out, {k: [v for v, _ in vals] for k, vals in grid.items()},
           [(js[0].values, [j.run for j in js]) for js in combos.values()], sweep.metric or "val.loss", info,
           fallback_label=optimizer)  # fmt: skip
    n_ok = sum(j.run.status in ("ok", "diverged") for j in jobs)  # finished: not run again
    where = f"{out / 'summary.md'} (also summary.csv, sweep.json)"
    if stopped:
        again = "the same command" if args.out else f"the same command with --out {out}"
        print(f"interrupted: {n_ok}/{len(jobs)} runs finished; table of what finished in {where}; "
              f"{again} continues the sweep", flush=True)  # fmt: skip
        return cli.EXIT_INTERRUPTED
    print(f"done: {n_ok}/{len(jobs)} runs finished ({sweep.skipped} skipped, finished earlier) -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
