"""Hogwild's speed-up: one epoch of per-sample softmax regression on Fashion-MNIST, one process
against ``trainer.parallel=hogwild trainer.workers=N``, eager and compiled, side by side.

    python scripts/bench_hogwild.py [--workers 2] [--rounds 2] [--epochs 1]

Each configuration runs as the CLI (``python -m singlestep.train``), alternating, ``--rounds``
times after one untimed run per engine (so a compiled package comes from the cache in every timed
run). Printed per run: the whole command's wall time, the training loop's time (``train_seconds``
in summary.json: steps, evaluations, checkpoints), the steady steps per second (the median of the
metrics windows' samples_per_second) and the test accuracy; then the speed-ups, best of rounds.

Two figures say what the machine allows, so that a speed-up can be read against them:
- the ceiling: N one-process runs started at once, sharing nothing; their steady steps/s added
  up, against one run alone. Hogwild's steady rate cannot beat it by much (its processes do the
  same steps, and share the weights besides).
- the bound on the whole command (Amdahl): one process's wall time against the same time with
  its training loop N times faster and the rest (start-up, data, evaluation) unchanged.

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


def run(engine: str, workers: int, epochs: int, out: Path, copies: int = 1) -> list[dict]:
    """``copies`` CLI runs started at once; each one's figures."""
    extra = ["trainer.parallel=hogwild", f"trainer.workers={workers}"] if workers > 1 else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = []
    for _ in range(copies):
        run_dir = out / f"{engine}-{workers}-{time.monotonic_ns()}"
        cmd = [sys.executable, "-m", "singlestep.train", "--config", str(CONFIG), f"trainer.engine={engine}",
               f"trainer.epochs={epochs}", f"output.run_dir={run_dir}", "output.curves=false", "trainer.progress=false", *extra]  # fmt: skip
        errors = open(out / f"{run_dir.name}.err", "w+")  # noqa: SIM115 - a file, not a pipe: a chatty run never stalls
        started.append((cmd, run_dir, errors, time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)))  # fmt: skip
    results = []
    for cmd, run_dir, errors, start, process in started:
        process.wait()
        wall = time.perf_counter() - start
        if process.returncode:
            for *_, other in started:
                other.kill()
            errors.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{errors.read()}")
        summary = json.loads((run_dir / "summary.json").read_text())
        windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [w["samples_per_second"] for w in windows if w["event"] == "train" and w.get("samples_per_second")]
        results.append({"wall": wall, "train": summary["train_seconds"], "rate": statistics.median(rates),
                        "acc": summary["final"]["test"]["accuracy"], "engine": summary["engine"]})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="hogwild processes to compare with one")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each configuration, alternated")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    args = parser.parse_args()
    n = args.workers
    with tempfile.TemporaryDirectory(prefix="bench-hogwild-") as tmp:
        out = Path(tmp)
        results: dict[tuple[str, str], list[dict]] = {}
        ceiling: dict[str, list[float]] = {}
        for engine in ("eager", "compiled"):
            run(engine, 1, args.epochs, out)  # untimed: the compiled package into the cache
        for _ in range(args.rounds):
            for engine in ("eager", "compiled"):
                for kind, workers in (("one", 1), ("hogwild", n)):
                    [r] = run(engine, workers, args.epochs, out)
                    results.setdefault((engine, kind), []).append(r)
                    print(f"{engine:8} {kind:7} x{workers}: wall {r['wall']:6.2f} s | train {r['train']:6.2f} s | "
                          f"{r['rate']:9,.0f} steps/s | test accuracy {r['acc']:.4f} | {r['engine']}", flush=True)  # fmt: skip
                apart = run(engine, 1, args.epochs, out, copies=n)
                alone = results[engine, "one"][-1]["rate"]  # this round's one-process run: the same phase of the machine
                ceiling.setdefault(engine, []).append(sum(r["rate"] for r in apart) / alone)
                rates = " + ".join(f"{r['rate']:,.0f}" for r in apart)
                print(f"{engine:8} {n} one-process runs at once: {rates} steps/s "
                      f"= {ceiling[engine][-1]:.2f}x one alone", flush=True)  # fmt: skip
        print(f"\nspeed-up with {n} workers (best of {args.rounds} round{'s' * (args.rounds > 1)} each side):")
        for engine in ("eager", "compiled"):
            one, many = results[engine, "one"], results[engine, "hogwild"]
            best = lambda rs, key, f: f(r[key] for r in rs)  # noqa: E731
            bounds = [r["wall"] / (r["wall"] - r["train"] + r["train"] / n) for r in one]  # each run's own
            print(f"{engine:8} wall {best(one, 'wall', min) / best(many, 'wall', min):.2f}x "
                  f"(bound {min(bounds):.2f}-{max(bounds):.2f}x) | "
                  f"train {best(one, 'train', min) / best(many, 'train', min):.2f}x | "
                  f"steady steps/s {best(many, 'rate', max) / best(one, 'rate', max):.2f}x "
                  f"(ceiling {min(ceiling[engine]):.2f}-{max(ceiling[engine]):.2f}x) | "
                  f"test accuracy {statistics.mean(r['acc'] for r in one):.4f} -> {statistics.mean(r['acc'] for r in many):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
