"""Tracing one optimizer step into a pure graph, for the compiled engine.

The step is :func:`singlestep.engine.step.take_step`, the same function the eager engine runs,
executed with :class:`TracedOps`: functional maths, a non-finite step masked with ``torch.where``.
The optimizer is the user's own object, called as-is: during tracing its parameter and state
references point at fresh copies, so any optimizer in ``torch.optim`` shape (tensor state, no
``.item()``) becomes functional maths. Python in ``step()`` runs only at trace time, which is why
the compiled engine checks its first chunk against eager steps (``compiled.py``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from singlestep import _compat as compat
from singlestep.engine.base import lr_only
from singlestep.engine.step import StepRule, clip_coef, global_norm, take_step

__all__ = ["CompileUnsupported", "check_supported", "explain", "flat_names", "flat_tensors", "frozen_reason", "python_changes",
           "python_state", "restore_python_state", "state_keys", "trace_step"]  # fmt: skip

# torch.optim classes whose numbers ours match (the parity tests in tests/test_optim.py) and compile.
_SAME_AS_TORCH = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "Adagrad": "adagrad", "Adadelta": "adadelta",
                  "RMSprop": "rmsprop"}  # fmt: skip

# A matmul with at most this many multiply-adds is traced as a broadcast multiply and a sum.
_TINY_MATMUL = 65536


class CompileUnsupported(Exception):
    """The model or optimizer cannot run in the compiled engine (the message says why)."""


# ----------------------------------------------------------------------------- the flat layout


def state_keys(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[list[str]]:
    """Each trainable parameter's optimizer-state keys, sorted: the layout of :func:`flat_tensors`."""
    return [sorted(optimizer.state.get(p, {})) for p in params]


def flat_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], keys: list[list[str]]) -> list[Tensor]:
    """Parameters then optimizer state, read afresh (an eager step may replace state tensors)."""
    state = optimizer.state
    return [p.detach() for p in params] + [state[p][k] for p, ks in zip(params, keys) for k in ks]


def flat_names(n_params: int, keys: list[list[str]]) -> list[str]:
    """What each tensor of :func:`flat_tensors` is, for messages."""
    names = [f"parameter {i}" for i in range(n_params)]
    return names + [f"optimizer state '{key}' of parameter {i}" for i, ks in enumerate(keys) for key in ks]


# ----------------------------------------------------------------------------- what can compile


def check_supported(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor], scheduler: Any,
                    used: list[Tensor], per_sample: bool) -> None:  # fmt: skip
    """Raise :class:`CompileUnsupported` for what the traced step cannot carry (``used``: the
    parameters eager steps found the loss gives a grad)."""
    if scheduler is not None and not lr_only(scheduler):
        raise CompileUnsupported(
            f"the scheduler {type(scheduler).__name__} is stepped after every step (it may change more than the lr, "
            "as OneCycleLR's momentum), and a compiled chunk takes only a table of lrs; a built-in schedule "
            "(scheduler.name) compiles"
        )
    unused = [i for i, p in enumerate(params) if all(p is not q for q in used)]
    if unused:
        # Eager steps leave such a parameter's grad None, so the optimizer skips it; the traced
        # step gets a zero grad for it, and weight decay or momentum would still move it.
        raise CompileUnsupported(f"the loss gives no gradient to parameter(s) {unused}, which eager steps leave "
                                 "alone and a compiled step would update with a zero gradient")  # fmt: skip
    if any(True for _ in model.buffers()):
        raise CompileUnsupported("the model has buffers (e.g. BatchNorm running stats), which the compiled step does not carry")
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, Tensor):
                    raise CompileUnsupported(
                        f"optimizer state '{key}' is a {type(value).__name__}, not a tensor; keep per-parameter "
                        "state in tensors (as torch.optim does) to compile the step"
                    )
    trainable = {id(p) for p in params}
    if not {id(p) for g in optimizer.param_groups for p in g["params"]} <= trainable:
        raise CompileUnsupported("the optimizer holds tensors that are not trainable model parameters")
    # The traced step gives each parameter its own copy of its state and updates every tensor in
    # place: state shared between parameters (one step counter for all, say) would be updated once
    # per parameter instead of once per step.
    keys = state_keys(optimizer, params)
    named = [(what, t) for what, t in zip(flat_names(len(params), keys), flat_tensors(optimizer, params, keys))
             if t.numel() and not t.is_sparse]  # fmt: skip
    spans = []
    for what, t in named:
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        spans.append((str(t.device), t.data_ptr(), t.data_ptr() + extent * t.element_size(), what))
    spans.sort()
    for (dev_a, _, end_a, what_a), (dev_b, start_b, _, what_b) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise CompileUnsupported(
                f"{what_b} shares its memory with {what_a}; the compiled step keeps each parameter's state in tensors of its own"
            )
    if per_sample:  # torch's scan refuses carries that share a storage, even disjoint slices of it
        owner: dict[tuple[str, int], str] = {}
        for what, t in named:
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in owner:
                raise CompileUnsupported(
                    f"{what} and {owner[key]} are slices of one storage; per-sample chunks need each "
                    "parameter and state tensor in storage of its own (mini-batch steps allow it)"
                )
            owner[key] = what


