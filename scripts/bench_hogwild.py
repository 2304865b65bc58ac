"""Hogwild's speed-up: one epoch of per-sample softmax regression on Fashion-MNIST, one process
against ``trainer.parallel=hogwild trainer.workers=N``, eager and compiled, side by side.

    python scripts/bench_hogwild.py [--workers 2] [--rounds 2] [--epochs 1]

Each configuration runs as the CLI (``python -m singlestep.train``), alternating, ``--rounds``
times after one untimed run per engine (so a compiled package comes from the cache in every timed
run). Printed per run: the whole command's wall time, the training loop's time (``train_seconds``
in summary.json: steps, evaluations, checkpoints), the steady steps per second (the median of the
metrics windows' samples_per_second) and the test accuracy; then the speed-ups, best of rounds.
Needs the Fashion-MNIST files (Debian's dataset-fashion-mnist, or scripts/download_data.py).
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist_linear_per_sample.yaml"


def run(engine: str, workers: int, epochs: int, out: Path) -> dict:
    """One CLI run; its figures."""
    run_dir = out / f"{engine}-{workers}-{time.monotonic_ns()}"
    extra = ["trainer.parallel=hogwild", f"trainer.workers={workers}"] if workers > 1 else []
    cmd = [sys.executable, "-m", "singlestep.train", "--config", str(CONFIG), f"trainer.engine={engine}",
           f"trainer.epochs={epochs}", f"output.run_dir={run_dir}", "output.curves=false", "trainer.progress=false", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    summary = json.loads((run_dir / "summary.json").read_text())
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [w["samples_per_second"] for w in windows if w["event"] == "train" and w.get("samples_per_second")]
    return {"wall": wall, "train": summary["train_seconds"], "rate": statistics.median(rates),
            "acc": summary["final"]["test"]["accuracy"], "engine": summary["engine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="hogwild processes to compare with one (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each configuration, alternated")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hogwild-") as tmp:
        out = Path(tmp)
        results: dict[tuple[str, int], list[dict]] = {}
        for engine in ("eager", "compiled"):
            run(engine, 1, args.epochs, out)  # untimed: the compiled package into the cache
        for _ in range(args.rounds):
            for engine in ("eager", "compiled"):
                for workers in (1, args.workers):
                    r = run(engine, workers, args.epochs, out)
                    results.setdefault((engine, workers), []).append(r)
                    print(f"{engine:8} workers {workers}: wall {r['wall']:6.2f} s | train {r['train']:6.2f} s | "
                          f"{r['rate']:9,.0f} steps/s | test accuracy {r['acc']:.4f} | {r['engine']}", flush=True)  # fmt: skip
        print(f"\nspeed-up with {args.workers} workers (best of {args.rounds} rounds each side):")
        for engine in ("eager", "compiled"):
            one, many = results[engine, 1], results[engine, args.workers]
            best = lambda rs, key, f: f(r[key] for r in rs)  # noqa: E731
            print(f"{engine:8} wall {best(one, 'wall', min) / best(many, 'wall', min):.2f}x | "
                  f"train {best(one, 'train', min) / best(many, 'train', min):.2f}x | "
                  f"steady steps/s {best(many, 'rate', max) / best(one, 'rate', max):.2f}x | "
                  f"test accuracy {statistics.mean(r['acc'] for r in one):.4f} -> {statistics.mean(r['acc'] for r in many):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
