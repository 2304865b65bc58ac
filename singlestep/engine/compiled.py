"""The compiled engine: K per-sample steps in one call of one compiled graph.

How it works, and why:

1. One step (forward, ``torch.func`` grads, finite check, clipping, ``optimizer.step()``) is traced
   once with ``make_fx`` into a pure graph of tensor ops. The optimizer is the user's own object,
   called as-is: during tracing its parameter and state references are pointed at fresh copies, so
   any optimizer in ``torch.optim`` shape (tensor state, no ``.item()``) becomes functional maths.
   Python in ``step()`` runs only at trace time; profiler hooks are dropped from the graph.
2. K of those steps run inside torch's ``scan`` operator, exported and compiled ahead of
   time by AOTInductor into a native package, so a whole chunk is one native call: no Python,
   dispatch or autograd per sample. Compile time stays flat in K (the step is compiled once, not
   unrolled).
3. The learning rate of each of the K steps is an input tensor, filled from the schedule before
   the call, so a schedule never recompiles; non-finite steps are masked with ``torch.where`` so
   the optimizer state never sees them, without a host sync.

Compiled packages are cached on disk (``$SINGLESTEP_CACHE/compiled``, default
``~/.cache/singlestep/compiled``) under a hash of the traced step graph, its constants, the input
shapes and the torch version, so a second run of the same config loads its chunk in milliseconds
instead of compiling it. Deleting the folder is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from singlestep import _compat as compat
from singlestep.engine.base import advance_schedule
from singlestep.engine.eager import EagerEngine
from singlestep.engine.step import clip_coef, global_norm, take_step

__all__ = ["CompiledEngine", "CompileUnsupported", "cache_dir"]


# Estimates behind ``auto`` (measured on the 2-core CPU; see docs/performance.md): compiled
# speed-up over eager steps for per-sample chunks of small (one-thread) and larger models, and
# for mini-batch steps; compile seconds.
_PER_SAMPLE_SPEEDUP = 8.0  # softmax regression, closed-form eager: SGD 78 / 7.7 us, Adam 103 / 15.0, Adagrad 97 / 12.5
_PER_SAMPLE_SPEEDUP_LARGE = 2.5
_MINIBATCH_SPEEDUP = 1.15
_COMPILE_BASE_S = 8.5
_COMPILE_PER_NODE_S = 0.02
_CACHED_LOAD_S = 0.2
# A compiled chunk's first run must match eager steps from the same state within this
# (|compiled - eager| <= atol + rtol * max |eager|, per tensor; fused and foreach maths differ in last bits).
_VERIFY_RTOL = 1e-4
_VERIFY_ATOL = 1e-6
# Below this many parameters, per-sample chunks run on one thread (see CompiledEngine).
_ONE_THREAD_PARAMS = 50_000


class _StayEager(Exception):
    """``auto`` decided compiling this shape would not pay for itself."""


class CompileUnsupported(Exception):
    """The model or optimizer cannot run in the compiled engine (the message says why)."""


def cache_dir() -> Path:
    """Where compiled chunks are kept between runs (``$SINGLESTEP_CACHE/compiled``)."""
    return Path(os.environ.get("SINGLESTEP_CACHE", Path.home() / ".cache" / "singlestep")) / "compiled"


# Bump when the chunk's structure changes, so stale cached packages are never loaded.
_FORMAT = "singlestep-chunk-v3"


# A matmul with at most this many multiply-adds is traced as a broadcast multiply and a sum.
_TINY_MATMUL = 65536


def _tiny_matmul_decompositions() -> dict:
    """Trace tiny ``mm`` / ``addmm`` as pointwise maths that Inductor fuses into its own loops.

    A per-sample step of a small model is full of matmuls like 1x784 @ 784x10 (the forward) and
    10x1 @ 1x784 (the weight gradient). As BLAS calls each costs microseconds of set-up for
    nanoseconds of arithmetic; as a multiply and a sum they fuse with their neighbours
    (measured: 15.5 -> 11.8 us per softmax-regression step). Larger matmuls keep BLAS.
    """
    aten = torch.ops.aten

    def tiny(a: Tensor, b: Tensor) -> bool:
        return a.dim() == 2 and b.dim() == 2 and a.shape[0] * a.shape[1] * b.shape[1] <= _TINY_MATMUL

    def mm(a: Tensor, b: Tensor) -> Any:
        if not tiny(a, b):
            return NotImplemented  # traced as the usual op
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)

    def addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: Any = 1, alpha: Any = 1) -> Any:
        if not tiny(a, b):
            return NotImplemented
        out = (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)
        return (out if alpha == 1 else out * alpha) + (bias if beta == 1 else bias * beta)

    return {aten.mm.default: mm, aten.addmm.default: addmm}


class _UnfusedBias:
    """Inductor post-grad pass: ``addmm(bias, a, b)`` -> ``mm(a, b) + bias``.

    ATen's ``addmm_out`` first copies the broadcast bias into its output, a strided copy that
    costs more than the add it saves (tiny LM, batch 12: ~90 us for each 768x512 MLP output,
    ~0.8 ms of a ~24 ms step in 17 such copies). Inductor keeps the add as a pointwise op that
    fuses with its neighbours (the GELU, the residual add) or runs as one vectorised pass. On a
    GPU Inductor unfuses like this by itself; on the CPU it fuses ``mm + bias`` back into
    ``addmm`` earlier in the same stage, so this runs after its patterns. Inductor runs it on scan
    bodies too. Only CPU graphs; bf16/fp16 outputs keep ``addmm`` (as Inductor keeps them):
    ``mm`` would round the product to half precision before the bias is added.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.find_nodes(op="call_function", target=aten.addmm.default)):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            val = node.meta["val"]
            if val.device.type != "cpu" or val.dtype in (torch.bfloat16, torch.float16):
                continue  # a GPU's GEMM adds the bias in its epilogue; Inductor unfuses there itself
            bias, a, b = node.args[:3]
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (a, b))
                add = graph.call_function(aten.add.Tensor, (mm, bias))
            mm.meta.update(node.meta)  # same shape, dtype and strides as the addmm's output
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            graph.erase_node(node)

    def uuid(self) -> str:  # what Inductor's FX-graph cache would key on (AOT compiles skip it)
        return repr(self)

    def __repr__(self) -> str:  # part of both cache keys via _inductor_configs: bump on any change
        return "singlestep.UnfusedBias(v3)"


