"""The properties behind :mod:`singlestep.optim.testing`: one function per check.

Each function takes the :class:`Case` under test and returns ``(status, message)``: ``"pass"``
(with an optional note), ``"fail"`` (with what was seen) or ``"skip"`` (with why). The table that
names them, and the report, are in ``testing.py``.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

DESCENT_STEPS = 200
_SHORT = 5  # steps for the behavioural checks
_ENGINE_STEPS = 200  # per-sample steps the compiled-engine check runs through both engines
_ENGINE_CHUNK = 16  # small chunks: the engine warms up on one and times four before it compiles
_ENGINE_RTOL = 1e-4

Status = Literal["pass", "fail", "skip"]
Outcome = tuple[Status, str]  # what a check function returns: its status and its message


class _Problem:
    """The fixed quadratic f(p) = sum 0.5 * a * (p - c)^2 over a matrix and a vector."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.shapes = [(4, 3), (3,)]
        self.a = [torch.rand(s, generator=g) * 1.5 + 0.5 for s in self.shapes]  # curvature in [0.5, 2]
        self.c = [torch.randn(s, generator=g) for s in self.shapes]  # the minimiser
        self.init = [c + torch.randn(s, generator=g) for c, s in zip(self.c, self.shapes)]

    def params(self, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        return [p.to(dtype).clone().requires_grad_(True) for p in self.init]

    def loss(self, params: list[Tensor]) -> float:
        with torch.no_grad():
            return float(sum((0.5 * a * (p.float() - c) ** 2).sum() for p, a, c in zip(params, self.a, self.c)))

    def set_grads(self, params: list[Tensor], sign: float = 1.0) -> None:
        """grad = sign * a * (p - c), in the parameter's dtype (a fresh tensor each call)."""
        for p, a, c in zip(params, self.a, self.c):
            p.grad = (sign * a * (p.detach().float() - c)).to(p.dtype)


class Case:
    """The optimizer under test: its class, its kwargs and the quadratic it is run on."""

    def __init__(self, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.kwargs = kwargs
        self.sign = -1.0 if kwargs.get("maximize") else 1.0
        self.problem = _Problem()
        self.lr = _default_lr(cls, kwargs)

    def build(self, params: Any, **changes: Any) -> torch.optim.Optimizer:
        """The optimizer on ``params`` with the case's kwargs, ``changes`` applied over them."""
        return self.cls(params, **{**self.kwargs, **changes})

    def run(self, opt: torch.optim.Optimizer, params: list[Tensor], steps: int) -> None:
        for _ in range(steps):
            self.problem.set_grads(params, self.sign)
            opt.step()


def _passed(note: str = "") -> Outcome:
    return "pass", note


def _failed(detail: str) -> Outcome:
    return "fail", detail


def _lr_keys(cls: type, kwargs: dict[str, Any]) -> list[str]:
    names = set(inspect.signature(cls).parameters) | set(kwargs)
    return sorted(n for n in names if n == "lr" or n.endswith("_lr"))


def _default_lr(cls: type, kwargs: dict[str, Any]) -> float:
    if "lr" in kwargs:
        return float(kwargs["lr"])
    default = inspect.signature(cls).parameters.get("lr")
    if default is None or default.default is inspect.Parameter.empty:
        raise AssertionError(f"{cls.__name__} has no default 'lr'; pass lr= to check_optimizer")
    return float(default.default)


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t.detach().float()).all()) for t in tensors)


def _state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor) and v.is_floating_point()]


# ----------------------------------------------------------------------------- the checks


def invalid_lr(case: Case) -> Outcome:
    try:
        case.build(case.problem.params(), lr=-1.0)
    except ValueError:
        return _passed()
    return _failed("lr=-1.0 was accepted; validate in __init__ and raise ValueError")


def param_groups(case: Case) -> Outcome:
    # one optimizer with two groups == two optimizers with one group each
    problem, lr, sign = case.problem, case.lr, case.sign
    pa, pb = problem.params(), problem.params()
    joint = case.build([{"params": pa, "lr": lr}, {"params": pb, "lr": lr * 0.5}])
    qa, qb = problem.params(), problem.params()
    alone_a, alone_b = case.build(qa, lr=lr), case.build(qb, lr=lr * 0.5)
    for _ in range(_SHORT):
        problem.set_grads(pa, sign)
        problem.set_grads(pb, sign)
        joint.step()
        problem.set_grads(qa, sign)
        alone_a.step()
        problem.set_grads(qb, sign)
        alone_b.step()
    if not (_same(pa, qa) and _same(pb, qb)):
        return _failed("a group's result differs from the same params in their own optimizer")
    if _same(pa, pb):
        return _failed(f"groups with lr {lr} and {lr * 0.5} gave identical parameters")
    return _passed()


