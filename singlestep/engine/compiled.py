"""The compiled engine: K per-sample steps in one call of one compiled graph.

How it works, and why:

1. One step (forward, ``torch.func`` grads, finite check, clipping, ``optimizer.step()``) is traced
   once with ``make_fx`` into a pure graph of tensor ops. The optimizer is the user's own object,
   called as-is: during tracing its parameter and state references are pointed at fresh copies, so
   any optimizer in ``torch.optim`` shape (tensor state, no ``.item()``) becomes functional maths.
   Python in ``step()`` runs only at trace time; profiler hooks are dropped from the graph.
2. K of those steps run inside ``torch._higher_order_ops.scan``, exported and compiled ahead of
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

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from singlestep.engine.eager import EagerEngine

__all__ = ["CompiledEngine", "CompileUnsupported", "cache_dir"]


class CompileUnsupported(Exception):
    """The model or optimizer cannot run in the compiled engine (the message says why)."""


def cache_dir() -> Path:
    """Where compiled chunks are kept between runs (``$SINGLESTEP_CACHE/compiled``)."""
    return Path(os.environ.get("SINGLESTEP_CACHE", Path.home() / ".cache" / "singlestep")) / "compiled"


# Bump when the chunk's structure changes, so stale cached packages are never loaded.
_FORMAT = "singlestep-chunk-v1"


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
    """Per-sample steps in compiled chunks of ``chunk_size``; anything else falls back to eager.

    Steps that do not fill a whole chunk (the end of an epoch or of a log window) run eagerly, with
    identical semantics. If tracing or compiling fails, the engine warns once, saying why, and
    continues eagerly.

    Args:
        chunk_size: per-sample steps per compiled call (K).
        threads: intra-op threads while running chunks (1 is fastest for tiny per-sample tensors).
    """

    name = "compiled"

    def __init__(self, *args: Any, chunk_size: int = 64, threads: int | None = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        self.max_chunk = chunk_size * max(1, 4096 // chunk_size)
        self.cache_hit = False
        self.threads = threads
        self._fn = None
        self.fallback_reason: str | None = None
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ public

    def run_samples(self, idx: Tensor) -> None:
        n, pos, k = idx.shape[0], 0, self.chunk_size
        if self._fn is None and self.fallback_reason is None and n > k:
            # One eager step first: it creates the optimizer's lazy state, which the trace needs.
            super().run_samples(idx[:1])
            pos = 1
            self._try_build()
        if self._fn is not None:
            threads = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                while n - pos >= k:
                    self._run_chunk(idx[pos : pos + k])
                    pos += k
            finally:
                torch.set_num_threads(threads)
        if pos < n:
            super().run_samples(idx[pos:])

    # ------------------------------------------------------------------ build

    def _try_build(self) -> None:
        import time

        start = time.perf_counter()
        try:
            self._build()
        except CompileUnsupported as exc:
            self._fallback(str(exc))
        except Exception as exc:  # a tracing/compiler failure is a reason to run eagerly, not to crash
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            self._fallback(f"{type(exc).__name__}: {' '.join(lines[:3])[:400]}")
        self.compile_seconds += time.perf_counter() - start

    def _fallback(self, reason: str) -> None:
        self._fn = None
        self.fallback_reason = reason
        warnings.warn(f"engine 'compiled' falls back to eager: {reason}", stacklevel=2)

    def _check_supported(self) -> None:
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

    def _trace_step(self) -> tuple[torch.fx.GraphModule, list[Tensor]]:
        """Trace one full per-sample step into a pure graph ``(flat, (x, y, lr)) -> (flat', stats)``.

        ``flat`` is the parameters followed by every optimizer state tensor, in a fixed order.
        """
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.func import functional_call, grad_and_value

        model, opt, loss_fn, split = self.model, self.optimizer, self.loss_fn, self.train
        params = self.params
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        groups = opt.param_groups
        pos_of = {id(p): i for i, p in enumerate(params)}
        group_members = [[pos_of[id(p)] for p in g["params"]] for g in groups]
        state_keys = [sorted(opt.state.get(p, {})) for p in params]
        n_params = len(params)
        clip_norm, clip_value, check_finite = self.clip_grad_norm, self.clip_grad_value, self.check_finite

        def loss_of(values: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(model, dict(zip(names, values)), (x,)), y)

        grad_value = grad_and_value(loss_of)

        def global_norm(tensors: list[Tensor]) -> Tensor:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))

        def step(flat: list[Tensor], xs: tuple[Tensor, Tensor, Tensor]):
            ps = flat[:n_params]
            it = iter(flat[n_params:])
            ss = [{k: next(it) for k in keys} for keys in state_keys]
            x, y, lr = xs  # x [1, ...], y [1, ...], lr [n_groups]
            grads, loss = grad_value(tuple(ps), x, y)
            grads = list(grads)
            norm = global_norm(grads)  # pre-clip, as logged
            finite = torch.isfinite(norm) & torch.isfinite(loss)
            if clip_value is not None:
                grads = [g.clamp(-clip_value, clip_value) for g in grads]
            if clip_norm is not None:
                clipped = global_norm(grads) if clip_value is not None else norm
                coef = torch.clamp(clip_norm / (clipped + 1e-6), max=1.0)
                grads = [g * coef for g in grads]
            # The user's optimizer, called as-is on copies: its in-place maths becomes pure graph ops.
            new_p = [p.clone() for p in ps]
            new_s = [{k: v.clone() for k, v in d.items()} for d in ss]
            saved = ([g["params"] for g in groups], [g["lr"] for g in groups], opt.state)
            try:
                for gi, group in enumerate(groups):
                    group["params"] = [new_p[i] for i in group_members[gi]]
                    group["lr"] = lr[gi]
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
            if check_finite:  # a non-finite step leaves parameters and state as they were
                out_p = [torch.where(finite, a, b) for a, b in zip(new_p, ps)]
                out_s = [torch.where(finite, d2[k], d1[k]) for d1, d2, keys in zip(ss, new_s, state_keys) for k in keys]
            else:
                out_p = new_p
                out_s = [d[k] for d, keys in zip(new_s, state_keys) for k in keys]
            stats = torch.stack([loss.detach().float(), norm.detach().float(), finite.float()])
            return out_p + out_s, stats

        flat = [p.detach() for p in params] + [opt.state[p][k] for p, keys in zip(params, state_keys) for k in keys]
        x0, y0 = split.get(torch.zeros(1, dtype=torch.long, device=split.device))
        lr0 = torch.zeros(len(groups), device=split.device)
        with torch.no_grad():
            graph = make_fx(step)(flat, (x0, y0, lr0))
        _strip_profiler(graph)
        return graph, flat

    def _cache_key(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> str:
        """A hash of everything the compiled chunk depends on: graph code, constants, input metas."""
        h = hashlib.sha256()
        h.update(f"{_FORMAT}|{torch.__version__}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}".encode())
        h.update(f"|{self.chunk_size}|{self.train.signature()}|threads={self.threads}|".encode())
        h.update(graph.code.encode())
        for name, value in sorted(graph.named_buffers()) + sorted(
            (n, v) for n, v in vars(graph).items() if isinstance(v, Tensor)
        ):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for t in torch.utils._pytree.tree_leaves(inputs):
            h.update(f"{tuple(t.shape)}:{t.dtype}:{t.device.type}|".encode())
        return h.hexdigest()[:32]

    def _build(self) -> None:
        from torch._higher_order_ops.scan import scan

        self._check_supported()
        graph, flat = self._trace_step()
        split, k = self.train, self.chunk_size
        data = split.tensors()
        n_groups = len(self.optimizer.param_groups)

        class Chunk(torch.nn.Module):
            """K steps: gather the K samples, then scan the step over them."""

            def forward(self, flat: list[Tensor], data: dict[str, Tensor], idx: Tensor, lrs: Tensor):
                x, y = split.gather(data, idx)  # [K, ...]
                return scan(graph, flat, (x.unsqueeze(1), y.unsqueeze(1), lrs))  # flat', stats [K, 3]

        idx0 = torch.zeros(k, dtype=torch.long, device=split.device)
        lrs0 = torch.zeros(k, n_groups, device=split.device)
        example = (flat, data, idx0, lrs0)
        path = cache_dir() / f"chunk-{self._cache_key(graph, list(example))}.pt2"
        self.cache_hit = path.exists()
        if not self.cache_hit:
            with torch.no_grad():
                exported = torch.export.export(Chunk(), example, strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation chatter inside torch
                torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
            os.replace(tmp, path)  # atomic: a concurrent run sees a whole file or none
        runner = _load_package(path)
        stats = self.stats

        def run(idx: Tensor, lrs: Tensor) -> None:
            new_flat, out = runner(flat, data, idx, lrs)
            torch._foreach_copy_(flat, new_flat)
            ok = out[:, 2]
            stats.loss_sum += (out[:, 0] * ok).sum()
            good_norms = out[:, 1] * ok
            stats.norm_sum += good_norms.sum()
            torch.maximum(stats.norm_max, good_norms.max(), out=stats.norm_max)
            stats.skipped += ok.numel() - ok.sum()

        self._fn = run

    # ------------------------------------------------------------------ run

    def _lr_table(self, k: int) -> Tensor:
        """The lr of each group for the next ``k`` steps, advancing the scheduler by ``k``."""
        groups = self.optimizer.param_groups
        sched = self.scheduler
        device = self.train.device
        if sched is None:
            rows = [[float(g["lr"]) for g in groups]] * k
        elif isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            start = sched.last_epoch
            rows = [[base * fn(start + j) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)] for j in range(k)]
            sched.last_epoch = start + k
            new = [base * fn(start + k) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, lr in zip(groups, new):
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            sched._last_lr = new
        else:  # any other scheduler: step it for real, reading the lr each step used
            rows = []
            for _ in range(k):
                rows.append([float(g["lr"]) for g in groups])
                sched.step()
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def _run_chunk(self, idx: Tensor) -> None:
        lrs = self._lr_table(idx.shape[0])
        with torch.no_grad():
            self._fn(idx, lrs)
        self.stats.steps += idx.shape[0]


def _load_package(path: Path) -> Any:
    """``aoti_load_package``, minus a 2-second cost on every process start.

    Loading checks the package's CPU vector ISA against this machine's, and torch finds the
    machine's by compiling probe libraries and dlopen-ing each in a fresh Python subprocess. The
    answer only depends on the CPU and the torch build, so it is remembered next to the packages
    (keyed by both) and handed to torch for the duration of the load.
    """
    import torch._inductor.cpu_vec_isa as vec_isa

    record = path.parent / f"isa-{torch.__version__}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}.txt"
    known = {str(isa): isa for isa in vec_isa.supported_vec_isa_list}
    names = record.read_text().split(",") if record.exists() else None
    if names is not None and all(n in known for n in names if n):
        probe = vec_isa.valid_vec_isa_list
        vec_isa.valid_vec_isa_list = lambda: [known[n] for n in names if n]
        try:
            return torch._inductor.aoti_load_package(str(path))
        finally:
            vec_isa.valid_vec_isa_list = probe
    runner = torch._inductor.aoti_load_package(str(path))
    record.write_text(",".join(str(isa) for isa in vec_isa.valid_vec_isa_list()))
    return runner


class _StateView(dict):
    """``optimizer.state`` during tracing: keyed by the traced copies of the parameters."""

    def __getitem__(self, p: Tensor) -> dict:
        return super().__getitem__(id(p))

    def get(self, p: Tensor, default: Any = None) -> Any:
        return super().get(id(p), default)

    def __contains__(self, p: object) -> bool:
        return super().__contains__(id(p))
