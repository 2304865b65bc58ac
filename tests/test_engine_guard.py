"""No engine gives a different result silently: every optimizer either matches eager steps under
``compiled`` and ``auto`` or falls back with a warning that names the cause."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singlestep.data.base import TensorSplit
from singlestep.engine import CompiledEngine, EagerEngine
from singlestep.losses import loss_for
from singlestep.optim import SGD


def _split(n=1200, d=20, classes=5) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    y = ((x.float() / 255 - 0.5) @ torch.randn(d, classes, generator=g)).argmax(1)
    return TensorSplit(x, y, mean=0.5, std=0.3)


def _engine(kind: str, opt_factory, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 5))  # autograd, no closed form
    opt = opt_factory(model.parameters())
    common = dict(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None, train=_split(), **kw)
    if kind == "eager":
        return EagerEngine(**common)
    return CompiledEngine(chunk_size=32, auto=kind == "auto", total_steps=10**9, **common)


class _Base(torch.optim.Optimizer):
    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})


class GroupCounterSGD(_Base):
    """Like pytorch-optimizer's AdaBelief: a Python int step count in ``param_groups``."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            scale = 1.0 / (1.0 + 0.01 * group["step"])  # a per-step value computed from the count
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * (group["lr"] * scale))  # tensor maths: traceable


class AttrCounterSGD(_Base):
    """Counts steps in a plain attribute of the optimizer."""

    n = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.n += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * (group["lr"] / (1.0 + 0.01 * self.n)))


class FloatStateSGD(_Base):
    """Keeps a Python float in its per-parameter state."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["decay"] = st.get("decay", 1.0) * 0.999
                    p.add_(p.grad, alpha=-group["lr"] * st["decay"])


class ItemSGD(_Base):
    """Reads a tensor's value on the host."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.norm().item() > 1e6:  # the host read
                        continue
                    p.add_(p.grad, alpha=-group["lr"])


