"""What sharing the weights costs hogwild, measured without the CLI.

The engine of ``configs/fashion_mnist_linear_per_sample.yaml`` is built in this process, then per
round:

- one process running 165k steps in blocks of ``--block`` (as each hogwild process does);
- two processes at once, each running half of them in blocks, sharing nothing;
- the same two with hogwild's shared copy of the weights (taken and added to once per block).

    python scripts/bench_hogwild_sharing.py [--block 64] [--rounds 3] [--engine compiled]

Run it under the CLI's allocator for the CLI's figures (``LD_PRELOAD=libtcmalloc_minimal.so.4``;
singlestep/malloc.py). The first compiled run compiles the chunk (tens of seconds); later runs load
it from the cache.
Needs the Fashion-MNIST files.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's singlestep, whatever else is installed

from singlestep.build import build  # noqa: E402
from singlestep.config import load_config  # noqa: E402
from singlestep.engine.hogwild import _run_blocks, _Shared  # noqa: E402

CONFIG = ROOT / "configs" / "fashion_mnist_linear_per_sample.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--block", type=int, default=64, help="steps per block (trainer.chunk_size)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements")
    parser.add_argument("--engine", default="compiled", choices=["compiled", "eager"], help="the engine each process runs")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the trainer does
    torch.set_num_threads(1)  # as every hogwild process does
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"trainer.engine={args.engine}", f"trainer.chunk_size={args.block}"])
    engine = build(cfg, torch.device("cpu"), engine=args.engine, log=print).engine
    if args.engine == "compiled":
        engine.threads = 1
    idx = torch.randperm(len(engine.train)).repeat(3)
    for start in range(0, 20_000, 5_000):  # warm-up: the optimizer's state; the chunk built and checked
        engine.run_samples_at(idx[start : start + 5_000], None)
    shared = _Shared(engine)
    context = multiprocessing.get_context("fork")

    def run(part: torch.Tensor, share: _Shared | None) -> float:
        start = time.perf_counter()
        _run_blocks(engine, share, args.block, part, None)
        engine.flush()
        return len(part) / (time.perf_counter() - start)

    def pair(share: _Shared | None) -> float:
        """Steps per second of two processes at once, added up."""
        rates, go = context.Queue(), context.Barrier(2, timeout=60)

        def child() -> None:
            go.wait()
            rates.put(run(idx[1::2], share))

        process = context.Process(target=child, daemon=True)
        process.start()
        go.wait()
        mine = run(idx[0::2], share)
        theirs = rates.get(timeout=600)  # before join: a full queue would keep the child waiting
        process.join()
        return mine + theirs

    for _ in range(args.rounds):
        one = run(idx, None)
        apart, together = pair(None), pair(shared)
        print(f"{args.engine}, blocks of {args.block}: one process {one:9,.0f} steps/s | two, nothing shared "
              f"{apart:9,.0f} ({apart / one:.2f}x) | two, hogwild's shared weights {together:9,.0f} ({together / one:.2f}x)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