def grad_none(case: Case) -> Outcome:
    params = case.problem.params()
    idle = torch.randn(2, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    idle_before = idle.detach().clone()
    opt = case.build(params + [idle])
    case.run(opt, params, _SHORT)
    if not torch.equal(idle.detach(), idle_before) or idle.grad is not None:
        return _failed("a parameter without a gradient was modified")
    return _passed()


def grad_untouched(case: Case) -> Outcome:
    params = case.problem.params()
    opt = case.build(params)
    for _ in range(2):
        case.problem.set_grads(params, case.sign)
        grads = [p.grad for p in params]
        saved = [g.clone() for g in grads]
        opt.step()
        if any(p.grad is not g for p, g in zip(params, grads)) or not _same(grads, saved):
            return _failed("step() replaced or modified p.grad")
    return _passed()


def zero_grads(case: Case) -> Outcome:
    params = case.problem.params()
    opt = case.build(params)
    for _ in range(_SHORT):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    if not (_all_finite(params) and _all_finite(_state_tensors(opt))):
        return _failed("parameters or state became NaN/inf with all-zero gradients")
    return _passed()


def zero_lr(case: Case) -> Outcome:
    zero = {k: 0.0 for k in _lr_keys(case.cls, case.kwargs)}
    params = case.problem.params()
    case.run(case.build(params, **zero), params, _SHORT)
    if not _all_finite(params) or not _same(params, case.problem.params()):
        return _failed(f"parameters changed (or became non-finite) with {zero}")
    return _passed()


def state_dict_round_trip(case: Case) -> Outcome:
    params = case.problem.params()
    opt = case.build(params)
    case.run(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any failure to load is the finding)
        return _failed(f"torch.load(weights_only=True) refused the state_dict: {exc}")
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fresh = case.build(twins)
    fresh.load_state_dict(loaded)
    case.run(opt, params, 3)
    case.run(fresh, twins, 3)
    if not _same(params, twins):
        return _failed("a reloaded optimizer does not continue identically")
    return _passed()


def bf16(case: Case) -> Outcome:
    params = case.problem.params(torch.bfloat16)
    opt = case.build(params)
    try:
        case.run(opt, params, _SHORT)
    except Exception as exc:  # noqa: BLE001
        return _failed(f"step() raised on bfloat16 parameters: {exc!r}")
    if any(p.dtype != torch.bfloat16 for p in params) or not _all_finite(params):
        return _failed("bfloat16 parameters changed dtype or became non-finite")
    return _passed()


def descent(case: Case) -> Outcome:
    params = case.problem.params()
    opt = case.build(params)
    start = case.problem.loss(params)
    case.run(opt, params, DESCENT_STEPS)
    end = case.problem.loss(params)
    if not end <= 0.5 * start:
        return _failed(f"loss {start:.4g} -> {end:.4g} after {DESCENT_STEPS} steps on a convex quadratic (needs "
                       "<= half); is the lr too small, or the sign of the update wrong?")  # fmt: skip
    return _passed()


def tensor_lr(case: Case) -> Outcome:
    lr = case.lr
    params, twins = case.problem.params(), case.problem.params()
    opt = case.build(params, lr=lr)
    try:
        tensor_opt = case.build(twins, lr=torch.tensor(lr))
        case.run(tensor_opt, twins, _SHORT)
    except Exception as exc:  # noqa: BLE001
        return _failed(f"lr=torch.tensor({lr}) raised {exc!r}")
    case.run(opt, params, _SHORT)
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, twins)):
        return _failed("lr as a 0-dim tensor gives different parameters from the float")
    if not isinstance(tensor_opt.param_groups[0]["lr"], Tensor):
        return _failed("the tensor lr was replaced by a number (schedulers fill it in place)")
    return _passed()


def eval_train(case: Case) -> Outcome:
    if not (callable(getattr(case.cls, "eval", None)) and callable(getattr(case.cls, "train", None))):
        return "skip", "no eval()/train() to check"
    params = case.problem.params()
    opt = case.build(params)
    case.run(opt, params, _SHORT)
    before = copy.deepcopy([p.detach() for p in params])
    opt.eval()
    moved = not _same(params, before)
    opt.train()
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, before)):
        return _failed("train() after eval() does not restore the training parameters")
    if not moved and case.lr > 0:
        return _failed("eval() did not change the parameters after training steps")
    return _passed()


def compiled_engine(case: Case) -> Outcome:
    """The same sample order through EagerEngine and CompiledEngine: equal parameters, or a fall-back
    with the engine's reason (which passes: the engine said why). Public engine API only, on a small
    MLP, so that grads come from autograd rather than the linear model's closed form."""
    from torch import nn  # the engines pull in the compiler stack: imported only when this check runs

    from singlestep.data.base import TensorSplit
    from singlestep.engine import CompiledEngine, EagerEngine
    from singlestep.losses import loss_for

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 8, generator=g)
    split = TensorSplit(inputs, (inputs @ torch.randn(8, 4, generator=g)).argmax(1))
    order = torch.randperm(len(split), generator=g)[:_ENGINE_STEPS]
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():  # a fixed start without touching the global RNG
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    engines = []
    for engine_cls, extra in ((EagerEngine, {}), (CompiledEngine, {"chunk_size": _ENGINE_CHUNK})):
        twin = copy.deepcopy(model)
        opt = case.build(twin.parameters())
        common = dict(model=twin, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None, train=split)
        engines.append(engine_cls(**common, **extra))
    eager, compiled = engines
    eager.run_samples(order)
    with warnings.catch_warnings():
        # The engine's reason becomes the report's message; its warning would only repeat it.
        warnings.filterwarnings("ignore", message="engine 'compiled' falls back to eager")
        compiled.run_samples(order)
    if compiled.fallback_reason is not None:
        return _passed(f"runs eagerly: {compiled.fallback_reason}")
    for i, (e, c) in enumerate(zip(eager.model.parameters(), compiled.model.parameters())):
        e, c = e.detach(), c.detach()
        scale = float(torch.nan_to_num(e.abs(), posinf=0.0).max())
        # rtol per element, plus the same tolerance on the tensor's scale for entries near zero
        if not torch.allclose(c, e, rtol=_ENGINE_RTOL, atol=_ENGINE_RTOL * scale, equal_nan=True):
            diff = float((c.double() - e.double()).abs().max())
            return _failed(f"after {_ENGINE_STEPS} per-sample steps the compiled engine's parameter {i} differs from "
                           f"eager steps' by {diff:.3g} (largest |value| {scale:.3g}) and the engine did not fall "
                           "back; does step() read a Python value that changes between steps?")  # fmt: skip
    return _passed(f"compiles and matches eager steps over {_ENGINE_STEPS} per-sample steps (rtol {_ENGINE_RTOL:g})")