# ----------------------------------------------------------------------------- tracing


def trace_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
               params: list[Tensor], rule: StepRule, split: Any, micro: int,
               rows: int) -> torch.fx.GraphModule:  # fmt: skip
    """Trace one optimizer step into a pure graph ``(flat, (x, y, lr)) -> (flat', stats)``.

    ``flat`` is the parameters followed by every optimizer state tensor (:func:`flat_tensors`);
    ``x`` and ``y`` hold ``micro`` micro-batches of ``rows`` samples, whose gradients are summed
    with weight ``1 / micro`` (the eager engine's rule for equal micro-batches); ``stats`` is
    ``[loss, pre-clip norm, finite]``. Python values ``step()`` changes are restored afterwards.
    """
    from torch.func import functional_call, grad_and_value

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = optimizer.param_groups
    pos_of = {id(p): i for i, p in enumerate(params)}
    members = [[pos_of[id(p)] for p in g["params"]] for g in groups]
    keys = state_keys(optimizer, params)
    what = flat_names(len(params), keys)
    n_params = len(params)

    def loss_of(values: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, dict(zip(names, values)), (x,)), y)

    grad_value = grad_and_value(loss_of)

    def step(flat: list[Tensor], xs: tuple[Tensor, Tensor, Tensor]) -> tuple[list[Tensor], Tensor]:
        ps = flat[:n_params]
        it = iter(flat[n_params:])
        ss = [{k: next(it) for k in ks} for ks in keys]
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
        ops = TracedOps(optimizer, members, ps, ss, keys, what, lr)
        take_step(rule, ops, grads, loss.detach())
        return ops.out, ops.stats

    flat = flat_tensors(optimizer, params, keys)
    x0, y0 = split.get(torch.zeros(micro * rows, dtype=torch.long, device=split.device))
    x0, y0 = x0.reshape(micro, rows, *x0.shape[1:]), y0.reshape(micro, rows, *y0.shape[1:])
    lr0 = torch.zeros(len(groups), device=split.device)
    saved = python_state(optimizer)
    try:
        with torch.no_grad():
            table = {**_foreach_decompositions(), **_tiny_matmul_decompositions()}
            graph = compat.make_fx(step, table)(flat, (x0, y0, lr0))
        changed = python_changes(saved, python_state(optimizer))
    finally:  # tracing ran step() once: what it changed in Python must not count as a step
        restore_python_state(optimizer, saved)
    if changed:  # known now, before a compile: the first chunk's check would find it too
        raise CompileUnsupported(frozen_reason(changed[0]))
    _strip_profiler(graph)
    held = [*graph.named_parameters(), *graph.named_buffers(), *vars(graph).items()]
    if any(isinstance(value, Tensor) for _, value in held):
        # A chunk would keep their values from compile time (and a cached package from an earlier
        # run): a frozen layer loaded from another checkpoint, or an attribute the optimizer
        # updates, would be stale without any sign.
        raise CompileUnsupported(
            "the step reads tensors that are neither trainable parameters nor optimizer state (a frozen "
            "parameter, a tensor attribute of the model or optimizer, or a tensor made in step()), which "
            "a compiled step would fix at their compile-time values; use Python numbers or optimizer state"
        )
    return graph


class _StateView(dict):
    """``optimizer.state`` during tracing: keyed by the traced copies of the parameters."""

    def __getitem__(self, p: Tensor) -> dict:
        return super().__getitem__(id(p))

    def get(self, p: Tensor, default: Any = None) -> Any:
        return super().get(id(p), default)

    def __contains__(self, p: object) -> bool:
        return super().__contains__(id(p))


class TracedOps:
    """The step's stages as functional maths, for tracing (see ``step.py``).

    ``update`` calls the user's optimizer as-is on copies of the parameters and state: its in-place
    maths becomes pure graph ops. A non-finite step is masked with ``torch.where`` so parameters
    and state keep their values, without a host sync. ``out`` and ``stats`` are the step's outputs.
    """

    def __init__(self, opt: torch.optim.Optimizer, members: list[list[int]], ps: list[Tensor],
                 ss: list[dict[str, Tensor]], keys: list[list[str]], names: list[str], lr: Tensor):  # fmt: skip
        self.opt, self.members, self.ps, self.ss, self.keys, self.names, self.lr = opt, members, ps, ss, keys, names, lr
        self.out: list[Tensor] = []
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
        opt, groups, ps, ss, keys = self.opt, self.opt.param_groups, self.ps, self.ss, self.keys
        new_p = [p.clone() for p in ps]
        new_s = [{k: v.clone() for k, v in d.items()} for d in ss]
        saved = ([g["params"] for g in groups], [g["lr"] for g in groups], opt.state)
        try:
            for gi, group in enumerate(groups):
                group["params"] = [new_p[i] for i in self.members[gi]]
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
        # The chunk writes these back in place: a tensor the optimizer rebinds to another shape or
        # dtype (a growing history, say) cannot be.
        olds = ps + [d[k] for d, ks in zip(ss, keys) for k in ks]
        news = new_p + [d[k] for d, ks in zip(new_s, keys) for k in ks]
        for what, old, new in zip(self.names, olds, news):
            if new.shape != old.shape or new.dtype != old.dtype:
                raise CompileUnsupported(
                    f"the step turns {what} from {old.dtype} {tuple(old.shape)} into {new.dtype} "
                    f"{tuple(new.shape)}; keep each state tensor's dtype and shape to compile the step"
                )
        if isinstance(ok, Tensor):  # a non-finite step leaves parameters and state as they were
            news = [torch.where(ok, new, old) for new, old in zip(news, olds)]
        self.out = news