_UNFUSED_BIAS = _UnfusedBias()


def _foreach_decompositions() -> dict:
    """Trace ``torch._foreach_*`` ops as the loop of single-tensor ops they stand for.

    Optimizers in torch.optim's shape often update a whole group with one ``_foreach`` call
    (ours do, to save launches in eager steps). The scan HOP the chunk is built on does not take
    ops that return lists of tensors, and the per-tensor ops compute the same numbers, so the
    trace spells the loop out; Inductor fuses it again.
    """
    aten = torch.ops.aten
    table: dict = {}
    # Every registered foreach op (``dir(torch.ops.aten)`` lists only the ops looked up so far).
    for name in sorted(compat.foreach_op_names()):
        base_name = name[len("_foreach_") :]
        inplace = base_name.endswith("_")
        stem = base_name.rstrip("_")
        if stem == "norm":
            base = aten.linalg_vector_norm
        else:
            base = getattr(aten, stem + ("_" if inplace else ""), None)
            if base is None and inplace and hasattr(aten, stem):  # e.g. maximum: no in-place op
                base = _into_self(getattr(aten, stem))
        if base is None:
            continue
        packet = getattr(aten, name)
        for overload in packet.overloads():
            table[getattr(packet, overload)] = _per_tensor(base, inplace, stem)
    return table


def _into_self(op: Any) -> Callable[..., Tensor]:
    return lambda t, *args, **kwargs: t.copy_(op(t, *args, **kwargs))


def _per_tensor(base: Any, inplace: bool, stem: str) -> Callable[..., Any]:
    # Where the foreach schema takes a scalar positionally that the single-tensor op takes by
    # keyword: addcmul / addcdiv's ``value``, norm's ``dtype``.
    keyword = {"addcmul": "value", "addcdiv": "value", "norm": "dtype"}.get(stem)
    positional = {"addcmul": 3, "addcdiv": 3, "norm": 2}.get(stem)

    def loop(*args: Any, **kwargs: Any) -> Any:
        if keyword is not None and len(args) > positional:
            args, kwargs = args[:positional], {**kwargs, keyword: args[positional]}
        n = next(len(a) for a in args if isinstance(a, (list, tuple)))
        out = [base(*[a[i] if isinstance(a, (list, tuple)) else a for a in args], **kwargs) for i in range(n)]
        return None if inplace else out

    return loop


