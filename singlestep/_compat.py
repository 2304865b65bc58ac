"""Every private torch API singlestep touches, each behind a probe with a public fallback.

The rest of the package reads like ordinary PyTorch. A private name is used only where a bench
showed that it pays (docs/performance.md), and only through a function here that falls back to
the public way when the probe fails: a torch that moved or dropped the name runs slower, not
wrong. A failed probe logs one line (logger ``singlestep.compat``) the first time it is asked.

``SINGLESTEP_COMPAT_OFF=name,name`` (or ``all``) turns probes off by name, to run the public
paths on purpose; ``PROBES`` lists the names. ``torch._foreach_*`` and ``torch._fused_*``, which
torch.optim itself calls, are used where they are and are not listed here.

The compiled engine is built on torch's ahead-of-time stack (``make_fx``, ``torch.export``,
AOTInductor); where that fails, it falls back to eager with the error as its reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

__all__ = ["PROBES", "enabled", "probes_off"]

_log = logging.getLogger("singlestep.compat")


def _off() -> set[str]:
    return {n.strip() for n in os.environ.get("SINGLESTEP_COMPAT_OFF", "").split(",") if n.strip()}


_OFF = _off()
_REPORTED: set[str] = set()
_ON: set[str] = set()  # probes found on and not turned off: enabled()'s answer, kept until probes_off

# name -> what the private path buys (for the failure line and the docs)
PROBES: dict[str, str] = {
    "grad_mode": "turning grad mode off without a context object per call",
    "run_backward": "the autograd engine's entry point, without autograd.grad's per-call Python checks",
    "bare_step": "optimizer.step() past its profiling/hook wrapper when nothing hooks it",
    "no_grad_body": "a @torch.no_grad() step called past its decorator",
    "schedule": "advancing a LambdaLR in closed form (its private step counters)",
    "closed_form": "the linear model's backward kernels and the checks that nothing observes autograd",
    "host_scalars": "the checks that nothing traces the step (host reads of step counts)",
    "dynamo_deferred": "building an optimizer without importing torch._dynamo",
    "foreach_schemas": "the full list of torch._foreach_* ops to decompose when tracing",
    "scan_direct": "the scan operator called without torch.compile's wrapper",
    "native_loader": "loading a compiled package without importing the compiler",
    "boxed_run": "calling a loaded package on a flat list of tensors",
    "vec_isa": "remembering that the compiler's CPU vector-ISA check passed",
}


def enabled(name: str, found: bool = True) -> bool:
    """Whether probe ``name`` may use its private path (``found``: the names it needs exist)."""
    if found and name in _ON:  # the per-step path: one set lookup
        return True
    if name not in PROBES:
        raise KeyError(name)
    if "all" not in _OFF and name not in _OFF and found:
        _ON.add(name)
        return True
    if name not in _REPORTED:
        _REPORTED.add(name)
        why = "turned off by SINGLESTEP_COMPAT_OFF" if found else f"not found in torch {torch.__version__}"
        _log.info("compat probe '%s' %s: the public path runs instead (%s)", name, why, PROBES[name])
    return False


@contextlib.contextmanager
def probes_off(*names: str) -> Iterator[None]:
    """Turn probes off for a block (all of them without names): the public paths run instead.

    Objects that asked a probe when they were built (an engine) keep their answer: build them
    inside the block.
    """
    added = set(names or PROBES) - _OFF
    _OFF.update(added)
    _ON.clear()
    try:
        yield
    finally:
        _OFF.difference_update(added)
        _ON.clear()


def _attr(obj: Any, *path: str) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


# ----------------------------------------------------------------------------- grad mode

_set_grad_enabled = _attr(torch, "_C", "_set_grad_enabled")


def call_without_grad(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with grad mode off: what ``@torch.no_grad()`` does, without building and
    entering a context object per call (~2 us, a few percent of a per-sample step)."""
    if not enabled("grad_mode", _set_grad_enabled is not None):
        with torch.no_grad():
            return fn(*args)
    prev = torch.is_grad_enabled()
    _set_grad_enabled(False)
    try:
        return fn(*args)
    finally:
        _set_grad_enabled(prev)