CASES = {
    "group-int-counter": (GroupCounterSGD, r"param_groups\[0\]\['step'\]"),
    "attribute-counter": (AttrCounterSGD, r"optimizer\.n "),
    "float-state": (FloatStateSGD, "optimizer state 'decay' is a float"),
    "item": (ItemSGD, r"reads a tensor's value on the host .* at .*test_engine_guard\.py:\d+ \(`if p\.grad\.norm\(\)\.item\(\)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["compiled", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_untraceable_or_frozen_optimizer_matches_eager_or_says_why(case, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    cls, cause = CASES[case]
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:1000]
    eager = _engine("eager", cls)
    eager.run_samples(order)
    engine = _engine(kind, cls)
    with pytest.warns(UserWarning, match=cause) as record:
        engine.run_samples(order)
    assert len([w for w in record if "falls back to eager" in str(w.message)]) == 1
    for a, b in zip(eager.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    assert getattr(engine.optimizer, "n", 0) == getattr(eager.optimizer, "n", 0)
    assert engine.optimizer.param_groups[0].get("step") == eager.optimizer.param_groups[0].get("step")
    assert engine.read()["steps"] == eager.read()["steps"] == 1000
    assert not list(tmp_path.glob("compiled/chunk-*.pt2"))  # each is known before a compile


def test_python_value_changed_by_step_is_caught_by_the_first_chunk_check(monkeypatch):
    """Where the step was not traced in this process (a package found by its recipe), the first
    chunk's check still sees the Python step count that the package cannot advance."""
    engine = _engine("compiled", GroupCounterSGD)

    def package_that_matches_numerically(shape):  # runs the steps eagerly, but not their Python
        def run(idx, lrs):
            saved = [dict(g) for g in engine.optimizer.param_groups]
            with torch.enable_grad():
                engine.eager.run_samples_at(idx.reshape(-1), None)
            for group, old in zip(engine.optimizer.param_groups, saved):
                group["step"] = old["step"]

        return run

    monkeypatch.setattr(engine, "_build", package_that_matches_numerically)
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\['step'\] \(compiled 160, eager 192\)"):
        engine.run_samples(torch.arange(32 * 7))
    assert engine.optimizer.param_groups[0]["step"] == 32 * 7 and engine.fallback_reason


@pytest.mark.slow
def test_traceable_optimizer_compiles_and_passes_the_check():
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:1000]
    eager = _engine("eager", lambda p: SGD(p, lr=0.01, momentum=0.9))
    eager.run_samples(order)
    engine = _engine("compiled", lambda p: SGD(p, lr=0.01, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fall-back warning
        engine.run_samples(order)
    assert engine.fallback_reason is None and engine._verified == {(32, 1, 1)}
    # A non-convex model: the fused kernels' and the traced formula's last-bit differences grow over
    # 1000 steps to ~1e-5 on weights of ~1 (a linear model stays within 1e-6: test_engine_compiled).
    for a, b in zip(eager.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)
    assert engine.read()["steps"] == eager.read()["steps"] == 1000


@pytest.mark.slow
def test_a_step_feature_switched_on_once_changes_every_engine():
    """Eager and compiled run the same step code: a gradient transform in the rule changes both."""
    half = (lambda grads, loss: ([g * 0.5 for g in grads], loss),)
    order = torch.arange(256)
    results = {}
    for kind in ("eager", "compiled"):
        for name, transforms in (("plain", ()), ("halved", half)):
            engine = _engine(kind, lambda p: SGD(p, lr=0.05), grad_transforms=transforms, clip_grad_norm=1.0)
            engine.run_samples(order)
            if kind == "compiled":
                assert engine.fallback_reason is None and engine._verified
            results[kind, name] = [p.detach().clone() for p in engine.model.parameters()]
    for name in ("plain", "halved"):
        for a, b in zip(results["eager", name], results["compiled", name]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results["eager", "plain"][0], results["eager", "halved"][0])


def test_verification_mismatch_falls_back_and_keeps_the_eager_result(monkeypatch):
    """A compiled chunk that computes something else is caught on its first run; eager's numbers stay."""
    engine = _engine("compiled", lambda p: SGD(p, lr=0.05))
    eager = _engine("eager", lambda p: SGD(p, lr=0.05))
    order = torch.arange(32 * 6)

    def wrong_chunk(shape):
        def run(idx, lrs):
            with torch.no_grad():
                for p in engine.params:
                    p.add_(1.0)

        return run

    monkeypatch.setattr(engine, "_build", wrong_chunk)
    with pytest.warns(UserWarning, match="parameter 0 differs from eager steps' by 1"):
        engine.run_samples(order)
    eager.run_samples(order)
    for a, b in zip(eager.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert engine.read()["steps"] == eager.read()["steps"] == len(order)


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory, cause",
    [
        (lambda p: torch.optim.Adam(p, lr=0.01), r"at .*torch/optim/adam\.py:\d+ .*singlestep's own 'adam' \(optimizer\.name: adam\)"),
        (lambda p: torch.optim.AdamW(p, lr=0.01, fused=True), r"fused: true .* drop fused: true or use singlestep's own 'adamw'"),
    ],
    ids=["torch-adam", "torch-adamw-fused"],
)
def test_torch_optimizer_fall_back_names_the_line_and_what_works_instead(factory, cause, tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    eager, engine = _engine("eager", factory), _engine("compiled", factory)
    eager.run_samples(torch.arange(200))
    with pytest.warns(UserWarning, match=cause):
        engine.run_samples(torch.arange(200))
    for a, b in zip(eager.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
def test_group_value_changed_after_the_check_falls_back(tmp_path, monkeypatch):
    """A momentum a scheduler or the user changes mid-run is frozen in the compiled graph."""
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    eager = _engine("eager", lambda p: SGD(p, lr=0.01, momentum=0.9))
    engine = _engine("compiled", lambda p: SGD(p, lr=0.01, momentum=0.9))
    for e in (eager, engine):
        e.run_samples(torch.arange(320))
    assert engine._verified and engine.fallback_reason is None
    for e in (eager, engine):
        e.optimizer.param_groups[0]["momentum"] = 0.0
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\['momentum'\] \(checked with 0.9, now 0.0\) changed after"):
        engine.run_samples(torch.arange(320, 960))
    eager.run_samples(torch.arange(320, 960))
    assert engine.label == "compiled (fell back to eager)"
    for a, b in zip(eager.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parameter_without_a_gradient_is_not_stepped_by_a_compiled_step(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))

    results = {}
    for kind in ("eager", "compiled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 5))
        model.unused = nn.Parameter(torch.ones(3))  # the loss never reads it
        opt = SGD(model.parameters(), lr=0.01, weight_decay=1e-2)
        common = dict(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None, train=_split())
        e = EagerEngine(**common) if kind == "eager" else CompiledEngine(chunk_size=32, **common)
        if kind == "compiled":
            with pytest.warns(UserWarning, match=r"no gradient to parameter\(s\) \[0\]"):
                e.run_samples(torch.arange(400))
        else:
            e.run_samples(torch.arange(400))
        results[kind] = [p.detach().clone() for p in model.parameters()]
    assert torch.equal(results["eager"][0], torch.ones(3))  # model.unused: the module's own parameter comes first
    for a, b in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
def test_a_skipped_step_leaves_the_compiled_statistics_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    eager, engine = _engine("eager", lambda p: SGD(p, lr=0.01)), _engine("compiled", lambda p: SGD(p, lr=0.01))
    for e in (eager, engine):
        e.train.inputs = e.train.inputs.float()
        e.train.inputs[200] = float("inf")  # one sample whose loss is not finite, inside a compiled chunk
        e.run_samples(torch.arange(320))
    assert engine._verified
    a, b = eager.read(), engine.read()
    assert b["skipped_steps"] == a["skipped_steps"] == 1
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm_max"] == pytest.approx(a["grad_norm_max"], rel=1e-5)


def test_statistics_are_zeroed_in_place(tmp_path):
    """A captured CUDA graph keeps writing into the same statistics tensors after each read."""
    engine = _engine("eager", lambda p: SGD(p, lr=0.01))
    held = engine.stats.loss_sum
    engine.run_samples(torch.arange(10))
    assert engine.read()["steps"] == 10
    assert engine.stats.loss_sum is held and float(held) == 0.0


@pytest.mark.slow
def test_a_scheduler_that_changes_momentum_runs_per_step_and_is_not_compiled(tmp_path, monkeypatch):
    """OneCycleLR cycles momentum: eager steps it after every step, so chunking changes nothing;
    the compiled engine, whose graph would hold one momentum, runs eagerly."""
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))

    def run(kind, calls):
        e = _engine(kind, lambda p: SGD(p, lr=0.01, momentum=0.9))
        e.scheduler = torch.optim.lr_scheduler.OneCycleLR(e.optimizer, max_lr=0.05, total_steps=1000)
        if kind != "eager":
            e.eager.scheduler = e.scheduler
        for idx in torch.arange(960).split(calls):
            e.run_samples(idx)
        return e

    whole, chunked = run("eager", 960), run("eager", 32)
    for a, b in zip(whole.model.parameters(), chunked.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"the scheduler OneCycleLR is stepped after every step"):
        compiled = run("compiled", 960)
    for a, b in zip(whole.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