def _strip_profiler(gm: torch.fx.GraphModule) -> None:
    """Remove ``record_function`` enter/exit nodes (from ``Optimizer.step``'s profiling hook)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and "profiler" in str(node.target):
            for user in list(node.users):
                gm.graph.erase_node(user)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


class CompiledEngine(EagerEngine):
    """Steps run as compiled chunks; anything the chunk does not cover runs eagerly, identically.

    Per-sample mode compiles chunks of ``chunk_size`` steps of one sample each; mini-batch mode
    compiles single steps of the full batch shape (``batch_shape``: micro-batches x samples).
    The first chunks or batches of a shape run eagerly: the first warms up and creates the
    optimizer's lazy state, which the trace needs; then up to four chunks (one batch) are timed,
    for ``auto``. Short chunks and short last batches always run eagerly. If tracing
    or compiling fails, the engine warns once, saying why, and continues eagerly.

    Args:
        chunk_size: per-sample steps per compiled call (K).
        batch_shape: ``(grad_accum_steps, batch_size)`` of a full mini-batch step, or None.
        threads: intra-op threads for compiled per-sample chunks; None picks 1 for models under
            ``_ONE_THREAD_PARAMS`` parameters on the CPU (tiny tensors: one thread saves OpenMP's
            fork/join per kernel; measured 16 vs 22 us/step for 784->10 softmax regression) and
            torch's setting otherwise (an MLP of 235k parameters runs 1.6x faster on two).
            Mini-batch steps keep torch's setting; the chunks that run eagerly (warm-up, timed,
            short) follow the eager engine's own rule (``eager_threads``), so for models of
            30k-50k parameters auto times eager steps on torch's setting.
    """

    name = "compiled"

    def __init__(self, *args: Any, chunk_size: int = 64, batch_shape: tuple[int, int] | None = None,
                 threads: int | None = None, auto: bool = False, total_steps: int | None = None,
                 log: Callable[[str], None] | None = None, **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.auto = auto
        self.total_steps = total_steps
        self.log = log or (lambda text: None)
        self.steps_done = 0
        self.choice: str | None = None  # what auto picked, for the summary
        self._eager_step_seconds: dict[tuple[int, int, int], float] = {}
        self.chunk_size = chunk_size
        self.max_chunk = chunk_size * max(1, 4096 // chunk_size)
        self.batch_shape = batch_shape
        small = sum(p.numel() for p in self.params) < _ONE_THREAD_PARAMS
        self.threads = threads if threads is not None else (1 if small and self.train.device.type == "cpu" else None)
        self.cache_hit = False
        self.fallback_reason: str | None = None
        self.compile_seconds = 0.0
        self._fns: dict[tuple[int, int, int], Any] = {}
        self._warm: set[tuple[int, int, int]] = set()  # shapes whose first (warm-up) run is done
        self._verified: set[tuple[int, int, int]] = set()  # shapes whose compiled chunk matched eager

    # ------------------------------------------------------------------ public

    def run_samples(self, idx: Tensor) -> None:
        n, pos, k = idx.shape[0], 0, self.chunk_size
        shape = (k, 1, 1)
        fn = self._compiled(shape) if n >= k else None
        if fn is None and n >= k and shape not in self._fns and self.fallback_reason is None:
            # A shape's first chunk runs eagerly (it warms up, and creates the optimizer's lazy
            # state that the trace needs); the next ones are timed, for auto; then it compiles.
            if shape not in self._warm:
                self._warm.add(shape)
                EagerEngine.run_samples(self, idx[:k])
                self.steps_done += k
                pos = k
            if n - pos >= k:
                # Up to four chunks are timed and the fastest counts: the first chunks after the
                # warm-up still run 10-40% slower than the steady state, enough to tip auto.
                parts = [idx[s : s + k] for s in range(pos, pos + min(4, (n - pos) // k) * k, k)]
                self._timed_eager(shape, k, [functools.partial(EagerEngine.run_samples, self, part) for part in parts])
                pos += len(parts) * k
                fn = self._compiled(shape)
        if fn is not None and n - pos >= k:
            threads = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                while n - pos >= k and self.fallback_reason is None:
                    if shape in self._verified:
                        self._run(fn, idx[pos : pos + k].view(k, 1, 1))
                    else:
                        self._verify(shape, fn, idx[pos : pos + k])
                    pos += k
            finally:
                torch.set_num_threads(threads)
        if pos < n:
            super().run_samples(idx[pos:])
            self.steps_done += n - pos

    def run_batch(self, micro_batches: list[Tensor]) -> None:
        shape = (1, len(micro_batches), int(micro_batches[0].shape[0]))
        full = self.batch_shape is not None and shape[1:] == tuple(self.batch_shape)
        full = full and all(mb.shape[0] == shape[2] for mb in micro_batches)
        fn = self._compiled(shape) if full else None
        if fn is None:
            # As per-sample chunks: the first full batch warms up, the second is timed.
            if full and shape in self._warm and shape not in self._eager_step_seconds and self.fallback_reason is None:
                self._timed_eager(shape, 1, [lambda: EagerEngine.run_batch(self, micro_batches)])
            else:
                if full:
                    self._warm.add(shape)
                super().run_batch(micro_batches)
                self.steps_done += 1
            return
        if shape in self._verified:
            self._run(fn, torch.stack(micro_batches).unsqueeze(0))
        else:
            self._verify(shape, fn, micro_batches)

    def _verify(self, shape: tuple[int, int, int], fn: Any, samples: Tensor | list[Tensor]) -> None:
        """Run a shape's first compiled chunk, then the same steps eagerly from the same state, and
        keep the eager result. Unless parameters, optimizer state and the Python values the step
        changes all agree, fall back to eager for good, with a warning that names the difference.

        This catches what the support checks cannot know: a Python number in ``param_groups`` or
        on the optimizer that ``step()`` updates (a step count) is frozen into the traced graph.
        """
        k, micro, rows = shape
        opt, stats = self.optimizer, self.stats
        lr_rows = advance_schedule(self.scheduler, opt, k)
        keys = self._current_state_keys()
        self._flush()
        before = [t.clone() for t in self._flat(keys)]
        stats_before = [t.clone() for t in (stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped)]
        python_before = _python_state(opt)
        idx = samples.view(k, 1, 1) if isinstance(samples, Tensor) else torch.stack(samples).unsqueeze(0)
        with torch.no_grad():
            fn(idx, torch.tensor(lr_rows, dtype=torch.float32, device=self.train.device))
            compiled = [t.clone() for t in self._flat(keys)]
            python_compiled = _python_state(opt)
            torch._foreach_copy_(self._flat(keys), before)
            torch._foreach_copy_([stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped], stats_before)
        _restore_python_state(opt, python_before)
        if isinstance(samples, Tensor):
            self.run_samples_at(samples, lr_rows if self.scheduler is not None else None)
        else:
            self.run_batch_at(samples, lr_rows[0])
        self.steps_done += k
        problem = _python_changes(python_compiled, _python_state(opt))
        if problem:
            self._fallback(f"step() changes {problem[0]} in Python, which a compiled step would freeze at its "
                           "traced value; keep values that change per step in optimizer state tensors")  # fmt: skip
            return
        names = self._flat_names(keys)
        for what, c, e in zip(names, compiled, self._flat(keys)):
            if c.shape != e.shape or c.dtype != e.dtype:
                self._fallback(f"after its first chunk the compiled step's {what} is not the eager step's")
                return
            if not e.is_floating_point():
                bad = not torch.equal(c, e)
                diff = scale = 0.0
            else:
                diff = float((c.double() - e.double()).abs().max()) if e.numel() else 0.0
                scale = float(e.double().abs().max()) if e.numel() else 0.0
                bad = not diff <= _VERIFY_ATOL + _VERIFY_RTOL * scale  # a NaN difference is bad too
            if bad:
                self._fallback(f"after its first chunk of {k} steps the compiled step's {what} differs from eager "
                               f"steps' by {diff:.3g} (largest |value| {scale:.3g}); running eagerly")  # fmt: skip
                return
        self._verified.add(shape)

    def _timed_eager(self, shape: tuple[int, int, int], steps: int, runs: list[Callable[[], None]]) -> None:
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
        self._eager_step_seconds[shape] = best / steps

    # ------------------------------------------------------------------ build

    def _compiled(self, shape: tuple[int, int, int]) -> Any:
        """The compiled chunk for ``(K, A, B)``, built once the shape has a timed eager run."""
        if shape in self._fns or self.fallback_reason is not None:
            return self._fns.get(shape)
        if shape not in self._eager_step_seconds:
            return None
        start = time.perf_counter()
        try:
            if self.auto and self._gain(shape) <= _CACHED_LOAD_S:
                self._decline(shape, "even a cached package", 0.0)  # not worth tracing the step
            self._fns[shape] = self._build(shape)
        except _StayEager:
            self._fns[shape] = None
        except CompileUnsupported as exc:
            self._fallback(str(exc))
        except Exception as exc:  # a tracing/compiler failure is a reason to run eagerly, not to crash
            self._fallback(_explain(exc, self.optimizer))
        self.compile_seconds += time.perf_counter() - start
        return self._fns.get(shape)

    def _fallback(self, reason: str) -> None:
        self.fallback_reason = reason
        self._fns.clear()
        warnings.warn(f"engine 'compiled' falls back to eager: {reason}", stacklevel=3)

    def _check_supported(self, shape: tuple[int, int, int]) -> None:
        model, opt = self.model, self.optimizer
        if any(True for _ in model.buffers()):
            raise CompileUnsupported("the model has buffers (e.g. BatchNorm running stats), which the compiled step does not carry")
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if not isinstance(value, Tensor):
                        raise CompileUnsupported(
                            f"optimizer state '{key}' is a {type(value).__name__}, not a tensor; keep per-parameter "
                            "state in tensors (as torch.optim does) to compile the step"
                        )
        trainable = {id(p) for p in self.params}
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        if not in_opt <= trainable:
            raise CompileUnsupported("the optimizer holds tensors that are not trainable model parameters")
        # The traced step gives each parameter its own copy of its state and updates every tensor
        # in place: state shared between parameters (one step counter for all, say) would be
        # updated once per parameter instead of once per step.
        state_keys = self._current_state_keys()
        named = [(what, t) for what, t in zip(self._flat_names(state_keys), self._flat(state_keys))
                 if t.numel() and not t.is_sparse]  # fmt: skip
        spans = []
        for what, t in named:
            extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
            spans.append((str(t.device), t.data_ptr(), t.data_ptr() + extent * t.element_size(), what))
        spans.sort()
        for (dev_a, _, end_a, what_a), (dev_b, start_b, _, what_b) in zip(spans, spans[1:]):
            if dev_a == dev_b and start_b < end_a:
                raise CompileUnsupported(
                    f"{what_b} shares its memory with {what_a}; the compiled step keeps each parameter's "
                    "state in tensors of its own"
                )
        if shape[0] > 1:  # torch's scan refuses carries that share a storage, even disjoint slices of it
            owner: dict[tuple[str, int], str] = {}
            for what, t in named:
                key = (str(t.device), t.untyped_storage().data_ptr())
                if key in owner:
                    raise CompileUnsupported(
                        f"{what} and {owner[key]} are slices of one storage; per-sample chunks need each "
                        "parameter and state tensor in storage of its own (mini-batch steps allow it)"
                    )
                owner[key] = what

    def _current_state_keys(self) -> list[list[str]]:
        """Each trainable parameter's optimizer-state keys, sorted: the layout of ``_flat``."""
        return [sorted(self.optimizer.state.get(p, {})) for p in self.params]

    def _flat_names(self, state_keys: list[list[str]]) -> list[str]:
        """What each tensor of ``_flat(state_keys)`` is, for messages."""
        names = [f"parameter {i}" for i in range(len(self.params))]
        states = [f"optimizer state '{key}' of parameter {i}" for i, keys in enumerate(state_keys) for key in keys]
        return names + states

    def _trace_step(self, micro: int, rows: int) -> tuple[torch.fx.GraphModule, list[Tensor], list[list[str]]]:
        """Trace one optimizer step into a pure graph ``(flat, (x, y, lr)) -> (flat', stats)``.

        ``flat`` is the parameters followed by every optimizer state tensor, in a fixed order;
        ``x`` and ``y`` hold ``micro`` micro-batches of ``rows`` samples, whose gradients are
        summed with weight ``1 / micro`` (the eager engine's rule for equal micro-batches).
        """
        from torch.func import functional_call, grad_and_value

        model, opt, loss_fn, split = self.model, self.optimizer, self.loss_fn, self.train
        params = self.params
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        groups = opt.param_groups
        pos_of = {id(p): i for i, p in enumerate(params)}
        group_members = [[pos_of[id(p)] for p in g["params"]] for g in groups]
        state_keys = self._current_state_keys()
        flat_names = self._flat_names(state_keys)
        n_params = len(params)

        def loss_of(values: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(model, dict(zip(names, values)), (x,)), y)

        grad_value = grad_and_value(loss_of)

        rule = self.rule

        def step(flat: list[Tensor], xs: tuple[Tensor, Tensor, Tensor]):
            ps = flat[:n_params]
            it = iter(flat[n_params:])
            ss = [{k: next(it) for k in keys} for keys in state_keys]
            x, y, lr = xs  # x [micro, rows, ...], y [micro, rows, ...], lr [n_groups]
            grads, loss = grad_value(tuple(ps), x[0], y[0])
            grads = list(grads)
            if micro > 1:
                for a in range(1, micro):
                    more, more_loss = grad_value(tuple(ps), x[a], y[a])
                    grads = [g + m for g, m in zip(grads, more)]
                    loss = loss + more_loss
                grads = [g * (1.0 / micro) for g in grads]
                loss = loss * (1.0 / micro)
            ops = _TracedOps(opt, group_members, ps, ss, state_keys, flat_names, lr)
            take_step(rule, ops, grads, loss.detach())
            return ops.out, ops.stats

        flat = self._flat(state_keys)
        x0, y0 = split.get(torch.zeros(micro * rows, dtype=torch.long, device=split.device))
        x0, y0 = x0.reshape(micro, rows, *x0.shape[1:]), y0.reshape(micro, rows, *y0.shape[1:])
        lr0 = torch.zeros(len(groups), device=split.device)
        saved = _python_state(opt)
        try:
            with torch.no_grad():
                table = {**_foreach_decompositions(), **_tiny_matmul_decompositions()}
                graph = compat.make_fx(step, table)(flat, (x0, y0, lr0))
        finally:  # tracing ran step() once: what it changed in Python must not count as a step
            _restore_python_state(opt, saved)
        _strip_profiler(graph)
        return graph, flat, state_keys

    def _flat(self, state_keys: list[list[str]]) -> list[Tensor]:
        """Parameters then optimizer state, read afresh (an eager step may replace state tensors)."""
        state = self.optimizer.state
        return [p.detach() for p in self.params] + [state[p][k] for p, keys in zip(self.params, state_keys) for k in keys]

    def _cache_key(self, graph: torch.fx.GraphModule, inputs: list[Any], shape: tuple[int, int, int]) -> str:
        """A hash of everything the compiled chunk depends on: graph code and input metas.

        The graph holds no tensor constants (a step that reads any runs eagerly, see
        ``_compile_or_find``), so its code is all of it.
        """
        h = hashlib.sha256()
        h.update(f"{_FORMAT}|{torch.__version__}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}".encode())
        h.update(f"|{shape}|{self.train.signature()}|{self._inductor_configs(shape)}|".encode())
        h.update(graph.code.encode())
        for t in compat.tree_leaves(inputs):
            h.update(f"{tuple(t.shape)}:{t.dtype}:{t.device.type}|".encode())
        return h.hexdigest()[:32]

    def _build(self, shape: tuple[int, int, int]) -> Any:
        """Compile (or load from the disk cache) the chunk of ``K`` steps of ``A x B`` samples.

        A cached package is found in two ways. Its file name is a hash of the traced graph (what
        the package is compiled from), and a *recipe* file, named by a hash of everything the
        trace is built from (code files, model and optimizer structure and settings, shapes),
        names the package. A run whose recipe is known loads the package without tracing, and so
        without importing the compiler (~1 s of start-up); any other run traces, and finds the
        package by the graph's hash when only the recipe changed (a reformatted file, say).
        """
        self._check_supported(shape)
        k, micro, rows = shape
        state_keys = self._current_state_keys()
        self._state_keys = state_keys
        split = self.train
        data = split.tensors()
        n_groups = len(self.optimizer.param_groups)
        idx0 = torch.zeros(k, micro, rows, dtype=torch.long, device=split.device)
        lrs0 = torch.zeros(k, n_groups, device=split.device)
        sums0 = torch.zeros(4, device=split.device)
        example = (self._flat(state_keys), data, idx0, lrs0, sums0)
        recipe = cache_dir() / f"recipe-{self._recipe_key(shape, example)}.txt"
        path = _recipe_target(recipe)
        if path is not None:
            self.cache_hit = True
            if self.auto:
                self._decide(shape, None, True)
        else:
            if self.auto and self._gain(shape) <= _COMPILE_BASE_S:
                # Not worth tracing the step (~1-2 s with the compiler's imports) to learn that.
                self._decide(shape, None, False)
            path = self._compile_or_find(shape, example)
            _write_atomic(recipe, path.name)

        runner = compat.load_package(str(path))
        flat0, data0, *rest0 = example
        call = compat.flat_call(runner, example, [*flat0, *data0.values(), *rest0],
                                lambda inputs: _flat_to_nested(inputs, example))  # fmt: skip
        stats = self.stats
        data_list = list(data.values())

        def run(idx: Tensor, lrs: Tensor) -> None:
            flat = self._flat(state_keys)
            sums = torch.stack([stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped])
            (new_sums,) = call([*flat, *data_list, idx, lrs, sums])  # updates flat in place
            torch._foreach_copy_([stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped], new_sums.unbind())

        return run

    def _compile_or_find(self, shape: tuple[int, int, int], example: tuple) -> Path:
        """Trace the chunk; return its package, compiling it unless the graph's hash is cached."""
        k, micro, rows = shape
        graph, _, _ = self._trace_step(micro, rows)
        held = [*graph.named_parameters(), *graph.named_buffers(), *vars(graph).items()]
        if any(isinstance(value, Tensor) for _, value in held):
            # A chunk would keep their values from compile time (and a cached package from an
            # earlier run): a frozen layer loaded from another checkpoint, or an attribute the
            # optimizer updates, would be stale without any sign.
            raise CompileUnsupported(
                "the step reads tensors that are neither trainable parameters nor optimizer state (a frozen "
                "parameter, a tensor attribute of the model or optimizer, or a tensor made in step()), which "
                "a compiled step would fix at their compile-time values; use Python numbers or optimizer state"
            )
        split = self.train

        class Chunk(torch.nn.Module):
            """K steps: gather all their samples at once, scan the step over them, fold statistics.

            Parameters and optimizer state are updated in place (the package writes into the
            caller's tensors; nothing is copied back after the call). A single step (K = 1, a
            mini-batch) is not wrapped in a loop, so its update writes straight into them: for the
            tiny LM this cut the compile from ~60 to ~42-48 s and the peak RSS with a cached package
            by 10-60 MB.
            """

            def forward(self, flat: list[Tensor], data: dict[str, Tensor], idx: Tensor, lrs: Tensor,
                        sums: Tensor):  # fmt: skip
                x, y = split.gather(data, idx.reshape(-1))  # [K*A*B, ...]
                x = x.reshape(k, micro, rows, *x.shape[1:])
                y = y.reshape(k, micro, rows, *y.shape[1:])
                if k == 1:  # one step (a mini-batch): no loop, so the update can write in place
                    new_flat, out = graph(flat, (x[0], y[0], lrs[0]))
                    out = out.unsqueeze(0)
                else:
                    new_flat, out = compat.scan(graph, flat, (x, y, lrs))  # out [K, 3]: loss, norm, finite
                for old, new in zip(flat, new_flat):  # parameters and state are updated in place
                    old.copy_(new)
                ok = out[:, 2]
                good = out[:, :2] * ok[:, None]
                # sums: loss_sum, norm_sum, norm_max, skipped (the engine's window statistics)
                return torch.stack([sums[0] + good[:, 0].sum(), sums[1] + good[:, 1].sum(),
                                    torch.maximum(sums[2], good[:, 1].max()), sums[3] + (k - ok.sum())])  # fmt: skip

        path = cache_dir() / f"chunk-{self._cache_key(graph, list(example), shape)}.pt2"
        self.cache_hit = path.exists()
        if self.auto:
            self._decide(shape, graph, self.cache_hit)
        if not self.cache_hit:
            what = f"{k} per-sample steps" if (micro, rows) == (1, 1) else f"one step of {micro} x {rows} samples"
            self.log(f"engine {self.name}: compiling {what} per call (once; cached in {cache_dir()})")
            started = time.perf_counter()
            with torch.no_grad():
                exported = torch.export.export(Chunk(), example, strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
            # Only where the user has not set Inductor's ISA check (TORCHINDUCTOR_VEC_ISA_OK).
            isa_record = _vec_isa_record() if self.train.device.type == "cpu" and compat.vec_isa_check_pending() else None
            known_isas = isa_record is not None and isa_record.exists()
            compat.aoti_compile(exported, str(tmp), self._inductor_configs(shape), known_isas)
            os.replace(tmp, path)  # atomic: a concurrent run sees a whole file or none
            if isa_record is not None and not known_isas and compat.vec_isas_all_passed():
                _write_atomic(isa_record, "ok")
            self.log(f"engine {self.name}: compiled in {time.perf_counter() - started:.1f}s")
        return path

    def _chunk_threads(self, shape: tuple[int, int, int]) -> int | None:
        """The intra-op threads the chunk of ``shape`` runs with (None: torch's setting)."""
        return self.threads if shape[1:] == (1, 1) else None

    def _inductor_configs(self, shape: tuple[int, int, int]) -> dict[str, Any]:
        """Compiler settings for the chunk of ``shape`` (part of both cache keys).

        Measured on the 2-core CPU, with tcmalloc:
        - a small expression read by several loops is computed once instead of inside each
          (``realize_opcount_threshold``); otherwise e.g. Adam's float64 bias corrections are
          recomputed per element: per-sample Adam 27.8 -> 18.1 us/step, tiny LM batch-12 step
          26.6 -> 24.9 ms, others unchanged.
        - a per-sample chunk that runs on one thread is compiled for one thread: Inductor then
          writes plain loops instead of OpenMP regions, whose barriers each make a futex system
          call even in a team of one (~15 per step); SGD 8.5 -> 6.7 us/step.
        """
        threads = self._chunk_threads(shape)
        return {"realize_opcount_threshold": 4, "post_grad_custom_post_pass": _UNFUSED_BIAS,
                **({"cpp.threads": threads} if threads else {})}  # fmt: skip

    def _recipe_key(self, shape: tuple[int, int, int], example: tuple) -> str:
        """A hash of what the traced step is built from, computed without tracing it.

        Code: every source file of this package, of the classes involved (model modules,
        optimizer, split, loss) and of any loaded module outside the Python and site-packages
        trees (the user's own code), by size and modification time. Objects: the model's modules
        and their plain attributes, parameter shapes, the optimizer's class, plain attributes and
        group settings other than lr (an input of the chunk), clipping, input shapes, torch
        build and settings. Anything unaccounted for only makes a key differ, which costs a trace.
        """
        h = hashlib.sha256()
        h.update(f"{_FORMAT}|{torch.__version__}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}".encode())
        h.update(f"|{shape}|{self.train.signature()}|{self._inductor_configs(shape)}|{_qualname(type(self.train))}|{_qualname(self.loss_fn)}".encode())
        h.update(f"|{torch.get_default_dtype()}|{torch.are_deterministic_algorithms_enabled()}".encode())
        h.update(f"|{torch.get_float32_matmul_precision()}|{self.clip_grad_norm}|{self.clip_grad_value}|{self.check_finite}".encode())
        h.update(f"|{[_qualname(t) for t in self.rule.grad_transforms]}".encode())
        for name, m in self.model.named_modules():
            h.update(f"|{name}:{_qualname(type(m))}:{m.training}:{_plain_attrs(m)}".encode())
        for name, p in self.model.named_parameters():
            h.update(f"|{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}".encode())
        opt = self.optimizer
        h.update(f"|{_qualname(type(opt))}:{_plain_attrs(opt)}".encode())
        pos = {id(p): i for i, p in enumerate(self.params)}
        for group in opt.param_groups:
            settings = sorted((key, repr(v)) for key, v in group.items() if key not in ("params", "lr", "initial_lr"))
            h.update(f"|{[pos.get(id(p)) for p in group['params']]}:{settings}".encode())
        for t in compat.tree_leaves(example):
            h.update(f"{tuple(t.shape)}:{t.dtype}:{t.device.type}|".encode())
        classes = [type(m) for m in self.model.modules()] + [type(opt), type(self.train)]
        for path in sorted(_code_files(classes, [self.loss_fn, *self.rule.grad_transforms])):
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(f"|{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    # ------------------------------------------------------------------ run

    def _lr_table(self, k: int) -> Tensor:
        """The lr of each group for the next ``k`` steps, advancing the scheduler by ``k``."""
        rows = advance_schedule(self.scheduler, self.optimizer, k)
        return torch.tensor(rows, dtype=torch.float32, device=self.train.device)

    def _run(self, fn: Any, idx: Tensor) -> None:
        """Run one compiled chunk over ``idx [K, A, B]``: K optimizer steps."""
        k = idx.shape[0]
        lrs = self._lr_table(k)
        with torch.no_grad():
            fn(idx, lrs)
        self.stats.steps += k
        self.steps_done += k

    def _decide(self, shape: tuple[int, int, int], graph: torch.fx.GraphModule | None, cached: bool) -> None:
        """``auto``: compile only when it pays for itself over the steps left; log the choice.

        The eager cost is measured (the fastest of up to four eager chunks after the warm-up,
        those that fit in the call that times them); the compiled
        speed-up and the compile time are estimates from measurements on a 2-core CPU
        (docs/performance.md): per-sample chunks run ~8x faster than eager steps for small
        models (one thread), ~2.5x for larger ones (the tiny LM), mini-batch steps ~1.15x; a cold
        compile costs ~8.5 s plus ~20 ms per graph node, a cached package ~0.2 s (a trace, or a
        recipe and a load).
        """
        nodes = len(graph.graph.nodes) if graph is not None else 0  # None: not traced
        cost = _CACHED_LOAD_S if cached else _COMPILE_BASE_S + _COMPILE_PER_NODE_S * nodes
        if cached:
            how = "a cached package"
        elif graph is None:
            how = f"compiling (no cached package; at least ~{cost:.0f}s)"
        else:
            how = f"compiling (~{cost:.0f}s, {nodes} graph nodes)"
        gain = self._gain(shape)
        if gain <= cost:
            self._decline(shape, how, gain)
        self.choice = "compiled"
        self.log(f"engine auto: compiled, using {how}: {self._situation(shape)}, ~{gain - cost:.0f}s saved")

    def _gain(self, shape: tuple[int, int, int]) -> float:
        """Seconds the compiled engine would save over the steps left, before its own cost."""
        eager = self._eager_step_seconds.get(shape, 0.0)
        if shape[1:] != (1, 1):
            speedup = _MINIBATCH_SPEEDUP
        else:
            speedup = _PER_SAMPLE_SPEEDUP if self._chunk_threads(shape) == 1 else _PER_SAMPLE_SPEEDUP_LARGE
        return max(0, (self.total_steps or 0) - self.steps_done) * eager * (1 - 1 / speedup)

    def _situation(self, shape: tuple[int, int, int]) -> str:
        eager = self._eager_step_seconds.get(shape, 0.0)
        left = max(0, (self.total_steps or 0) - self.steps_done)
        return f"eager {eager * 1e6:,.0f} us/step, {left:,} steps left"

    def _decline(self, shape: tuple[int, int, int], how: str, gain: float) -> None:
        if self.choice is None:
            self.choice = "eager"
        self.log(f"engine auto: eager, {how} would not pay off: {self._situation(shape)}, ~{gain:.1f}s to gain")
        raise _StayEager

    @property
    def label(self) -> str:
        """The engine as the summary reports it."""
        if self.auto:
            return f"auto ({self.choice or 'eager'})"
        return "compiled" if self.fallback_reason is None else "compiled (fell back to eager)"


def _vec_isa_record() -> Path | None:
    """A file whose existence says every claimed ISA passed Inductor's build-and-load check here.

    Inductor checks each vector ISA the CPU claims, once per process, by compiling a probe and
    loading it in a fresh Python process: ~1.5 s of every cold compile on the 2-core CPU. The
    outcome depends on the machine, the compiler and torch, which name the record; once it says
    all passed, later compiles tell Inductor so (``cpp.vec_isa_ok``) instead of checking again.
    Where any failed, no record is written and Inductor keeps checking.
    """
    import shutil

    claimed = compat.claimed_vec_isas()
    name = compat.cpp_compiler() if claimed else None
    if name is None:
        return None
    compiler = shutil.which(name) or name
    try:
        stamp = os.stat(compiler).st_mtime_ns
    except OSError:
        return None
    h = hashlib.sha256(f"{torch.__version__}|{compiler}:{stamp}|{[str(i) for i in claimed]}".encode())
    return cache_dir() / f"vec-isa-{h.hexdigest()[:32]}.ok"


def _explain(exc: Exception, optimizer: torch.optim.Optimizer) -> str:
    """A one-line reason for a failed trace or compile, in the user's terms where we can: the
    line of the optimizer's (or model's) source that read a value on the host, and what to do."""
    text = str(exc)
    if "_local_scalar_dense" in text or "data-dependent" in text:
        where = _user_line(exc)
        cls = type(optimizer)
        advice = "write optimizer maths as plain tensor ops (docs/optimizers.md)"
        if cls.__module__.startswith("torch.optim"):
            from singlestep.registry import OPTIMIZERS

            ours = cls.__name__.lower()
            if ours in OPTIMIZERS.names():
                advice = f"singlestep's own '{ours}' (optimizer.name: {ours}) has the same numbers and compiles"
            elif "capturable" in inspect.signature(cls).parameters:
                advice = "try capturable: true, which keeps its step count in a tensor"
        return (f"the step reads a tensor's value on the host (.item(), float(t), or an if on a tensor){where}, "
                f"so it cannot be traced; {advice}")  # fmt: skip
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:3])[:400]}"


