"""The eager engine's CPU shortcuts keep its numbers and torch's hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singlestep.data.base import TensorSplit
from singlestep.engine import EagerEngine
from singlestep._compat import bare_step as _unwrapped_step
from singlestep.engine.eager import _DeviceOps, _HostOps
from singlestep.losses import loss_for
from singlestep.optim import SGD, Adam


class _Cast(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def _engine(opt_factory, dtype=torch.float32, **kw) -> EagerEngine:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (400, 12), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (400,), generator=g)
    model = nn.Sequential(_Cast(dtype), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    return EagerEngine(model=model, loss_fn=loss_for("classification"), optimizer=opt_factory(model.parameters()),
                       scheduler=None, train=TensorSplit(x, y, mean=0.5, std=0.3), **kw)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kw", [{"clip_grad_norm": 0.3}, {"clip_grad_norm": 50.0}, {"clip_grad_value": 0.01, "clip_grad_norm": 0.2}])
def test_host_scalar_path_matches_device_path(kw, dtype):
    """On the CPU the clip coefficient is host arithmetic; it must scale exactly as the tensor maths."""
    host = _engine(lambda p: Adam(p, lr=1e-2), dtype, **kw)
    device = _engine(lambda p: Adam(p, lr=1e-2), dtype, **kw)
    device.ops = _DeviceOps(device)
    assert isinstance(host.ops, _HostOps)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(3))
    host.run_samples(order)
    device.run_samples(order)
    for a, b in zip(device.model.parameters(), host.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    h, d = host.read(), device.read()
    assert h["steps"] == d["steps"] == 400
    for key in ("loss", "grad_norm", "grad_norm_max"):
        assert h[key] == pytest.approx(d[key], rel=1e-5)


def test_step_hooks_still_run():
    engine = _engine(lambda p: SGD(p, lr=0.1))
    calls = []
    handle = engine.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    engine.run_samples(torch.arange(10))
    assert len(calls) == 10
    handle.remove()
    engine.run_samples(torch.arange(10, 20))  # no hook: the unwrapped step, same maths
    assert len(calls) == 10


def test_lr_scheduler_patch_does_not_force_the_wrapped_step():
    engine = _engine(lambda p: SGD(p, lr=0.1))
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 0.5)
    assert "step" in vars(engine.optimizer)  # the scheduler's call-order patch
    assert _unwrapped_step(engine.optimizer) is type(engine.optimizer).step.__wrapped__
    assert engine.optimizer._opt_called
    engine.optimizer.step = lambda *a, **k: None  # a user's own override is called as it is
    assert _unwrapped_step(engine.optimizer) is None


def test_unwrapped_step_gives_the_same_numbers():
    fast, wrapped = _engine(lambda p: SGD(p, lr=0.1, momentum=0.9)), _engine(lambda p: SGD(p, lr=0.1, momentum=0.9))
    wrapped._bare_step = None
    fast.run_samples(torch.arange(50))
    wrapped.run_samples(torch.arange(50))
    for a, b in zip(wrapped.model.parameters(), fast.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_non_finite_step_is_skipped_on_the_host_path():
    engine = _engine(lambda p: SGD(p, lr=0.1))
    with torch.no_grad():
        engine.model[1].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in engine.model.parameters()]
    engine.run_samples(torch.arange(3))
    stats = engine.read()
    assert stats["skipped_steps"] == 3
    for a, b in zip(before, engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedule_applies_per_step_as_a_hand_written_loop(tensor_lr):
    """The chunk's lrs come from one table; each step must still use its own scheduled lr."""
    lr = torch.tensor(0.2) if tensor_lr else 0.2
    engine = _engine(lambda p: SGD(p, lr=lr, momentum=0.9))
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 1.0 / (1 + step))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = SGD(model.parameters(), lr=torch.tensor(0.2) if tensor_lr else 0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    engine.run_samples(torch.arange(37))
    engine.run_samples(torch.arange(37, 50))
    xs, ys = engine.train.get(torch.arange(50))
    for x, y in zip(xs.split(1), ys.split(1)):
        opt.zero_grad()
        loss_for("classification")(model(x), y).backward()
        opt.step()
        sched.step()
    for a, b in zip(model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert float(engine.optimizer.param_groups[0]["lr"]) == pytest.approx(0.2 / 51)
    assert engine.scheduler.last_epoch == sched.last_epoch == 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_clip_coefficient_rounds_as_tensor_maths(dtype):
    """The host coefficient is the device expression's number, in the norm's own precision."""
    from singlestep.engine.eager import _host_clip_coef as _clip_coef

    g = torch.Generator().manual_seed(0)
    norms = (10 ** (torch.rand(500, generator=g, dtype=torch.float64) * 16 - 8)).to(dtype)
    limits = (10 ** (torch.rand(500, generator=g, dtype=torch.float64) * 6 - 3)).tolist()
    for norm, max_norm in zip(norms, limits):
        expected = float((max_norm / (norm + 1e-6)).clamp_(max=1.0))
        assert _clip_coef(max_norm, norm.item(), dtype) == expected
    assert _clip_coef(1e38, 0.0, torch.float32) == 1.0  # float32 overflow is inf, then clamped
    assert _clip_coef(1.0, 0.5, torch.float16) is None  # half precision: left to tensor maths


class _RecordingSGD(SGD):
    """Records the grad mode its step runs under; can fail on demand."""

    seen: list[bool]
    fail = False

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(torch.is_grad_enabled())
        if self.fail:
            raise RuntimeError("step failed")
        return super().step.__wrapped__.__wrapped__(self, closure)  # SGD's body, past both wrappers


def test_no_grad_step_runs_past_its_decorator_with_grad_mode_off():
    engine = _engine(lambda p: _RecordingSGD(p, lr=0.1))
    engine.optimizer.seen = []
    assert engine._no_grad_body is not None  # torch.no_grad()'s decorator recognised
    engine.run_samples(torch.arange(5))
    assert engine.optimizer.seen == [False] * 5 and torch.is_grad_enabled()
    engine.optimizer.fail = True
    with pytest.raises(RuntimeError, match="step failed"):
        engine.run_samples(torch.arange(5, 6))
    assert torch.is_grad_enabled()  # restored after the failure


def test_other_step_decorators_are_kept():
    import functools

    calls = []

    def counted(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return wrapper

    class CountedSGD(SGD):
        @counted
        @torch.no_grad()
        def step(self, closure=None):
            return super().step.__wrapped__.__wrapped__(self, closure)

    class InferenceSGD(SGD):
        @torch.inference_mode()
        def step(self, closure=None):
            return super().step.__wrapped__.__wrapped__(self, closure)

    engine = _engine(lambda p: CountedSGD(p, lr=0.1))
    assert engine._no_grad_body is None
    engine.run_samples(torch.arange(4))
    assert len(calls) == 4
    assert _engine(lambda p: InferenceSGD(p, lr=0.1))._no_grad_body is None


def test_small_models_run_per_sample_steps_on_one_thread():
    """A second OpenMP thread only spins between a small model's tiny kernels; torch's setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = _engine(lambda p: SGD(p, lr=0.1))
        seen, gathers = [], []
        engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.get_num_threads()))
        get = engine.train.get
        engine.train.get = lambda idx: (gathers.append(torch.get_num_threads()), get(idx))[1]
        engine.run_samples(torch.arange(5))
        # The gather too: an OpenMP thread it wakes spins for milliseconds after it.
        assert seen == [1] * 5 and gathers == [1] and engine.eager_threads == 1
        assert torch.get_num_threads() == 2
        engine.eager_threads = None  # a larger model keeps torch's setting
        engine.run_samples(torch.arange(5, 8))
        assert seen[5:] == [2] * 3
    finally:
        torch.set_num_threads(before)
