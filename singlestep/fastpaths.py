"""The named switches of every fast path the engines and our optimizers take.

A fast path computes what the plain path computes, faster; each is kept because a bench showed
that it pays (docs/performance.md), and each can be turned off here so that a test runs the
plain path beside it and compares (tests/test_fastpaths.py). ``SINGLESTEP_PLAIN=1`` turns all of
them off for a whole run: the first thing to try when a result looks wrong.

Fast paths that call a private torch API go through ``singlestep._compat`` as well, which turns
them off by itself when the API is missing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import Iterator

__all__ = ["FAST", "FastPaths", "plain"]


@dataclass
class FastPaths:
    """Which fast paths are on (all by default, all off with ``SINGLESTEP_PLAIN=1``).

    Attributes:
        closed_form: the linear model's per-sample grads from its backward's own kernels, without
            an autograd graph (bit-identical grads; eager per-sample step ~60 -> ~25 us).
        direct_backward: grads from the autograd engine's entry point, past ``autograd.grad``'s
            per-call Python checks (~20 us a step; same numbers).
        bare_step: ``optimizer.step()`` past torch's profiling/hook wrapper when no hook or
            profiler is active, and past ``@torch.no_grad()`` with grad mode off (~12 us a step).
        host_arithmetic: on the CPU, the finite check, clip coefficient and statistics from one
            host read of the loss and the norm per step, instead of tensor maths (same roundings).
        fused_kernels: torch's fused CPU kernels in our sgd/adam/adamw/adagrad, one kernel per
            group instead of ~10 ``_foreach`` calls (last-bit differences, as torch's ``fused``).
        one_thread: small models' per-sample steps on one intra-op thread (~10% faster on 2 cores).
    """

    closed_form: bool = True
    direct_backward: bool = True
    bare_step: bool = True
    host_arithmetic: bool = True
    fused_kernels: bool = True
    one_thread: bool = True


FAST = FastPaths(**({f.name: False for f in fields(FastPaths)} if os.environ.get("SINGLESTEP_PLAIN") == "1" else {}))


@contextlib.contextmanager
def plain(*names: str) -> Iterator[None]:
    """Turn the named fast paths (all without names) off for a block.

    Engines read the switches when they are built and when a chunk starts: build them inside.
    """
    names = names or tuple(f.name for f in fields(FastPaths))
    saved = {n: getattr(FAST, n) for n in names}
    try:
        for n in names:
            setattr(FAST, n, False)
        yield
    finally:
        for n, v in saved.items():
            setattr(FAST, n, v)
