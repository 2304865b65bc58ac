"""Shapes of the registered lr schedules, their validation, and lr = 0 at the end of a decay."""

from __future__ import annotations

import math

import pytest
import torch

from singlestep.optim import SGD
from singlestep.optim import schedulers as S
from singlestep.registry import OPTIMIZERS, SCHEDULERS, load_builtins

load_builtins()


def _factors(build, total_steps: int, n: int, **kwargs) -> list[float]:
    """lr factor at optimizer steps 0..n-1 (base lr 1, the schedule stepped once per step)."""
    opt = SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build(opt, total_steps, **kwargs)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_registered_names():
    assert SCHEDULERS.names() == ["constant", "cosine", "inverse_sqrt", "linear", "step"]
    for entry in SCHEDULERS.entries():
        assert entry.description, entry.name


def test_constant_with_warmup():
    assert _factors(S.constant, 100, 6, warmup_steps=4) == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])
    assert _factors(S.constant, 100, 3) == [1.0, 1.0, 1.0]


def test_step():
    assert _factors(S.step, 100, 7, step_size=3, gamma=0.5) == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_cosine():
    f = _factors(S.cosine, 10, 12)
    assert f[0] == 1.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(0.0, abs=1e-12)
    assert f[11] == f[10]  # stays at the floor past total_steps
    assert f[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    g = _factors(S.cosine, 10, 21, warmup_steps=2, warmup_start_factor=0.1, min_lr_ratio=0.1)
    assert g[0] == pytest.approx(0.1) and g[1] == pytest.approx(0.55) and g[2] == 1.0
    assert g[6] == pytest.approx(0.55) and g[10] == pytest.approx(0.1) and g[20] == pytest.approx(0.1)


def test_linear_reaches_exactly_zero():
    f = _factors(S.linear, 10, 13, warmup_steps=2)
    assert f[:3] == pytest.approx([0, 0.5, 1])
    assert f[6] == pytest.approx(0.5)
    assert f[10] == 0.0 and f[12] == 0.0
    assert _factors(S.linear, 4, 5, end_factor=0.2) == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])


def test_inverse_sqrt():
    f = _factors(S.inverse_sqrt, 100, 65, warmup_steps=4)
    assert f[2] == pytest.approx(0.5) and f[4] == 1.0
    assert f[16] == pytest.approx(0.5) and f[64] == pytest.approx(0.25)
    g = _factors(S.inverse_sqrt, 100, 5)
    assert g[0] == 1.0 and g[1] == 1.0 and g[4] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (S.cosine, {"warmup_steps": 20}, "warmup_steps (20) must not exceed total_steps (10)"),
        (S.linear, {"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        (S.cosine, {"min_lr_ratio": 1.5}, "min_lr_ratio must be in [0, 1], got 1.5"),
        (S.linear, {"end_factor": -0.1}, "end_factor must be in [0, 1], got -0.1"),
        (S.step, {"step_size": 0}, "step_size must be an integer >= 1, got 0"),
        (S.step, {"gamma": 0.0}, "gamma must be > 0, got 0.0"),
        (S.constant, {"warmup_start_factor": 2.0}, "warmup_start_factor must be in [0, 1], got 2.0"),
    ],
)
def test_validation(build, kwargs, message):
    opt = SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError) as info:
        build(opt, 10, **kwargs)
    assert str(info.value) == message


def test_total_steps_validated():
    opt = SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1, got 0"):
        S.constant(opt, 0)


def test_each_group_keeps_its_base_lr():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1)
    sched = S.linear(opt, 4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.075, 0.0075])


def test_tensor_lr_is_filled_in_place():
    """torch's LRScheduler writes a tensor lr with fill_ (a compiled step that captured it sees the change)."""
    lr = torch.tensor(0.1)
    opt = SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = S.cosine(opt, 10, warmup_steps=2)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(0.05)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_lr_zero_at_end_of_linear_decay(name):
    """Every optimizer survives the final lr of exactly 0 (and the steps leading to it) without NaN."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = OPTIMIZERS.get(name)(params)
    sched = S.linear(opt, 5)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    if name != "schedule_free_adamw":  # y keeps moving toward the average x even at lr 0
        assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))


@pytest.mark.parametrize("name,kwargs", [
    ("constant", {"warmup_steps": 7}), ("step", {"step_size": 13, "gamma": 0.5}),
    ("cosine", {"warmup_steps": 10, "min_lr_ratio": 0.1}), ("linear", {"warmup_steps": 5}),
    ("inverse_sqrt", {"warmup_steps": 20}), ("cosine", {}),
])  # fmt: skip
def test_chunked_advance_matches_stepping(name, kwargs):
    """``advance_schedule`` over a chunk (the vectorised path) gives the lrs of real steps."""
    from singlestep.engine.base import advance_schedule
    from singlestep.registry import SCHEDULERS

    def fresh():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        return opt, SCHEDULERS.get(name)(opt, 100, **kwargs)

    opt, sched = fresh()
    stepped = []
    for _ in range(130):  # past total_steps too
        stepped.append(opt.param_groups[0]["lr"])
        sched.step()
    opt2, sched2 = fresh()
    chunked = [row[0] for size in (64, 3, 63) for row in advance_schedule(sched2, opt2, size)]
    assert chunked == pytest.approx(stepped, rel=1e-13, abs=1e-15)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-13, abs=1e-15)
    assert sched2.last_epoch == sched.last_epoch == 130
