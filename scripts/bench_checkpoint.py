"""What checkpoints cost: one save per model size, and a whole per-sample run with and without them.

    python scripts/bench_checkpoint.py              # ~2 minutes on 2 cores
    python scripts/bench_checkpoint.py --repeats 3

Part 1 saves a checkpoint-shaped state (parameters plus two optimizer buffers of the same size)
with ``checkpoint.save_checkpoint`` (temporary file, fsync, rename) several times and prints the
median. Part 2 runs the Fashion-MNIST per-sample softmax regression (one epoch, compiled engine;
it needs the dataset files, see docs/data.md) through the CLI with
``output.checkpoint_every`` null, 10,000 (the default) and 2,000, alternating the variants, and
prints each run's train seconds (from summary.json) and the ratio to the run without periodic
checkpoints measured in the same round. Nothing here is a test: the numbers depend on the machine
and its disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from singlestep import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def save_costs(sizes: list[int], repeats: int = 7) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in sizes:
            state = {"format": checkpoint.FORMAT, "model": {"w": torch.randn(n)},
                     "optimizer": {"state": {0: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.randn(n)}}}}  # fmt: skip
            times = []
            for i in range(repeats):
                start = time.perf_counter()
                checkpoint.save_checkpoint(folder, i, state)
                checkpoint.prune(folder, 3)
                times.append(time.perf_counter() - start)
            print(f"save, {n:>10,} parameters (+2 buffers): median {statistics.median(times) * 1e3:7.1f} ms, "
                  f"min {min(times) * 1e3:6.1f} ms")  # fmt: skip


def run_once(every: str, out: Path) -> float:
    config = ROOT / "configs" / "fashion_mnist_linear_per_sample.yaml"
    args = [sys.executable, "-m", "singlestep.train", "--config", str(config), "trainer.epochs=1",
            "scheduler=null", f"output.checkpoint_every={every}", f"output.run_dir={out}", "output.curves=false"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads((out / "summary.json").read_text())["train_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three whole runs")
    args = p.parse_args()
    save_costs([8_000, 1_000_000, 10_000_000])
    variants = ["null", "10000", "2000"]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        run_once("null", Path(tmp) / "warm")  # compiles (or loads) the chunk once, outside the timing
        for r in range(args.repeats):
            for v in variants:
                seconds[v].append(run_once(v, Path(tmp) / f"{v}-{r}"))
    for r in range(args.repeats):
        base = seconds["null"][r]
        cells = ", ".join(f"every {v}: {seconds[v][r]:.2f} s ({seconds[v][r] / base:.2f}x)" for v in variants)
        print(f"round {r + 1}, one epoch per-sample compiled, train seconds: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
