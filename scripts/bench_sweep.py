"""What ``--jobs`` buys: the same small per-sample sweep run one at a time and two at a time.

    python scripts/bench_sweep.py               # ~3 minutes on 2 cores
    python scripts/bench_sweep.py --rounds 2

Each round runs a 2 x 2 x 2 sweep (sgd / adagrad x two learning rates x two seeds: 8 runs of
per-sample softmax regression on Fashion-MNIST, 20,000 steps each, eager engine, so no compile
cache is involved) with ``--jobs 1`` and then ``--jobs 2`` into fresh folders, and prints the
wall times and their ratio measured side by side. Per-sample steps of a small model run on one
thread, so two jobs on two cores should approach 2x; process start-up, data loading and the
final evaluation are part of every run. Nothing here is a test: the numbers depend on the machine.
It needs the Fashion-MNIST files (see docs/data.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(out: Path, jobs: int) -> float:
    args = [sys.executable, "-m", "singlestep.sweep", "--config", str(ROOT / "configs" / "fashion_mnist_linear_per_sample.yaml"),
            "--grid", "optimizer=sgd,adagrad", "--grid", "optimizer.lr=0.003,0.03", "--seeds", "0,1",
            "--jobs", str(jobs), "--out", str(out), "trainer.engine=eager", "trainer.max_steps=20000",
            "scheduler=null", "output.curves=false"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one = sweep(Path(tmp) / f"one-{r}", 1)
            two = sweep(Path(tmp) / f"two-{r}", 2)
            print(f"round {r + 1}: 8 runs, --jobs 1 {one:.1f} s, --jobs 2 {two:.1f} s: {one / two:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
