"""Side-by-side benchmark: an idiomatic PyTorch loop against each singlestep engine, in one run.

    python scripts/bench.py                 # everything (~5 minutes on 2 cores)
    python scripts/bench.py --quick         # fewer steps, epoch times extrapolated
    python scripts/bench.py --only persample,cli --json bench.json

Every measurement runs in its own child process (so each gets a clean peak-RSS reading and no
variant warms another's caches), the variants of one case run back to back, and the table
reports ratios against the reference measured in the same run. Nothing here is a test: the
numbers depend on the machine, which is why they are printed, not asserted. All variants flush
denormal floats to zero (as the trainer does on CPU), so none is slowed by them. The engines'
children run under the memory allocator the CLI would use (singlestep/malloc.py: tcmalloc or
jemalloc when installed); the reference runs as a plain ``python``, and one more reference row
("reference+<allocator>") shows what the allocator alone does for the idiomatic loop.

Sections:
  persample  per-sample softmax regression on Fashion-MNIST (synthetic data of the same shape if
             the files are absent) with SGD, Adam and Adagrad: the idiomatic loop
             (DataLoader(batch_size=1, shuffle=True), nn.Linear, cross_entropy, clip_grad_norm_,
             torch.optim) against the eager and compiled engines (eager also without the linear
             model's closed-form grads, "eager, autograd"): steady-state us/step, compile
             seconds, one-epoch wall time (measured for SGD, extrapolated from steady state for
             the others), peak RSS.
  lm         tiny LM (4 layers, 4 heads, width 128, block 64): mini-batch (batch 12) tokens/s and
             per-sample (batch 1) steps/s, a plain eager loop with torch's AdamW against the
             eager and compiled engines with ours.
  cli        whole one-epoch per-sample CLI runs (60k steps, start-up and compilation included)
             against a reference script doing the same epoch, with a cold and a warm cache.
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

from singlestep import malloc
from singlestep.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLIP = 1.0
LRS = {"sgd": 0.01, "adam": 1e-3, "adagrad": 0.01}
TORCH_OPT = {"sgd": "SGD", "adam": "Adam", "adagrad": "Adagrad"}


# ----------------------------------------------------------------------------- child side


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _fashion_mnist():
    """Train split as (uint8 images [N,1,28,28], labels, mean, std, real?)."""
    import torch

    from singlestep.data.base import TensorSplit
    from singlestep.errors import DataError
    from singlestep.registry import DATASETS, load_builtins

    load_builtins()
    try:
        bundle = DATASETS.get("fashion_mnist")(torch.device("cpu"))
        split = bundle.train
        return split, True
    except DataError:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (60000, 1, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (60000,), generator=g)
        return TensorSplit(x, y, mean=0.2860, std=0.3530), False


def _time_blocks(run_block, blocks: int) -> float:
    """Median seconds of ``blocks`` calls."""
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        run_block()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child_persample(impl: str, opt: str, steps: int, epoch: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    split, real = _fashion_mnist()
    n = len(split)
    torch.manual_seed(0)
    out: dict = {"real_data": real, "samples": n}
    if impl == "reference":
        from torch.utils.data import DataLoader, TensorDataset

        x_all, y_all = split.get(torch.arange(n))
        loader = DataLoader(TensorDataset(x_all.flatten(1), y_all), batch_size=1, shuffle=True)
        model = nn.Linear(784, 10)
        optimizer = getattr(torch.optim, TORCH_OPT[opt])(model.parameters(), lr=LRS[opt])
        it = iter(loader)

        def run(k: int) -> None:
            nonlocal it
            for _ in range(k):
                try:
                    x, y = next(it)
                except StopIteration:
                    it = iter(loader)
                    x, y = next(it)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()

        start = time.perf_counter()
        run(200)
        out["compile_s"] = 0.0
        out["us_per_step"] = _time_blocks(lambda: run(steps), 3) / steps * 1e6
        if epoch:
            it = iter(loader)
            start = time.perf_counter()
            run(n)
            out["epoch_s"] = time.perf_counter() - start
    else:
        import contextlib

        from singlestep import fastpaths
        from singlestep.engine import build_engine
        from singlestep.losses import loss_for
        from singlestep.models.linear import Linear
        from singlestep.registry import OPTIMIZERS

        model = Linear(784, 10)
        optimizer = OPTIMIZERS.get(opt)(model.parameters(), lr=LRS[opt])
        autograd = impl == "eager_autograd"
        impl = "eager" if autograd else impl
        # "eager, autograd": the eager engine as it runs any other model, without the closed form
        def plain():  # a context for each build (one use each)
            return fastpaths.plain("closed_form") if autograd else contextlib.nullcontext()

        with plain():
            engine = build_engine(impl, model=model, loss_fn=loss_for("classification"), optimizer=optimizer,
                                  scheduler=None, train=split, clip_grad_norm=CLIP, chunk_size=64)  # fmt: skip
        order = torch.randperm(n)
        pos = 0

        def run(k: int) -> None:
            nonlocal pos
            if pos + k > n:
                pos = 0
            engine.run_samples(order[pos : pos + k])
            pos += k

        start = time.perf_counter()
        run(256)  # a warm-up and a timed chunk run eagerly, then it compiles (compiled engine)
        out["compile_s"] = getattr(engine, "compile_seconds", 0.0)
        out["fallback"] = getattr(engine, "fallback_reason", None)
        chunk = max(64, steps // 64 * 64)
        out["us_per_step"] = _time_blocks(lambda: run(chunk), 3) / chunk * 1e6
        if epoch:
            with plain():
                fresh = build_engine(impl, model=model, loss_fn=loss_for("classification"), optimizer=optimizer,
                                     scheduler=None, train=split, clip_grad_norm=CLIP, chunk_size=64)  # fmt: skip
            start = time.perf_counter()
            for s in range(0, n, 4096):
                fresh.run_samples(order[s : s + 4096])
            fresh.read()
            out["epoch_s"] = time.perf_counter() - start  # includes this engine's compile (cached by now)
    if not epoch:
        out["epoch_s_est"] = out["compile_s"] + n * out["us_per_step"] / 1e6
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _lm_setup(batch: int):
    import torch

    from singlestep.data.base import DataMeta, TokenSplit
    from singlestep.registry import MODELS, load_builtins

    load_builtins()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65, (1_000_000,), generator=g, dtype=torch.uint8)
    split = TokenSplit(tokens, 64)
    meta = DataMeta(task="lm", input_shape=(64,), vocab_size=65, block_size=64)
    torch.manual_seed(0)
    model = MODELS.get("tiny_lm")(meta, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    return split, model


def child_lm(impl: str, batch: int, steps: int) -> dict:
    import torch

    from singlestep.losses import loss_for

    split, model = _lm_setup(batch)
    loss_fn = loss_for("lm")
    g = torch.Generator().manual_seed(1)
    n = len(split)
    out: dict = {}
    if impl == "reference":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

        def run(k: int) -> None:
            for _ in range(k):
                ix = torch.randint(n, (batch,), generator=g)  # nanoGPT's get_batch
                x, y = split.get(ix)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()

        run(3)
        out["compile_s"] = 0.0
    else:
        from singlestep.engine import build_engine
        from singlestep.optim import AdamW

        optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        engine = build_engine(impl, model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=None, train=split,
                              clip_grad_norm=CLIP, chunk_size=16, batch_shape=(1, batch))  # fmt: skip

        def run(k: int) -> None:
            if batch == 1:
                engine.run_samples(torch.randint(n, (k,), generator=g))
            else:
                for _ in range(k):
                    engine.run_batch([torch.randint(n, (batch,), generator=g)])

        run(48 if batch == 1 else 3)  # a warm-up and a timed chunk/batch run eagerly, then it compiles
        out["compile_s"] = getattr(engine, "compile_seconds", 0.0)
        out["fallback"] = getattr(engine, "fallback_reason", None)
    step_s = _time_blocks(lambda: run(steps), 3) / steps
    out["ms_per_step"] = step_s * 1e3
    out["steps_per_s"] = 1 / step_s
    out["tokens_per_s"] = batch * 64 / step_s
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


REFERENCE_SCRIPT = r'''
import sys, time
import torch, torch.nn.functional as F
torch.set_flush_denormal(True)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {root!r})
from singlestep.registry import DATASETS, load_builtins
load_builtins()
split = DATASETS.get("fashion_mnist")(torch.device("cpu")).train
x, y = split.get(torch.arange(len(split)))
torch.manual_seed(0)
model = nn.Linear(784, 10)
opt = torch.optim.SGD(model.parameters(), lr=0.001)
for xb, yb in DataLoader(TensorDataset(x.flatten(1), y), batch_size=1, shuffle=True):
    opt.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
with torch.no_grad():
    print("done", float(loss))
'''


def run_cli_section(results: list[dict]) -> None:
    from singlestep.errors import DataError
    from singlestep.registry import DATASETS, load_builtins

    load_builtins()
    try:
        import torch

        DATASETS.get("fashion_mnist")(torch.device("cpu"))
    except DataError:
        print("cli section skipped: Fashion-MNIST files not found (see docs/data.md)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "reference_epoch.py"
        script.write_text(REFERENCE_SCRIPT.format(root=str(ROOT)))
        # Both caches start empty for a "cold" run: compiled packages and inflated data copies.
        def env_for(cache: str) -> dict[str, str]:
            return dict(os.environ, SINGLESTEP_CACHE=str(Path(tmp) / cache), XDG_CACHE_HOME=str(Path(tmp) / f"xdg-{cache}"))

        def cli(engine: str) -> list[str]:
            return [sys.executable, "-m", "singlestep.train", "--config", "configs/fashion_mnist_linear_per_sample.yaml",
                    "trainer.epochs=1", "data.val_size=0", f"trainer.engine={engine}", "trainer.progress=false",
                    "trainer.clip_grad_norm=1.0", f"output.dir={tmp}/runs"]  # fmt: skip

        runs = [("reference script", [sys.executable, str(script)], "ref"),
                ("singlestep compiled, cold cache", cli("compiled"), "a"),
                ("singlestep compiled, warm cache", cli("compiled"), "a"),
                ("singlestep auto (default), cold cache", cli("auto"), "b")]  # fmt: skip
        for label, cmd, cache in runs:
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env_for(cache), capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{label} failed:\n{proc.stderr[-2000:]}")
                return
            results.append({"section": "cli", "case": "one epoch, 60k per-sample steps", "impl": label, "wall_s": wall})
            print(f"  {label:40s} {wall:7.1f} s", flush=True)


# ----------------------------------------------------------------------------- parent side


def spawn(spec: dict, allocator: str = "system") -> dict:
    """Run one variant in a child process; ``allocator``: "system" or "auto" (the CLI's choice)."""
    env = malloc.preload_env(choice=allocator)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps; no measured epochs")
    p.add_argument("--only", default="persample,lm,cli", help="comma-separated sections")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        # Every variant flushes denormals, as the trainer does on CPU: per-sample optimizer state
        # decays into denormal floats, which make any loop (the reference's too) up to 20x slower.
        torch.set_flush_denormal(True)
        spec = json.loads(args.child)
        if spec["section"] == "persample":
            out = child_persample(spec["impl"], spec["opt"], spec["steps"], spec["epoch"])
        else:
            out = child_lm(spec["impl"], spec["batch"], spec["steps"])
        print(json.dumps({**out, "allocator": malloc.in_use()}))
        return 0

    import torch

    sections = set(args.only.split(","))
    results: list[dict] = []
    try:
        ours = malloc.kind(malloc.find())
    except UserError as exc:  # a bad SINGLESTEP_MALLOC
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"singlestep bench: torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"engines' allocator {ours}")  # fmt: skip
    # (label, impl, allocator): the reference as users run it, then our engines as the CLI runs them.
    variants = [("reference", "reference", "system"), ("eager", "eager", "auto"), ("compiled", "compiled", "auto")]
    if "persample" in sections:
        print("per-sample softmax regression (784 -> 10), clip_grad_norm 1.0")
        for opt in ("sgd", "adam", "adagrad"):
            extra = [(f"reference+{ours}", "reference", "auto")] if opt == "sgd" and ours != "system" else []
            # the eager engine without the linear model's closed-form grads, as it runs other models
            autograd = [("eager, autograd", "eager_autograd", "auto")]
            for label, impl, allocator in variants[:2] + autograd + variants[2:] + extra:
                spec = {"section": "persample", "case": f"per-sample {opt}", "impl": impl, "opt": opt,
                        "steps": 1000 if args.quick else 3000, "epoch": opt == "sgd" and not args.quick}  # fmt: skip
                r = {**spawn(spec, allocator), "impl": label}
                results.append(r)
                print(f"  {opt:8s} {label:16s} {_fmt_persample(r)}", flush=True)
    if "lm" in sections:
        print("tiny LM (4 layers, 4 heads, width 128, block 64), AdamW, clip 1.0")
        for batch, steps in ((12, 10 if args.quick else 30), (1, 64 if args.quick else 256)):
            for label, impl, allocator in variants:
                spec = {"section": "lm", "case": f"tiny LM batch {batch}", "impl": impl, "batch": batch, "steps": steps}
                r = {**spawn(spec, allocator), "impl": label}
                results.append(r)
                print(f"  batch {batch:2d} {label:10s} {_fmt_lm(r)}", flush=True)
    if "cli" in sections:
        print("whole CLI run: one epoch of per-sample SGD on Fashion-MNIST (60k steps), start-up included")
        run_cli_section(results)
    print()
    print(render_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


def _fmt_persample(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    epoch = f"epoch {r['epoch_s']:.1f}s" if "epoch_s" in r else f"epoch ~{r['epoch_s_est']:.1f}s (est.)"
    fb = f"  FELL BACK: {r['fallback']}" if r.get("fallback") else ""
    return f"{r['us_per_step']:8.1f} us/step  compile {r['compile_s']:5.1f}s  {epoch}  rss {r['peak_rss_mb']:.0f} MB{fb}"


def _fmt_lm(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    fb = f"  FELL BACK: {r['fallback']}" if r.get("fallback") else ""
    return (f"{r['ms_per_step']:8.2f} ms/step  {r['tokens_per_s']:9.0f} tokens/s  {r['steps_per_s']:7.1f} steps/s"
            f"  compile {r['compile_s']:5.1f}s  rss {r['peak_rss_mb']:.0f} MB{fb}")  # fmt: skip


def render_table(results: list[dict]) -> str:
    """A markdown table with each variant's speed-up over its case's reference."""
    rows = ["| case | implementation | per step | speed-up vs reference | compile s | epoch / run s | peak RSS MB | RSS vs reference |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    refs = {r["case"]: r for r in results if r.get("impl") in ("reference", "reference script") and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | {r['impl']} | error: {r['error']} | | | | | |")
            continue
        ref = refs.get(r["case"], {})
        if r["section"] == "persample":
            per, base = r["us_per_step"], ref.get("us_per_step")
            speed = f"{base / per:.1f}x" if base else ""
            epoch = f"{r['epoch_s']:.1f}" if "epoch_s" in r else f"~{r['epoch_s_est']:.1f}"
            per_text = f"{per:.1f} us"
        elif r["section"] == "lm":
            per, base = r["ms_per_step"], ref.get("ms_per_step")
            speed = f"{base / per:.2f}x" if base else ""
            epoch = ""
            per_text = f"{per:.2f} ms ({r['tokens_per_s']:,.0f} tok/s)"
        else:
            base = ref.get("wall_s")
            rows.append(f"| {r['case']} | {r['impl']} | | {base / r['wall_s']:.1f}x faster |  | {r['wall_s']:.1f} | | |")
            continue
        rss_ratio = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref.get("peak_rss_mb") else ""
        fb = " (fell back)" if r.get("fallback") else ""
        rows.append(f"| {r['case']} | {r['impl']}{fb} | {per_text} | {speed} | {r['compile_s']:.1f} | {epoch} | "
                    f"{r['peak_rss_mb']:.0f} | {rss_ratio} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