# ----------------------------------------------------------------------------- Python state

_PLAIN = (bool, int, float, str, type(None), tuple)


def python_state(opt: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The plain Python values of the optimizer's groups and attributes, which a step may change."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr") and isinstance(v, _PLAIN)} for g in opt.param_groups]
    return groups, {k: v for k, v in vars(opt).items() if isinstance(v, _PLAIN)}


def restore_python_state(opt: torch.optim.Optimizer, saved: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    for group, values in zip(opt.param_groups, saved[0]):
        group.update(values)
    vars(opt).update(saved[1])


def python_changes(before: tuple, after: tuple, how: str = "{} -> {}") -> list[str]:
    """Descriptions of the plain Python values that differ between two :func:`python_state`
    readings, each value pair written with ``how``."""
    changes = []
    for gi, (b, a) in enumerate(zip(before[0], after[0])):
        for k in sorted(set(b) | set(a)):
            if b.get(k) != a.get(k):
                changes.append(f"param_groups[{gi}]['{k}'] ({how.format(repr(b.get(k)), repr(a.get(k)))})")
    for k in sorted(set(before[1]) | set(after[1])):
        if before[1].get(k) != after[1].get(k):
            changes.append(f"optimizer.{k} ({how.format(repr(before[1].get(k)), repr(after[1].get(k)))})")
    return changes


def frozen_reason(change: str) -> str:
    """The fall-back reason for a Python value that ``step()`` changes every step."""
    return (f"step() changes {change} in Python, which a compiled step would freeze at its traced value; "
            "keep values that change per step in optimizer state tensors")  # fmt: skip


# ----------------------------------------------------------------------------- failures


def explain(exc: Exception, optimizer: torch.optim.Optimizer) -> str:
    """A one-line reason for a failed trace or compile, in the user's terms where we can: the
    line of the optimizer's (or model's) source that read a value on the host, and what to do."""
    import inspect

    text = str(exc)
    cls = type(optimizer)
    ours = _SAME_AS_TORCH.get(cls.__name__) if cls.__module__.startswith("torch.optim") else None
    same = f"singlestep's own '{ours}' (optimizer.name: {ours}) has the same numbers and compiles" if ours else None
    if any(g.get("fused") for g in optimizer.param_groups):
        return ("fused: true runs torch's fused kernel, one op over a list of tensors, which the compiled step "
                f"cannot loop over; drop fused: true{' or use ' + same if same else ''}")  # fmt: skip
    if "_local_scalar_dense" in text or "data-dependent" in text:
        advice = same or "write optimizer maths as plain tensor ops (docs/optimizers.md)"
        on_cpu = all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
        if not same and not on_cpu and "capturable" in inspect.signature(cls).parameters:
            advice = "try capturable: true, which keeps its step count in a tensor"
        return (f"the step reads a tensor's value on the host (.item(), float(t), an if on a tensor, or a "
                f"tensor lr passed as alpha=/value=){_user_line(exc)}, so it cannot be traced; {advice}")  # fmt: skip
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:3])[:400]}"


def _user_line(exc: Exception) -> str:
    """`` at FILE:LINE (`code`)``: the innermost frame of the traceback outside torch's internals
    and this engine, where the step's code read a value; empty when there is none."""
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        f = frame.filename
        # torch.optim's classes count as the user's code, its shared helpers (optimizer.py) do not
        optim_dir = os.path.join(torch_dir, "optim")
        inside_torch = f.startswith(torch_dir) and (not f.startswith(optim_dir) or f.endswith("optimizer.py"))
        if not inside_torch and not f.startswith(here) and frame.line is not None:
            return f" at {f}:{frame.lineno} (`{frame.line.strip()}`)"
    return ""


# ----------------------------------------------------------------------------- decompositions


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


def _foreach_decompositions() -> dict:
    """Trace ``torch._foreach_*`` ops as the loop of single-tensor ops they stand for.

    Optimizers in torch.optim's shape often update a whole group with one ``_foreach`` call
    (ours do, to save launches in eager steps). The scan operator the chunk is built on does not
    take ops that return lists of tensors, and the per-tensor ops compute the same numbers, so the
    trace spells the loop out; Inductor fuses it again.
    """
    aten = torch.ops.aten
    table: dict = {}
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
