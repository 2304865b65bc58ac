"""Table-driven optimizer tests: conformance, parity with torch.optim, registry coverage.

``OPTIM_TABLE`` is the one table of optimizers (like torch's ``optim_db``): adding an optimizer
means adding its row here, and ``test_every_optimizer_has_a_row`` fails until it has one.
``conformance`` kwargs sets each go through :func:`singlestep.optim.testing.check_optimizer` (so
each needs an lr that at least halves a convex quadratic in 200 steps); ``parity`` sets are
compared against ``reference``, the torch.optim class with the same numbers, over 50 steps.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from singlestep.optim.testing import check_optimizer
from singlestep.registry import OPTIMIZERS, load_builtins

load_builtins()


@dataclass(frozen=True)
class OptimRow:
    """One registered optimizer's test inputs."""

    conformance: list[dict[str, Any]]
    reference: type[torch.optim.Optimizer] | None = None
    parity: list[dict[str, Any]] = field(default_factory=list)


OPTIM_TABLE: dict[str, OptimRow] = {
    "sgd": OptimRow(
        conformance=[
            {"lr": 0.1},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "maximize": True},
        ],
        reference=torch.optim.SGD,
        parity=[
            {"lr": 0.05},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.8, "dampening": 0.5},
            {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1, "maximize": True},
        ],
    ),
    "adagrad": OptimRow(
        conformance=[
            {"lr": 0.3},
            {"lr": 0.3, "lr_decay": 1e-3, "weight_decay": 1e-3, "initial_accumulator_value": 0.1, "maximize": True},
        ],
        reference=torch.optim.Adagrad,
        parity=[
            {"lr": 0.1},
            {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
            {"lr": 0.1, "eps": 1e-6, "maximize": True},
        ],
    ),
    "adadelta": OptimRow(
        conformance=[{"lr": 1.0}, {"lr": 2.0, "rho": 0.95, "weight_decay": 1e-3, "maximize": True}],
        reference=torch.optim.Adadelta,
        parity=[
            {"lr": 1.0},
            {"lr": 0.5, "rho": 0.95, "weight_decay": 0.01},
            {"lr": 1.0, "eps": 1e-4, "maximize": True},
        ],
    ),
    "rmsprop": OptimRow(
        conformance=[
            {"lr": 0.01},
            {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 1e-3},
            {"lr": 0.01, "maximize": True},
        ],
        reference=torch.optim.RMSprop,
        parity=[
            {"lr": 0.01},
            {"lr": 0.01, "centered": True},
            {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01},
            {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "maximize": True},
        ],
    ),
    "adam": OptimRow(
        conformance=[{"lr": 0.05}, {"lr": 0.05, "amsgrad": True, "weight_decay": 1e-3, "maximize": True}],
        reference=torch.optim.Adam,
        parity=[
            {"lr": 0.01},
            {"lr": 0.01, "amsgrad": True},
            {"lr": 0.01, "weight_decay": 0.01},
            {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 0.1, "maximize": True},
        ],
    ),
    "adamw": OptimRow(
        conformance=[{"lr": 0.05}, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1, "maximize": True}],
        reference=torch.optim.AdamW,
        parity=[
            {"lr": 0.01},
            {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
            {"lr": 0.01, "eps": 1e-6, "maximize": True},
        ],
    ),
    "lion": OptimRow(conformance=[{"lr": 0.01}, {"lr": 0.01, "betas": (0.95, 0.98), "weight_decay": 0.1}]),
    "schedule_free_adamw": OptimRow(
        conformance=[
            {"lr": 0.05},
            {"lr": 0.05, "warmup_steps": 10, "r": 1.0, "weight_decay": 1e-3, "betas": (0.95, 0.99)},
        ]
    ),
    "muon": OptimRow(
        conformance=[
            {"lr": 0.05, "fallback_lr": 0.05},
            {"lr": 0.05, "nesterov": False, "weight_decay": 0.01, "fallback": "adam", "fallback_lr": 0.05},
            {"lr": 0.05, "fallback": "lion", "fallback_lr": 0.01, "fallback_weight_decay": 0.1},
        ]
    ),
}


# ----------------------------------------------------------------------------- coverage


def test_every_optimizer_has_a_row():
    missing = sorted(set(OPTIMIZERS.names()) - set(OPTIM_TABLE))
    assert not missing, f"registered optimizers without a row in OPTIM_TABLE: {missing}"
    stale = sorted(set(OPTIM_TABLE) - set(OPTIMIZERS.names()))
    assert not stale, f"OPTIM_TABLE rows for unregistered optimizers: {stale}"