def _user_line(exc: Exception) -> str:
    """`` at FILE:LINE (`code`)``: the innermost frame of the traceback outside torch's internals
    and this engine, where the step's code read a value; empty when there is none."""
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        f = frame.filename
        inside_torch = f.startswith(torch_dir) and not f.startswith(os.path.join(torch_dir, "optim"))
        if not inside_torch and not f.startswith(here) and frame.line is not None:
            return f" at {f}:{frame.lineno} (`{frame.line.strip()}`)"
    return ""


def _flat_to_nested(inputs: list[Tensor], example: tuple) -> tuple:
    """Rebuild ``(flat, data, *rest)`` from the flat list (the slow, general path)."""
    flat, data, *rest = example
    n, m = len(flat), len(data)
    return (inputs[:n], dict(zip(data.keys(), inputs[n : n + m])), *inputs[n + m :])


def _recipe_target(recipe: Path) -> Path | None:
    """The package a recipe file names, if both exist."""
    try:
        name = recipe.read_text().strip()
    except OSError:
        return None
    path = recipe.parent / name
    return path if name.startswith("chunk-") and name.endswith(".pt2") and path.exists() else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _plain_attrs(obj: Any) -> list[tuple[str, Any]]:
    """Public attributes holding plain values (numbers, strings, flags): settings code may read."""
    plain = (bool, int, float, str, type(None))
    return sorted((k, v) for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, plain))