# ----------------------------------------------------------------------------- autograd

_run_backward = _attr(torch.autograd.Variable, "_execution_engine", "run_backward")


def grads_of(loss: Tensor, inputs: tuple[Tensor, ...], grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, grad_output, allow_unused=True)``.

    autograd.grad's Python layer (argument normalisation and checks) costs ~20 us a call, a sixth
    of a per-sample step; where the probe holds this is the engine call it makes after them.
    """
    if enabled("run_backward", _run_backward is not None):
        # (outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unreachable, accumulate_grad)
        return _run_backward((loss,), (grad_output,), False, False, inputs, True, False)
    return torch.autograd.grad(loss, inputs, grad_outputs=grad_output, allow_unused=True)


# ----------------------------------------------------------------------------- optimizer.step


def bare_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], Any] | None:
    """The ``step`` that torch.optim's profiling/hook wrapper wraps, or None (call ``opt.step()``).

    The wrapper opens a profiler range and runs step hooks: ~10 us per call. With no hook and no
    profiler it does nothing else, so the engine may call what it wraps (``step_is_observed``
    says when it may not). An instance-level ``step`` is called as it is, except the one every
    torch LR scheduler puts there (``_wrapped_by_lr_sched``), which only records
    ``optimizer._opt_called = True`` for the scheduler's call-order warning: that flag is set here
    once, and the class's step is used. A ``@torch.no_grad()`` body is unwrapped as well
    (``no_grad_body``), and called with grad mode off.
    """
    if not enabled("bare_step", _optim_hooks_found()):
        return None
    own = vars(optimizer).get("step")
    if own is not None:
        if not (getattr(own, "_wrapped_by_lr_sched", False) and getattr(own, "__wrapped__", None) is type(optimizer).step):
            return None  # the user's own override: call what the user put there
        optimizer._opt_called = True
    step = type(optimizer).step
    if not getattr(step, "hooked", False):
        return None
    return getattr(step, "__wrapped__", None)


def step_is_observed(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step hook or the profiler needs ``optimizer.step()``'s wrapper this call."""
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or _optim_module._global_optimizer_pre_hooks
        or _optim_module._global_optimizer_post_hooks
        or torch.autograd._profiler_enabled()
    )


_optim_module = sys.modules["torch.optim.optimizer"]  # imported by torch.optim; read per step


@functools.cache
def _optim_hooks_found() -> bool:
    import torch.optim.optimizer as optim_module

    probe = _probe_optimizer()
    return (
        hasattr(probe, "_optimizer_step_pre_hooks")
        and hasattr(probe, "_optimizer_step_post_hooks")
        and hasattr(optim_module, "_global_optimizer_pre_hooks")
        and hasattr(optim_module, "_global_optimizer_post_hooks")
        and hasattr(torch.autograd, "_profiler_enabled")
    )


def _probe_optimizer() -> torch.optim.Optimizer:
    with dynamo_import_deferred():  # a probe must not import the compiler either
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def no_grad_body(fn: Any) -> Any:
    """The function that ``@torch.no_grad()`` decorates in ``fn``, or None if ``fn`` is not that.

    Recognised by the decorator's own code object and its context factory being the ``clone`` of
    a ``torch.no_grad`` instance, so any other decorator (a user's own, ``enable_grad``,
    ``inference_mode``) is left in place.
    """
    if not enabled("no_grad_body", _NO_GRAD_CODE is not None):
        return None
    if getattr(fn, "__code__", None) is not _NO_GRAD_CODE or not fn.__closure__:
        return None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
    factory, body = cells.get("ctx_factory"), cells.get("func")
    if type(getattr(factory, "__self__", None)) is not torch.no_grad or not callable(body):
        return None
    return body


