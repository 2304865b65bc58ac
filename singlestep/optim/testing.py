"""Conformance checks any optimizer class can run: ``check_optimizer(MyOpt, lr=0.01)``.

The checks are the contract the trainer and engines rely on (see docs/optimizers.md). They run on
the CPU on tiny tensors (a 4x3 matrix, a 3-vector and a parameter that never gets a gradient) with
gradients of a fixed convex quadratic written out in closed form, and take well under a second.

Usage::

    from singlestep.optim.testing import check_optimizer
    from examples.my_optimizers import SignSGD

    check_optimizer(SignSGD, lr=0.01)   # raises AssertionError naming the first failed check

or, in a test table, once per set of keyword arguments::

    @pytest.mark.parametrize("kwargs", [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}])
    def test_conformance(kwargs):
        check_optimizer(MySGD, **kwargs)

What is checked, in order:
    1. a negative ``lr`` raises ``ValueError`` (torch-style validation in ``__init__``);
    2. two param groups with different ``lr`` behave exactly like two separate optimizers;
    3. a parameter whose ``grad`` is None is left untouched;
    4. ``p.grad`` is never modified by ``step()``;
    5. all-zero gradients keep parameters and state finite;
    6. with every learning rate (``lr`` and any ``*_lr`` argument) at 0, parameters stay bitwise equal;
    7. ``state_dict()`` taken mid-run survives ``torch.save`` + ``torch.load(weights_only=True)``
       and a freshly built optimizer that loads it continues bitwise identically;
    8. bfloat16 parameters step without error, stay bfloat16 and finite;
    9. 200 steps on the quadratic with the given kwargs at least halve the loss (pick an ``lr``
       that can do that; with ``maximize=True`` the gradients of ``-f`` are fed);
    10. ``lr`` given as a 0-dim tensor gives the same result as the float;
    11. if the optimizer has ``eval()`` / ``train()`` (schedule-free style), they are inverses.
"""

from __future__ import annotations

import copy
import inspect
import io
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_optimizer"]

_DESCENT_STEPS = 200
_SHORT = 5  # steps for the behavioural checks


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


def _fail(cls: type, kwargs: dict[str, Any], check: str, detail: str) -> AssertionError:
    return AssertionError(f"{cls.__name__}({_fmt(kwargs)}) failed '{check}': {detail}")


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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


def _run(opt: torch.optim.Optimizer, problem: _Problem, params: list[Tensor], steps: int, sign: float) -> None:
    for _ in range(steps):
        problem.set_grads(params, sign)
        opt.step()


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t.detach().float()).all()) for t in tensors)


def _state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor) and v.is_floating_point()]