def _code_files(classes: list[type], functions: list[Any]) -> set[str]:
    """Source files the traced step may run: see ``CompiledEngine._recipe_key``."""
    import sysconfig

    files = {str(f) for f in Path(__file__).resolve().parents[1].rglob("*.py")}
    for obj in [*classes, *functions]:
        for cls in getattr(obj, "__mro__", (obj,)):
            module = sys.modules.get(getattr(cls, "__module__", "") or "")
            if module is not None and getattr(module, "__file__", None):
                files.add(module.__file__)
    paths = sysconfig.get_paths()
    trees = tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and not os.path.realpath(f).startswith(trees):
            files.add(f)
    return files


class _StateView(dict):
    """``optimizer.state`` during tracing: keyed by the traced copies of the parameters."""

    def __getitem__(self, p: Tensor) -> dict:
        return super().__getitem__(id(p))

    def get(self, p: Tensor, default: Any = None) -> Any:
        return super().get(id(p), default)

    def __contains__(self, p: object) -> bool:
        return super().__contains__(id(p))


class _TracedOps:
    """The step's stages as functional maths, for tracing (see ``step.py``).

    ``update`` calls the user's optimizer as-is on copies of the parameters and state: its in-place
    maths becomes pure graph ops. A non-finite step is masked with ``torch.where`` so parameters
    and state keep their values, without a host sync. ``out`` and ``stats`` are the step's outputs.
    """

    def __init__(self, opt, group_members, ps, ss, state_keys, flat_names, lr):  # noqa: ANN001
        self.opt, self.group_members, self.ps, self.ss = opt, group_members, ps, ss
        self.state_keys, self.flat_names, self.lr = state_keys, flat_names, lr
        self.out: list[Tensor] | None = None
        self.stats: Tensor | None = None

    def norm(self, grads: list[Tensor]) -> Tensor:
        return global_norm(grads)

    def finite(self, loss: Tensor, norm: Tensor) -> Tensor:
        return torch.isfinite(norm) & torch.isfinite(loss)

    def record(self, loss: Tensor, norm: Tensor, ok: Any) -> None:
        ok = ok if isinstance(ok, Tensor) else norm.new_ones((), dtype=torch.bool)
        self.stats = torch.stack([loss.float(), norm.detach().float(), ok.float()])

    def clamp(self, grads: list[Tensor], value: float) -> list[Tensor]:
        return [g.clamp(-value, value) for g in grads]

    def scale_to_norm(self, grads: list[Tensor], max_norm: float, norm: Tensor) -> list[Tensor]:
        coef = clip_coef(max_norm, norm)
        return [g * coef for g in grads]

    def update(self, grads: list[Tensor], ok: Any) -> None:
        opt, groups, ps, ss, keys = self.opt, self.opt.param_groups, self.ps, self.ss, self.state_keys
        new_p = [p.clone() for p in ps]
        new_s = [{k: v.clone() for k, v in d.items()} for d in ss]
        saved = ([g["params"] for g in groups], [g["lr"] for g in groups], opt.state)
        try:
            for gi, group in enumerate(groups):
                group["params"] = [new_p[i] for i in self.group_members[gi]]
                group["lr"] = self.lr[gi]
            opt.state = _StateView({id(p): d for p, d in zip(new_p, new_s)})
            for p, g in zip(new_p, grads):
                p.grad = g
            opt.step()
        finally:
            for group, group_params, group_lr in zip(groups, saved[0], saved[1]):
                group["params"], group["lr"] = group_params, group_lr
            opt.state = saved[2]
        for p in new_p:
            p.grad = None
        # The chunk writes these back in place: a tensor the optimizer rebinds to another
        # shape or dtype (a growing history, say) cannot be.
        olds = ps + [d[k] for d, ks in zip(ss, keys) for k in ks]
        news = new_p + [d[k] for d, ks in zip(new_s, keys) for k in ks]
        for what, old, new in zip(self.flat_names, olds, news):
            if new.shape != old.shape or new.dtype != old.dtype:
                raise CompileUnsupported(
                    f"the step turns {what} from {old.dtype} {tuple(old.shape)} into {new.dtype} "
                    f"{tuple(new.shape)}; keep each state tensor's dtype and shape to compile the step"
                )
        if isinstance(ok, Tensor):  # a non-finite step leaves parameters and state as they were
            news = [torch.where(ok, new, old) for new, old in zip(news, olds)]
        self.out = news


_PLAIN = (bool, int, float, str, type(None), tuple)


def _python_state(opt: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The plain Python values of the optimizer's groups and attributes, which a step may change."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr") and isinstance(v, _PLAIN)} for g in opt.param_groups]
    attrs = {k: v for k, v in vars(opt).items() if isinstance(v, _PLAIN)}
    return groups, attrs


def _restore_python_state(opt: torch.optim.Optimizer, saved: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    for group, values in zip(opt.param_groups, saved[0]):
        group.update(values)
    vars(opt).update(saved[1])


def _python_changes(before: tuple, after: tuple) -> list[str]:
    """Descriptions of the plain Python values that differ between two ``_python_state`` readings."""
    changes = []
    for gi, (b, a) in enumerate(zip(before[0], after[0])):
        for k in sorted(set(b) | set(a)):
            if b.get(k) != a.get(k):
                changes.append(f"param_groups[{gi}]['{k}'] ({b.get(k)!r} -> {a.get(k)!r})")
    for k in sorted(set(before[1]) | set(after[1])):
        if before[1].get(k) != after[1].get(k):
            changes.append(f"optimizer.{k} ({before[1].get(k)!r} -> {after[1].get(k)!r})")
    return changes