_NO_GRAD_CODE = getattr(torch.no_grad()(lambda: None), "__code__", None)


# ----------------------------------------------------------------------------- LR schedulers


@functools.cache
def _schedule_fields_found() -> bool:
    opt = _probe_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return all(hasattr(sched, k) for k in ("_step_count", "_last_lr", "last_epoch", "base_lrs", "lr_lambdas"))


def lambda_lr_closed_form_ok() -> bool:
    """Whether a ``LambdaLR`` may be advanced by setting its counters (``advance_lambda_lr``)."""
    return enabled("schedule", _schedule_fields_found())


def advance_lambda_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, k: int, new_lrs: list[float]) -> None:
    """Record ``k`` steps on ``scheduler`` whose lrs were computed in closed form."""
    scheduler.last_epoch += k
    scheduler._step_count += k
    scheduler._last_lr = new_lrs


# ----------------------------------------------------------------------------- closed form

_nn = _attr(torch, "_C", "_nn")
nll_loss = getattr(_nn, "nll_loss", None)
mse_loss = getattr(_nn, "mse_loss", None)
log_softmax_backward = getattr(torch, "_log_softmax_backward_data", None)
_saved_tensor_hooks = _attr(torch, "_C", "_autograd", "_top_saved_tensors_default_hooks")
_torch_function_mode = _attr(torch, "_C", "_is_torch_function_mode_enabled")
_autocast_enabled = _attr(torch, "_C", "_is_any_autocast_enabled")


