"""The compiled engine: K per-sample steps in one call of one compiled graph.

How it works (docs/architecture.md has the whole picture):

1. The step, :func:`singlestep.engine.step.take_step`, is traced once into a pure graph of tensor
   ops, with the user's optimizer called as-is (``_trace.py``).
2. K of those steps are exported inside torch's ``scan`` operator and compiled ahead of time into a
   native package (``_aoti.py``), cached on disk under a hash of the graph (``_cache.py``).
3. A shape's first compiled chunk is checked: the same steps then run eagerly from the same saved
   state, and parameters, optimizer state and the Python values ``step()`` changes must agree, or
   the run stays eager with one warning naming the difference. Tracing runs ``step()``'s Python
   once, so a Python step count would otherwise be frozen into the graph without a sign.
4. Whatever the chunk does not cover (warm-up, timing for ``auto``, short tails, fall-backs) runs
   on the eager engine this engine holds; ``auto``'s choice comes from ``policy.py``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from singlestep.engine import _trace
from singlestep.engine._aoti import compile_package, inductor_configs, load_chunk
from singlestep.engine._cache import cache_dir, graph_key, recipe_key, recipe_target
from singlestep.engine._trace import CompileUnsupported
from singlestep.engine.base import Engine, advance_schedule
from singlestep.engine.eager import EagerEngine
from singlestep.engine.policy import CACHED_LOAD_S, AutoPolicy, Decision
from singlestep.runlog import write_atomic

__all__ = ["CompiledEngine", "CompileUnsupported", "cache_dir"]

# A compiled chunk's first run must match eager steps from the same state within this
# (|compiled - eager| <= atol + rtol * max |eager|, per tensor; fused and foreach maths differ in last bits).
_VERIFY_RTOL = 1e-4
_VERIFY_ATOL = 1e-6
# Below this many parameters, per-sample chunks run on one thread (see CompiledEngine).
_ONE_THREAD_PARAMS = 50_000

Shape = tuple[int, int, int]  # (K steps, A micro-batches, B samples each)


class CompiledEngine(Engine):
    """Steps run as compiled chunks; anything the chunk does not cover runs eagerly, identically.

    Per-sample mode compiles chunks of ``chunk_size`` steps of one sample each; mini-batch mode
    compiles single steps of the full batch shape (``batch_shape``: micro-batches x samples).
    The first chunks or batches of a shape run eagerly: the first warms up and creates the
    optimizer's lazy state, which the trace needs; then up to four chunks (one batch) are timed,
    for ``auto``. Short chunks and short last batches always run eagerly. If tracing, compiling
    or the first chunk's check fails, the engine warns once, saying why, and continues eagerly.

    Args:
        chunk_size: per-sample steps per compiled call (K).
        batch_shape: ``(grad_accum_steps, batch_size)`` of a full mini-batch step, or None.
        threads: intra-op threads for compiled per-sample chunks; None picks 1 for models under
            ``_ONE_THREAD_PARAMS`` parameters on the CPU (tiny tensors: one thread saves OpenMP's
            fork/join per kernel; measured 16 vs 22 us/step for 784->10 softmax regression) and
            torch's setting otherwise (an MLP of 235k parameters runs 1.6x faster on two).
            Mini-batch steps keep torch's setting; the eagerly run chunks follow the eager
            engine's own rule.
        auto: decide per shape whether compiling pays off (``policy.py``).
        total_steps: the run's steps, for ``auto``.
        log: where progress lines go (compiling, ``auto``'s choice).
    """

    name = "compiled"

    def __init__(self, *args: Any, chunk_size: int = 64, batch_shape: tuple[int, int] | None = None,
                 threads: int | None = None, auto: bool = False, total_steps: int | None = None,
                 log: Callable[[str], None] | None = None, **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)
        # Composition: every step this engine does not compile is the eager engine's, on the same
        # objects and the same statistics.
        self.eager = EagerEngine(*args, **kwargs)
        self.stats = self.eager.stats
        self.auto = auto
        self.policy = AutoPolicy(total_steps)
        self.log = log or (lambda text: None)
        self.steps_done = 0
        self.choice: str | None = None  # what auto picked, for the summary
        self.chunk_size = chunk_size
        self.max_chunk = chunk_size * max(1, 4096 // chunk_size)
        self.batch_shape = batch_shape
        small = sum(p.numel() for p in self.params) < _ONE_THREAD_PARAMS
        self.threads = threads if threads is not None else (1 if small and self.train.device.type == "cpu" else None)
        self.cache_hit = False
        self.fallback_reason: str | None = None
        self.compile_seconds = 0.0
        self._fns: dict[Shape, Any] = {}
        self._warm: set[Shape] = set()  # shapes whose first (warm-up) run is done
        self._verified: set[Shape] = set()  # shapes whose compiled chunk matched eager
        self._python_checked: Any = None  # the optimizer's Python values when the last check passed
        self._resumed: set[Shape] = set()  # shapes a resumed run compiles as the run before it chose to

    # ------------------------------------------------------------------ public

    def run_samples(self, idx: Tensor) -> None:
        self.run_samples_at(idx, None)

    def run_samples_at(self, idx: Tensor, rows: list[list[float]] | None) -> None:
        """``rows``: each step's lr per group, the schedule already advanced (a hogwild worker's
        share); None: the engine advances the schedule itself, chunk by chunk."""
        n, pos, k = idx.shape[0], 0, self.chunk_size
        at = (lambda a, b: None) if rows is None else (lambda a, b: rows[a:b])  # noqa: E731
        shape = (k, 1, 1)
        fn = self._compiled(shape) if n >= k else None
        if fn is None and n >= k and shape not in self._fns and self.fallback_reason is None:
            # A shape's first chunk runs eagerly (it warms up, and creates the optimizer's lazy
            # state that the trace needs); the next ones are timed, for auto; then it compiles.
            if shape not in self._warm:
                self._warm.add(shape)
                self._eager_samples(idx[:k], at(0, k))
                pos = k
            if n - pos >= k:
                # Up to four chunks are timed and the fastest counts: the first chunks after the
                # warm-up still run 10-40% slower than the steady state, enough to tip auto.
                starts = range(pos, pos + min(4, (n - pos) // k) * k, k)
                self._timed_eager(shape, k, [functools.partial(self._eager_samples, idx[s : s + k], at(s, s + k), count=False)
                                             for s in starts])  # fmt: skip
                pos += len(starts) * k
                fn = self._compiled(shape)
        if fn is not None and n - pos >= k:
            threads = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                while n - pos >= k and self.fallback_reason is None:
                    if shape in self._verified:
                        if not self._python_unchanged():
                            break
                        self._run(fn, idx[pos : pos + k].view(k, 1, 1), at(pos, pos + k))
                    else:
                        self._verify(shape, fn, idx[pos : pos + k], at(pos, pos + k))
                    pos += k
            finally:
                torch.set_num_threads(threads)
        if pos < n:
            self._eager_samples(idx[pos:], at(pos, n))

    def run_batch(self, micro_batches: list[Tensor], total: int | None = None) -> None:
        if total is not None and total != sum(int(mb.shape[0]) for mb in micro_batches):
            self.eager.run_batch(micro_batches, total)  # a slice of a larger batch: never compiled
            self.steps_done += 1
            return
        shape = (1, len(micro_batches), int(micro_batches[0].shape[0]))
        full = self.batch_shape is not None and shape[1:] == tuple(self.batch_shape)
        full = full and all(mb.shape[0] == shape[2] for mb in micro_batches)
        fn = self._compiled(shape) if full else None
        if fn is None:
            # As per-sample chunks: the first full batch warms up, the second is timed.
            timed = shape in self.policy.eager_step_seconds
            if full and shape in self._warm and not timed and self.fallback_reason is None:
                self._timed_eager(shape, 1, [lambda: self.eager.run_batch(micro_batches)])
            else:
                if full:
                    self._warm.add(shape)
                self.eager.run_batch(micro_batches)
                self.steps_done += 1
            return
        if shape not in self._verified:
            self._verify(shape, fn, micro_batches)
        elif self._python_unchanged():
            self._run(fn, torch.stack(micro_batches).unsqueeze(0))
        else:
            self.eager.run_batch(micro_batches)
            self.steps_done += 1

    def settled(self) -> bool:
        """Whether per-sample chunks need no more warm-up, timing, building or checking: compiled
        and checked, declined by ``auto``, or fallen back (hogwild shares the engine from then on)."""
        shape = (self.chunk_size, 1, 1)
        return self.fallback_reason is not None or shape in self._verified or (shape in self._fns and self._fns[shape] is None)

    def flush(self) -> None:
        self.eager.flush()

    def stay_eager(self, reason: str) -> None:
        """Run every later step eagerly, warning once with ``reason``."""
        self._fallback(reason)

    def read(self) -> dict[str, float]:
        return self.eager.read()  # the same statistics: the eager engine flushes its host sums first

    def peek(self) -> dict[str, float]:
        return self.eager.peek()

    def state_dict(self) -> dict[str, Any]:
        """Which steps of each shape this engine has run eagerly, timed, compiled or checked,
        and ``auto``'s choices: a resumed run then runs each later step the way this one would
        have (eagerly or compiled: their last bits differ), without timing or deciding again."""
        return {**self.eager.state_dict(), "name": self.name, "steps_done": self.steps_done, "choice": self.choice,
                "fallback_reason": self.fallback_reason, "warm": [list(s) for s in sorted(self._warm)],
                "timed": [[*s, t] for s, t in sorted(self.policy.eager_step_seconds.items())],
                "built": [list(s) for s, fn in sorted(self._fns.items()) if fn is not None],
                "declined": [list(s) for s, fn in sorted(self._fns.items()) if fn is None],
                "verified": [list(s) for s in sorted(self._verified)]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue as the engine that wrote ``state``; call after the optimizer's state is loaded.
        Shapes it had compiled are built again (a cached package loads in a fraction of a second)
        when first used, whatever ``auto`` would decide now."""
        self.eager.load_state_dict(state)
        self.steps_done, self.choice = state["steps_done"], state["choice"]
        self.fallback_reason = state["fallback_reason"]
        self._warm = {tuple(s) for s in state["warm"]}
        self.policy.eager_step_seconds = {tuple(int(v) for v in row[:3]): row[3] for row in state["timed"]}
        self._fns = {tuple(s): None for s in state["declined"]}
        self._resumed = {tuple(s) for s in state["built"]}
        self._verified = {tuple(s) for s in state["verified"]}
        # The Python values the checked graph holds: unchanged since the check, or the run would
        # have fallen back before its checkpoint.
        self._python_checked = _trace.python_state(self.optimizer)
        if self.fallback_reason is not None:
            self.log(f"engine {self.name}: running eagerly, as before the resume ({self.fallback_reason})")

    @property
    def label(self) -> str:
        """The engine as the summary reports it."""
        if self.fallback_reason is not None:
            return f"{'auto' if self.auto else 'compiled'} (fell back to eager)"
        return f"auto ({self.choice or 'eager'})" if self.auto else "compiled"

    # ------------------------------------------------------------------ eager steps

    def _eager_samples(self, idx: Tensor, rows: list[list[float]] | None, count: bool = True) -> None:
        if rows is None:
            self.eager.run_samples(idx)
        else:
            self.eager.run_samples_at(idx, rows)
        if count:
            self.steps_done += len(idx)

    def _timed_eager(self, shape: Shape, steps: int, runs: list[Callable[[], None]]) -> None:
        """Run each of ``runs`` (``steps`` steps each) eagerly and remember the fastest time per
        step: what auto weighs compiling against."""
        sync = torch.cuda.synchronize if self.train.device.type == "cuda" else (lambda: None)
        best = math.inf
        for run in runs:
            sync()
            start = time.perf_counter()
            run()
            sync()  # once per run, a few per shape: not per step
            best = min(best, time.perf_counter() - start)
            self.steps_done += steps
        self.policy.eager_step_seconds[shape] = best / steps

    # ------------------------------------------------------------------ the first chunk's check

    def _verify(self, shape: Shape, fn: Any, samples: Tensor | list[Tensor], rows: list[list[float]] | None = None) -> None:
        """Run a shape's first compiled chunk, then the same steps eagerly from the same state, and
        keep the eager result. Unless parameters, optimizer state and the Python values the step
        changes all agree, fall back to eager for good, with a warning that names the difference.

        This catches what the support checks cannot know: a Python number in ``param_groups`` or
        on the optimizer that ``step()`` updates (a step count) is frozen into the traced graph.
        """
        k = shape[0]
        opt, stats = self.optimizer, self.stats
        lr_rows = rows if rows is not None else advance_schedule(self.scheduler, opt, k)
        keys = _trace.state_keys(opt, self.params)
        self.eager.flush()
        flat = _trace.flat_tensors(opt, self.params, keys)
        sums = [stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped]
        before, sums_before = [t.clone() for t in flat], [t.clone() for t in sums]
        python_before = _trace.python_state(opt)
        idx = samples.view(k, 1, 1) if isinstance(samples, Tensor) else torch.stack(samples).unsqueeze(0)
        with torch.no_grad():
            fn(idx, torch.tensor(lr_rows, dtype=torch.float32, device=self.train.device))
            compiled = [t.clone() for t in flat]
            python_compiled = _trace.python_state(opt)
            torch._foreach_copy_(flat, before)
            torch._foreach_copy_(sums, sums_before)
        _trace.restore_python_state(opt, python_before)
        if isinstance(samples, Tensor):
            self.eager.run_samples_at(samples, lr_rows if self.scheduler is not None or rows is not None else None)
        else:
            self.eager.run_batch_at(samples, lr_rows[0])
        self.steps_done += k
        problem = _trace.python_changes(python_compiled, _trace.python_state(opt), how="compiled {}, eager {}")
        if problem:
            self._fallback(_trace.frozen_reason(problem[0]))
            return
        eager = _trace.flat_tensors(opt, self.params, keys)
        for what, c, e in zip(_trace.flat_names(len(self.params), keys), compiled, eager):
            mismatch = _mismatch(c, e)
            if mismatch:
                self._fallback(f"after its first chunk of {k} steps the compiled step's {what} {mismatch}; running eagerly")
                return
        self._verified.add(shape)
        self._python_checked = _trace.python_state(opt)

    def _python_unchanged(self) -> bool:
        """Whether the optimizer's plain Python values (momentum, betas, weight decay, a flag) are
        those the compiled graph was checked with; a change (a scheduler's momentum cycle, the
        user's own code) is frozen in the graph, so it falls back instead. A dict comparison per
        chunk, no device sync."""
        now = _trace.python_state(self.optimizer)
        if now == self._python_checked:
            return True
        change = _trace.python_changes(self._python_checked, now, how="checked with {}, now {}")
        self._fallback(f"{change[0]} changed after the compiled step was built and checked, and the graph holds "
                       "the old value; running eagerly")  # fmt: skip
        return False

    # ------------------------------------------------------------------ build

    def _compiled(self, shape: Shape) -> Any:
        """The compiled chunk for ``shape``, built once the shape has a timed eager run; None for
        a shape that runs eagerly (not timed yet, ``auto`` declined, or a fall-back)."""
        if shape in self._fns or self.fallback_reason is not None:
            return self._fns.get(shape)
        if shape not in self.policy.eager_step_seconds and shape not in self._resumed:
            return None
        start = time.perf_counter()
        try:
            self._fns[shape] = self._build(shape)
        except CompileUnsupported as exc:
            self._fallback(str(exc))
        except Exception as exc:  # a tracing/compiler failure is a reason to run eagerly, not to crash
            self._fallback(_trace.explain(exc, self.optimizer))
        self.compile_seconds += time.perf_counter() - start
        return self._fns.get(shape)

    def _choose(self, shape: Shape, *, cached: bool, nodes: int | None) -> bool:
        """``auto``'s decision for ``shape`` (always compile without ``auto``), logged."""
        if not self.auto:
            return True
        if shape in self._resumed:
            self.log("engine auto: compiled, as chosen before the resume")
            return True
        decision: Decision = self.policy.decide(shape, self.steps_done, self._chunk_threads(shape) == 1,
                                                cached=cached, nodes=nodes)  # fmt: skip
        if decision.compile or self.choice is None:
            self.choice = "compiled" if decision.compile else "eager"
        self.log(decision.message)
        return decision.compile

    def _build(self, shape: Shape) -> Any:
        """Load (or trace and compile) the chunk of ``K`` steps of ``A x B`` samples, or None.

        A cached package is found in two ways. Its file name is a hash of the traced graph (what
        the package is compiled from), and a *recipe* file, named by a hash of everything the
        trace is built from, names the package. A run whose recipe is known loads the package
        without tracing, and so without importing the compiler (~1 s of start-up); any other run
        traces, and finds the package by the graph's hash when only the recipe changed.
        """
        k, micro, rows = shape
        resumed = self.auto and shape in self._resumed
        if self.auto and not resumed and self.policy.gain(shape, self.steps_done, self._chunk_threads(shape) == 1) <= CACHED_LOAD_S:
            self._choose(shape, cached=True, nodes=None)  # logs that not even a cached package would pay off
            return None
        opt, params, split = self.optimizer, self.params, self.train
        _trace.check_supported(self.model, opt, params, self.scheduler, self.eager.used_params(), per_sample=k > 1)
        keys = _trace.state_keys(opt, params)
        self._state_keys = keys
        idx0 = torch.zeros(k, micro, rows, dtype=torch.long, device=split.device)
        lrs0 = torch.zeros(k, len(opt.param_groups), device=split.device)
        example = (_trace.flat_tensors(opt, params, keys), split.tensors(), idx0, lrs0, torch.zeros(4, device=split.device))
        configs = inductor_configs(self._chunk_threads(shape))
        recipe = cache_dir() / "recipe-{}.txt".format(recipe_key(
            shape, example, model=self.model, optimizer=opt, params=params, train=split, loss_fn=self.loss_fn,
            rule=self.rule, configs=configs))  # fmt: skip
        path = recipe_target(recipe)
        if path is not None:
            self.cache_hit = True
            if not self._choose(shape, cached=True, nodes=None):
                return None
        else:
            if self.auto and not self._choose(shape, cached=False, nodes=None):
                return None  # not worth tracing the step (~1-2 s with the compiler's imports) to learn that
            graph = _trace.trace_step(self.model, self.loss_fn, opt, params, self.rule, split, micro, rows)
            path = cache_dir() / f"chunk-{graph_key(graph, example, shape, split.signature(), configs)}.pt2"
            self.cache_hit = path.exists()
            if not self._choose(shape, cached=self.cache_hit, nodes=len(graph.graph.nodes)):
                return None
            if not self.cache_hit:
                compile_package(graph, example, split, shape, path, configs, lambda text: self.log(f"engine {self.name}: {text}"))
            write_atomic(recipe, path.name)
        return load_chunk(path, example, lambda: _trace.flat_tensors(opt, params, keys), self.stats)

    def _fallback(self, reason: str) -> None:
        self.fallback_reason = reason
        self._fns.clear()
        warnings.warn(f"engine 'compiled' falls back to eager: {reason}", stacklevel=3)

    def _chunk_threads(self, shape: Shape) -> int | None:
        """The intra-op threads the chunk of ``shape`` runs with (None: torch's setting)."""
        return self.threads if shape[1:] == (1, 1) else None

    # ------------------------------------------------------------------ run

    def _run(self, fn: Any, idx: Tensor, rows: list[list[float]] | None = None) -> None:
        """Run one compiled chunk over ``idx [K, A, B]``: K optimizer steps (``rows``: their lrs,
        the schedule already advanced; None: advance it here)."""
        k = idx.shape[0]
        rows = rows if rows is not None else advance_schedule(self.scheduler, self.optimizer, k)
        lrs = torch.tensor(rows, dtype=torch.float32, device=self.train.device)
        with torch.no_grad():
            fn(idx, lrs)
        self.stats.steps += k
        self.steps_done += k


def _mismatch(compiled: Tensor, eager: Tensor) -> str:
    """How ``compiled`` differs from ``eager`` beyond the check's tolerance ('' if it does not)."""
    if compiled.shape != eager.shape or compiled.dtype != eager.dtype:
        return f"is {compiled.dtype} {tuple(compiled.shape)}, eager's {eager.dtype} {tuple(eager.shape)}"
    if not eager.is_floating_point():
        return "" if torch.equal(compiled, eager) else "differs from eager steps'"
    if not eager.numel():
        return ""
    diff = float((compiled.double() - eager.double()).abs().max())
    scale = float(eager.double().abs().max())
    if diff <= _VERIFY_ATOL + _VERIFY_RTOL * scale:  # a NaN difference fails this too
        return ""
    return f"differs from eager steps' by {diff:.3g} (largest |value| {scale:.3g})"
