"""The linear model's closed-form per-sample grads: bit-identical to autograd, and only where nothing can tell."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from singlestep.data.base import TensorSplit
from singlestep.engine import EagerEngine
from singlestep.engine.closed_form import closed_form_for
from singlestep.losses import loss_for
from singlestep.models.linear import Linear
from singlestep.optim import SGD, Adam

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _model(kind: str, bias: bool, dtype: torch.dtype, out: int = 7) -> nn.Module:
    torch.manual_seed(0)
    model = Linear(12, out, bias=bias) if kind == "ours" else nn.Linear(12, out, bias=bias)
    return model.to(dtype)


def _sample(kind: str, task: str, dtype: torch.dtype, seed: int, out: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 3, 4) if kind == "ours" else (1, 12), generator=g).to(dtype)
    y = (
        torch.randint(0, out, (1,), generator=g)
        if task == "classification"
        else torch.randn(1, out, generator=g).to(dtype)
    )
    return x, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ours", "nn"])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_is_bit_identical_to_autograd(kind, task, dtype, bias):
    model = _model(kind, bias, dtype)
    loss_fn = loss_for(task)
    params = list(model.parameters())
    closed = closed_form_for(model, loss_fn, params)
    assert closed is not None
    for seed in range(40):
        with torch.no_grad():  # new parameters each time: a spread of logits and targets
            for p in params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + seed)) * 2)
        x, y = _sample(kind, task, dtype, seed)
        loss = loss_fn(model(x), y)
        expected = torch.autograd.grad(loss, params)
        with torch.no_grad():
            got_loss, got = closed(x, y)
        torch.testing.assert_close(got_loss, loss.detach(), rtol=0, atol=0)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _engine(model: nn.Module, task: str, opt, **kw) -> EagerEngine:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (300, 3, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 7, (300,), generator=g) if task == "classification" else torch.randn(300, 7, generator=g)
    return EagerEngine(model=model, loss_fn=loss_for(task), optimizer=opt(model.parameters()), scheduler=None,
                       train=TensorSplit(x, y, mean=0.5, std=0.3), **kw)  # fmt: skip


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("opt", [lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: Adam(p, lr=1e-2)])
def test_engine_with_and_without_closed_form_give_the_same_run(task, opt):
    fast = _engine(_model("ours", True, torch.float32), task, opt, clip_grad_norm=0.5)
    slow = _engine(_model("ours", True, torch.float32), task, opt, clip_grad_norm=0.5)
    assert fast._closed is not None
    slow._closed = None
    grad_mode_in_step = []
    fast.optimizer.register_step_pre_hook(lambda o, a, k: grad_mode_in_step.append(torch.is_grad_enabled()))
    closed_calls = _count_calls(fast)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    for part in order.split(128):
        fast.run_samples(part)
        slow.run_samples(part)
    assert len(closed_calls) == 300  # every step took the closed form
    assert grad_mode_in_step == [True] * 300  # the step runs in the caller's grad mode, as through autograd
    for a, b in zip(slow.model.parameters(), fast.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert fast.read() == slow.read()
    assert torch.is_grad_enabled()


def _count_calls(engine: EagerEngine) -> list[int]:
    """Record each closed-form step of ``engine`` (the instance's call, wrapped)."""
    calls: list[int] = []
    closed = engine._closed
    inner = closed._loss_and_grads
    closed._loss_and_grads = lambda x, y: (calls.append(1), inner(x, y))[1]
    return calls


def test_only_the_plain_model_and_task_loss_have_a_closed_form():
    model = _model("ours", True, torch.float32)
    params = list(model.parameters())
    assert closed_form_for(model, loss_for("classification"), params) is not None
    assert closed_form_for(model, lambda out, y: F.cross_entropy(out, y), params) is None  # a loss it does not know
    assert closed_form_for(model, loss_for("classification"), params[:1]) is None  # frozen bias

    class Scaled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert closed_form_for(Scaled(12, 7), loss_for("classification"), list(Scaled(12, 7).parameters())) is None
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    assert closed_form_for(seq, loss_for("classification"), list(seq.parameters())) is None


HOOKS = ["forward", "forward_pre", "global_forward", "backward", "backward_pre", "global_backward", "tensor",
         "saved_tensors"]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("hook", HOOKS)
def test_hooks_are_honoured_by_falling_back_to_autograd(hook):
    engine = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    reference = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    reference._closed = None
    calls = []
    closed_calls = _count_calls(engine)
    fc = engine.model.fc
    if hook == "forward":
        handle = fc.register_forward_hook(lambda m, i, o: calls.append(1))
    elif hook == "forward_pre":
        handle = engine.model.register_forward_pre_hook(lambda m, i: calls.append(1))
    elif hook == "global_forward":
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(1))
    elif hook == "backward":
        handle = fc.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    elif hook == "backward_pre":
        handle = fc.register_full_backward_pre_hook(lambda m, go: calls.append(1))
    elif hook == "global_backward":
        handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append(1))
    elif hook == "tensor":
        handle = fc.weight.register_hook(lambda g: calls.append(1))
    else:
        ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: (calls.append(1), t)[1], lambda t: t)
        ctx.__enter__()
        handle = type("H", (), {"remove": lambda self: ctx.__exit__(None, None, None)})()
    try:
        assert not engine._closed.ready(*engine.train.get(torch.arange(4)))
        engine.run_samples(torch.arange(20))
    finally:
        handle.remove()
    assert len(calls) >= 20 and not closed_calls
    reference.run_samples(torch.arange(20))
    for a, b in zip(reference.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert engine._closed.ready(*engine.train.get(torch.arange(4)))  # hooks gone: the closed form again


def test_replaced_parameter_and_probability_targets_fall_back():
    engine = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    xs, ys = engine.train.get(torch.arange(4))
    assert engine._closed.ready(xs, ys)
    assert not engine._closed.ready(xs, torch.full((4, 7), 1 / 7))  # soft labels: another formula
    assert not engine._closed.ready(xs[:0], ys[:0])  # an empty chunk: nothing to check
    engine.model.double()  # converted in place after the engine was built
    assert not engine._closed.ready(xs.double(), ys)
    engine.model.float()
    assert engine._closed.ready(xs, ys)
    engine.model.fc.bias = nn.Parameter(torch.zeros(7))
    assert not engine._closed.ready(xs, ys)


def test_anything_that_changes_or_watches_the_step_falls_back():
    engine = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    xs, ys = engine.train.get(torch.arange(4))
    closed = engine._closed
    assert closed.ready(xs, ys)
    with torch.autograd.set_detect_anomaly(True):
        assert not closed.ready(xs, ys)  # autograd's checks would raise where the closed form would not
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):  # a dispatch mode: it must see autograd's ops
        assert not closed.ready(xs, ys)
    with torch.no_grad():
        assert not closed.ready(xs, ys)  # autograd's own error, not a silent closed form
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not closed.ready(xs, ys)  # autocast changes the forward's dtypes
        engine.run_samples(torch.arange(5))  # and trains through autograd
    engine.model.fc.weight.requires_grad_(False)  # frozen after the engine was built
    assert not closed.ready(xs, ys)
    engine.model.fc.weight.requires_grad_(True)
    original = engine.model.forward
    engine.model.forward = lambda x: 0.5 * original(x)  # a patched forward computes something else
    assert not closed.ready(xs, ys)
    del engine.model.forward
    assert closed.ready(xs, ys)
    engine.model.fc = nn.Linear(12, 7)  # a replaced layer: the engine's parameters are stale
    assert not closed.ready(xs, ys)


def test_a_fallback_steps_only_what_autograd_gives_a_grad():
    """After closed-form chunks (grads for all), a forward that ignores the bias must leave it alone."""
    engine = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    engine.run_samples(torch.arange(10))  # closed form: the bias has a grad now
    model = engine.model
    model.forward = lambda x: F.linear(x.flatten(1), model.fc.weight)  # the bias gets no grad
    bias = model.fc.bias.detach().clone()
    weight = model.fc.weight.detach().clone()
    engine.run_samples(torch.arange(10, 20))
    torch.testing.assert_close(model.fc.bias, bias, rtol=0, atol=0)
    assert not torch.equal(model.fc.weight, weight)
    fresh = _engine(_model("ours", True, torch.float32), "classification", lambda p: SGD(p, lr=0.05))
    fresh.model.forward = lambda x: F.linear(x.flatten(1), fresh.model.fc.weight)
    fresh.run_samples(torch.arange(5))  # the closed form never ran: autograd decides from the start