def check_optimizer(cls: type[torch.optim.Optimizer], **kwargs: Any) -> None:
    """Run every conformance check on ``cls`` built with ``kwargs``; see the module docstring.

    Args:
        cls: a ``torch.optim.Optimizer`` subclass taking ``params`` first.
        **kwargs: hyper-parameters for ``cls`` (as they would come from the config).

    Raises:
        AssertionError: naming the optimizer, its kwargs, the failed check and what was seen.
    """
    sign = -1.0 if kwargs.get("maximize") else 1.0
    problem = _Problem()
    lr = _default_lr(cls, kwargs)

    # 1. validation
    try:
        cls(problem.params(), **{**kwargs, "lr": -1.0})
    except ValueError:
        pass
    else:
        raise _fail(cls, kwargs, "invalid lr", "lr=-1.0 was accepted; validate in __init__ and raise ValueError")

    # 2. param groups: one optimizer with two groups == two optimizers with one group each
    pa, pb = problem.params(), problem.params()
    joint = cls([{"params": pa, "lr": lr}, {"params": pb, "lr": lr * 0.5}], **kwargs)
    qa, qb = problem.params(), problem.params()
    alone_a, alone_b = cls(qa, **{**kwargs, "lr": lr}), cls(qb, **{**kwargs, "lr": lr * 0.5})
    for _ in range(_SHORT):
        problem.set_grads(pa, sign)
        problem.set_grads(pb, sign)
        joint.step()
        problem.set_grads(qa, sign)
        alone_a.step()
        problem.set_grads(qb, sign)
        alone_b.step()
    if not (_same(pa, qa) and _same(pb, qb)):
        raise _fail(cls, kwargs, "param groups", "a group's result differs from the same params in their own optimizer")
    if _same(pa, pb):
        raise _fail(cls, kwargs, "param groups", f"groups with lr {lr} and {lr * 0.5} gave identical parameters")

    # 3. grad None: untouched
    params = problem.params()
    idle = torch.randn(2, 2).requires_grad_(True)
    idle_before = idle.detach().clone()
    opt = cls(params + [idle], **kwargs)
    _run(opt, problem, params, _SHORT, sign)
    if not torch.equal(idle.detach(), idle_before) or idle.grad is not None:
        raise _fail(cls, kwargs, "grad None", "a parameter without a gradient was modified")

    # 4. p.grad is read-only
    params = problem.params()
    opt = cls(params, **kwargs)
    for _ in range(2):
        problem.set_grads(params, sign)
        grads = [p.grad for p in params]
        saved = [g.clone() for g in grads]
        opt.step()
        if any(p.grad is not g for p, g in zip(params, grads)) or not _same(grads, saved):
            raise _fail(cls, kwargs, "grad untouched", "step() replaced or modified p.grad")

    # 5. zero grads: finite
    params = problem.params()
    opt = cls(params, **kwargs)
    for _ in range(_SHORT):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    if not (_all_finite(params) and _all_finite(_state_tensors(opt))):
        raise _fail(cls, kwargs, "zero grads", "parameters or state became NaN/inf with all-zero gradients")

    # 6. lr = 0: parameters unchanged
    zero = {k: 0.0 for k in _lr_keys(cls, kwargs)}
    params = problem.params()
    opt = cls(params, **{**kwargs, **zero})
    _run(opt, problem, params, _SHORT, sign)
    if not _all_finite(params) or not _same(params, problem.params()):
        raise _fail(cls, kwargs, "lr = 0", f"parameters changed (or became non-finite) with {zero}")

    # 7. state_dict round trip mid-run
    params = problem.params()
    opt = cls(params, **kwargs)
    _run(opt, problem, params, 3, sign)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any failure to load is the finding)
        raise _fail(cls, kwargs, "state_dict", f"torch.load(weights_only=True) refused the state_dict: {exc}") from None
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fresh = cls(twins, **kwargs)
    fresh.load_state_dict(loaded)
    _run(opt, problem, params, 3, sign)
    _run(fresh, problem, twins, 3, sign)
    if not _same(params, twins):
        raise _fail(cls, kwargs, "state_dict", "a reloaded optimizer does not continue identically")

    # 8. bfloat16
    params = problem.params(torch.bfloat16)
    opt = cls(params, **kwargs)
    try:
        _run(opt, problem, params, _SHORT, sign)
    except Exception as exc:  # noqa: BLE001
        raise _fail(cls, kwargs, "bf16", f"step() raised on bfloat16 parameters: {exc!r}") from None
    if any(p.dtype != torch.bfloat16 for p in params) or not _all_finite(params):
        raise _fail(cls, kwargs, "bf16", "bfloat16 parameters changed dtype or became non-finite")

    # 9. descent on the quadratic
    params = problem.params()
    opt = cls(params, **kwargs)
    start = problem.loss(params)
    _run(opt, problem, params, _DESCENT_STEPS, sign)
    end = problem.loss(params)
    if not end <= 0.5 * start:
        raise _fail(
            cls, kwargs, "descent",
            f"loss {start:.4g} -> {end:.4g} after {_DESCENT_STEPS} steps on a convex quadratic (needs <= half);"
            " is the lr too small, or the sign of the update wrong?",
        )  # fmt: skip

    # 10. lr as a 0-dim tensor
    params, twins = problem.params(), problem.params()
    opt = cls(params, **{**kwargs, "lr": lr})
    try:
        tensor_opt = cls(twins, **{**kwargs, "lr": torch.tensor(lr)})
        _run(tensor_opt, problem, twins, _SHORT, sign)
    except Exception as exc:  # noqa: BLE001
        raise _fail(cls, kwargs, "tensor lr", f"lr=torch.tensor({lr}) raised {exc!r}") from None
    _run(opt, problem, params, _SHORT, sign)
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, twins)):
        raise _fail(cls, kwargs, "tensor lr", "lr as a 0-dim tensor gives different parameters from the float")
    if not isinstance(tensor_opt.param_groups[0]["lr"], Tensor):
        raise _fail(cls, kwargs, "tensor lr", "the tensor lr was replaced by a number (schedulers fill it in place)")

    # 11. eval()/train() swap (schedule-free style), when offered
    if callable(getattr(cls, "eval", None)) and callable(getattr(cls, "train", None)):
        params = problem.params()
        opt = cls(params, **kwargs)
        _run(opt, problem, params, _SHORT, sign)
        before = copy.deepcopy([p.detach() for p in params])
        opt.eval()
        moved = not _same(params, before)
        opt.train()
        if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, before)):
            raise _fail(cls, kwargs, "eval/train", "train() after eval() does not restore the training parameters")
        if not moved and lr > 0:
            raise _fail(cls, kwargs, "eval/train", "eval() did not change the parameters after training steps")