def _module_hooks_found() -> bool:
    from torch.nn.modules import module

    m, p = torch.nn.Linear(1, 1), torch.zeros(1, requires_grad=True)
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return (all(hasattr(module, n) for n in names) and hasattr(p, "_backward_hooks")
            and all(hasattr(m, n) for n in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")))  # fmt: skip


_CLOSED_FORM_FOUND = None not in (nll_loss, mse_loss, log_softmax_backward, _saved_tensor_hooks,
                                  _torch_function_mode, _autocast_enabled) and _module_hooks_found()  # fmt: skip


def closed_form_ok() -> bool:
    """Whether the linear model's closed-form grads may be used at all with this torch."""
    return enabled("closed_form", _CLOSED_FORM_FOUND)


def hooks_registered(modules: tuple[torch.nn.Module, ...], params: list[Tensor]) -> bool:
    """Any module, global module or tensor hook that a graph-free backward would skip."""
    from torch.nn.modules import module

    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules):
        return True
    if (module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
            or module._global_backward_pre_hooks):  # fmt: skip
        return True
    return any(p._backward_hooks for p in params)


def autograd_unobserved() -> bool:
    """Nothing that watches autograd or changes the ops is active: anomaly mode, autocast,
    saved-tensor hooks, torch-function or dispatch modes (a FLOP counter, fake tensors), functorch
    transforms, tracing."""
    return (
        not torch.is_anomaly_enabled()
        and not _autocast_enabled()  # autocast changes the forward's dtypes, and so its backward
        and _saved_tensor_hooks(False) is None
        and not _torch_function_mode()
        and not_traced()
    )


# ----------------------------------------------------------------------------- tracing state

_dispatch_depth = _attr(torch, "_C", "_len_torch_dispatch_stack")
_pre_dispatch_depth = _attr(torch, "_ops", "_len_torch_dispatch_stack_pre_dispatch")
_transforms = _attr(torch, "_C", "_functorch", "peek_interpreter_stack")
_jit_tracing = _attr(torch, "_C", "_get_tracing_state")
_TRACING_CHECKS_FOUND = None not in (_dispatch_depth, _pre_dispatch_depth, _transforms, _jit_tracing)


def not_traced() -> bool:
    """True only when it is certain that nothing traces the running code: not inside
    ``torch.compile`` or ``torch.jit.trace``, no dispatch mode (``make_fx``/export tracing, fake
    tensors, also pre-dispatch) and no ``torch.func`` transform, where a host read would fail or
    freeze a value into a graph. False where this torch lacks the checks (callers then keep their
    tensor maths, which is right everywhere)."""
    return (
        enabled("host_scalars", _TRACING_CHECKS_FOUND)
        and not torch.compiler.is_compiling()
        and _dispatch_depth() == 0
        and _pre_dispatch_depth() == 0
        and _transforms() is None
        and _jit_tracing() is None
    )


# ----------------------------------------------------------------------------- optimizer build


@contextlib.contextmanager
def dynamo_import_deferred(method: Callable[..., Any] | None = None) -> Iterator[None]:
    """Build an optimizer (or call ``method``: ``Optimizer.state_dict``, for a checkpoint) without
    importing ``torch._dynamo`` (~1 s of every run's start-up, or of its first checkpoint).

    ``Optimizer.add_param_group`` (and ``state_dict``) is wrapped by ``torch._disable_dynamo``, which imports
    ``torch._dynamo`` on its first call to learn how to hide the method from the compiler, then
    caches that answer on the method as ``__dynamo_disable``. While the compiler is not even
    loaded there is nothing to hide from, so for the constructor's duration the cached answer is
    "call the method as is" (or, once something has loaded the compiler, torch's own answer),
    and afterwards the attribute is removed so torch decides as usual.
    """
    import sys

    raw = getattr(method or torch.optim.Optimizer.add_param_group, "__wrapped__", None)
    if not enabled("dynamo_deferred", raw is not None) or hasattr(raw, "__dynamo_disable"):
        yield
        return

    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return raw(*args, **kwargs)
        return torch._dynamo.disable(raw, recursive=True, wrapping=False)(*args, **kwargs)

    raw.__dynamo_disable = call
    try:
        yield
    finally:
        if getattr(raw, "__dynamo_disable", None) is call:
            del raw.__dynamo_disable


# ----------------------------------------------------------------------------- the compiler


def make_fx(fn: Callable[..., Any], decomposition_table: dict) -> Callable[..., torch.fx.GraphModule]:
    from torch.fx.experimental.proxy_tensor import make_fx as _make_fx

    return _make_fx(fn, decomposition_table=decomposition_table)


def tree_leaves(tree: Any) -> list[Any]:
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(tree)


def foreach_op_names() -> set[str]:
    """Every registered ``aten::_foreach_*`` op (``dir(torch.ops.aten)`` lists only those looked up)."""
    schemas = _attr(torch, "_C", "_jit_get_all_schemas")
    if enabled("foreach_schemas", schemas is not None):
        return {s.name.split("::", 1)[1] for s in schemas() if s.name.startswith("aten::_foreach_")}
    return {name for name in dir(torch) if name.startswith("_foreach_")}  # the Python bindings


def scan(graph: Callable[..., Any], init: list[Tensor], xs: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor]:
    """``scan(graph, init, xs)`` as export traces it, without compiling it with Dynamo first.

    ``scan`` hands its flattened call to ``torch.compile`` (Dynamo, then the scan operator), which
    inside ``torch.export`` costs ~1 s of every cold compile and traces nothing new: the step is
    already a traced graph of ATen operators. Where the probe holds the operator is called
    directly, with ``scan``'s own argument flattening.
    """
    import importlib

    import torch.utils._pytree as pytree

    # the module, not the function of the same name that the package re-exports
    scan_module = importlib.import_module("torch._higher_order_ops.scan")
    scan_op, wrap = getattr(scan_module, "scan_op", None), getattr(scan_module, "wrap_combine_fn_flat", None)
    if not enabled("scan_direct", None not in (scan_op, wrap)):
        return scan_module.scan(graph, init, xs)
    leaves_init, spec_init = pytree.tree_flatten(init)
    leaves_xs, spec_xs = pytree.tree_flatten(xs)
    nested = functools.partial(wrap, combine_fn=graph, spec_init=spec_init, spec_xs=spec_xs,
                               num_init_leaves=len(leaves_init), num_inp_leaves=len(leaves_xs))  # fmt: skip
    result = scan_op(lambda *args: pytree.tree_leaves(nested(*args)), leaves_init, leaves_xs, additional_inputs=())
    return list(result[: len(leaves_init)]), result[len(leaves_init)]  # final carry; stacked outputs


def aoti_compile(exported: Any, package_path: str, inductor_configs: dict[str, Any], vec_isa_known: bool) -> None:
    """AOTInductor: compile an exported program into a package file."""
    import warnings

    import torch._inductor

    patch = {"cpp.vec_isa_ok": True} if vec_isa_known else {}
    with warnings.catch_warnings(), torch._inductor.config.patch(patch):
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation chatter inside torch
        torch._inductor.aoti_compile_and_package(exported, package_path=package_path, inductor_configs=inductor_configs)


def load_package(path: str) -> Any:
    """Load a compiled package; the result is callable as torch's own wrapper is.

    ``aoti_load_package`` imports the compiler (~1.5 s of start-up) only to compare the package's
    device metadata with this machine's and warn on a mismatch; the cache key already holds this
    machine's architecture, CPU capability and torch build, so the native loader is used directly
    where the probe holds.
    """
    native = _attr(torch, "_C", "_aoti", "AOTIModelPackageLoader")
    if not enabled("native_loader", native is not None):
        from torch._inductor import aoti_load_package

        return aoti_load_package(path)
    return _Package(native(path, "model", False, 1, -1))


class _Package:
    """A loaded package: the native loader, and torch's calling convention on demand."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor.package.package import AOTICompiledModel

        return AOTICompiledModel(self.loader)(*args, **kwargs)


def flat_call(package: Any, example: tuple, ours: list[Tensor],
              unflatten: Callable[[list[Tensor]], tuple]) -> Callable[[list[Tensor]], list[Tensor]]:  # fmt: skip
    """The package's entry point, fed the flat list ``ours`` (``example``'s tensors in our order).

    The package's own ``__call__`` flattens and unflattens nested inputs with pytree on every
    call, which costs as much as several per-sample steps; where the probe holds and our order is
    pytree's (checked once here), the native ``boxed_run`` is called on the flat list. Otherwise
    each call rebuilds the nested inputs with ``unflatten``.
    """
    import torch.utils._pytree as pytree

    leaves = pytree.tree_leaves(example)
    loader = getattr(package, "loader", None)
    same_order = len(leaves) == len(ours) and all(a is b for a, b in zip(leaves, ours))
    if enabled("boxed_run", hasattr(loader, "boxed_run")) and same_order:
        return loader.boxed_run  # takes (and empties) a fresh list per call
    return lambda inputs: pytree.tree_leaves(package(*unflatten(inputs)))


# ----------------------------------------------------------------------------- CPU vector ISAs


def claimed_vec_isas() -> list[Any]:
    """The vector ISAs the compiler may use that this CPU's flags claim (x86-64 Linux only)."""
    import platform
    import sys

    if not enabled("vec_isa") or sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        from torch._inductor import cpu_vec_isa

        flags = cpu_vec_isa.x86_isa_checker()
        return [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    except (ImportError, AttributeError):
        return []


def vec_isa_check_pending() -> bool:
    """Whether the user left the compiler's ISA check to it (``TORCHINDUCTOR_VEC_ISA_OK`` unset)."""
    import torch._inductor.config

    return getattr(torch._inductor.config.cpp, "vec_isa_ok", False) is None


def cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except (ImportError, AttributeError, RuntimeError):
        return None


def vec_isas_all_passed() -> bool:
    """Whether the compiler's own check (run during this process's compile) passed every claimed ISA."""
    from torch._inductor import cpu_vec_isa

    return [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] == [str(i) for i in claimed_vec_isas()]