@pytest.mark.parametrize("name", sorted(OPTIM_TABLE))
def test_signature_is_a_schema(name):
    """No **kwargs, every hyper-parameter has a default and a plain annotation (the config checks them)."""
    import inspect
    import typing

    cls = OPTIMIZERS.get(name)
    sig = inspect.signature(cls)
    hints = typing.get_type_hints(cls.__init__)
    plain = {float, bool, int, str, tuple[float, float]}
    for p in list(sig.parameters.values())[1:]:
        assert p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL), f"{name}: *{p.name} in the signature"
        assert p.default is not p.empty, f"{name}: {p.name} has no default"
        assert hints.get(p.name) in plain, f"{name}: {p.name} is annotated {hints.get(p.name)!r}"
    assert OPTIMIZERS.entries()[OPTIMIZERS.names().index(name)].description, f"{name}: no docstring line"


# ----------------------------------------------------------------------------- conformance

_CONFORMANCE = [(name, kw) for name, row in sorted(OPTIM_TABLE.items()) for kw in row.conformance]


@pytest.mark.parametrize(("name", "kwargs"), _CONFORMANCE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_CONFORMANCE)])
def test_check_optimizer(name, kwargs):
    check_optimizer(OPTIMIZERS.get(name), **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("adadelta", {"rho": 1.5}, "Invalid rho value: 1.5"),
        ("adam", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
        ("sgd", {"lr": -0.1}, "Invalid learning rate: -0.1"),
        ("sgd", {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
        ("adagrad", {"eps": -1.0}, "Invalid epsilon value: -1.0"),
        ("rmsprop", {"alpha": -0.5}, "Invalid alpha value: -0.5"),
        ("lion", {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        ("schedule_free_adamw", {"betas": (0.0, 0.999)}, "Invalid beta parameter at index 0: 0.0 (must be in (0, 1))"),
        ("muon", {"fallback": "sgd"}, "Invalid fallback value: 'sgd' (expected one of adamw, adam, lion)"),
    ],
)
def test_validation_messages(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        OPTIMIZERS.get(name)([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    assert str(info.value) == message


# ----------------------------------------------------------------------------- parity with torch.optim

_PARITY = [(name, kw) for name, row in sorted(OPTIM_TABLE.items()) for kw in row.parity]
_STEPS = 50


def _parity_params() -> list[torch.Tensor]:
    """[w (5x4), b (4), frozen (3, requires_grad False), m (3x3, second group), unused (2, grad None)]."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (4,), (3,), (3, 3), (2,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    for i, p in enumerate(params):
        p.requires_grad_(i != 2)
    return params


def _parity_groups(params: list[torch.Tensor], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    w, b, frozen, m, unused = params
    return [{"params": [w, b, frozen]}, {"params": [m, unused], "lr": kwargs["lr"] * 0.5, "weight_decay": 0.0}]


_TARGET = torch.linspace(-1, 1, 20).reshape(5, 4)


def _set_parity_grads(params: list[torch.Tensor]) -> None:
    w, b, _, m, _ = params
    with torch.enable_grad():
        loss = ((w - _TARGET) ** 2).sum() + torch.cos(3 * b).sum() + 0.1 * ((m @ m.T - torch.eye(3)) ** 2).sum()
        grads = torch.autograd.grad(loss, [w, b, m])
    for p, g in zip((w, b, m), grads):
        p.grad = g


@pytest.mark.parametrize(("name", "kwargs"), _PARITY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_PARITY)])
def test_parity_with_torch(name, kwargs):
    """Same parameters as torch.optim after 50 steps, through a state_dict reload at step 25."""
    cls, reference = OPTIMIZERS.get(name), OPTIM_TABLE[name].reference
    ours_params, ref_params = _parity_params(), _parity_params()
    initial = _parity_params()
    ours = cls(_parity_groups(ours_params, kwargs), **kwargs)
    ref = reference(_parity_groups(ref_params, kwargs), **kwargs, foreach=False)
    for step in range(_STEPS):
        if step == _STEPS // 2:
            buffer = io.BytesIO()
            torch.save(ours.state_dict(), buffer)
            buffer.seek(0)
            ours = cls(_parity_groups(ours_params, kwargs), **kwargs)  # fresh, as after a restart
            ours.load_state_dict(torch.load(buffer, weights_only=True))
        _set_parity_grads(ours_params)
        ours.step()
        _set_parity_grads(ref_params)
        ref.step()
    for i, (a, b) in enumerate(zip(ours_params, ref_params)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
    assert torch.equal(ours_params[2], initial[2]), "the frozen parameter moved"
    assert torch.equal(ours_params[4], initial[4]), "the parameter without a gradient moved"
    assert ours_params[4] not in ours.state, "state was created for a parameter that never had a gradient"
