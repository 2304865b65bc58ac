"""The compiled engine keeps the step contract: same parameters and statistics as eager steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singlestep.data.base import TensorSplit
from singlestep.engine import CompiledEngine, EagerEngine
from singlestep.engine import _aoti, _cache, _trace
from singlestep import _compat as compat
from singlestep.losses import loss_for
from singlestep.optim import SGD, Adam
from singlestep.optim.schedulers import cosine


def classification_split(n=1200, d=20, classes=5, seed=0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    w = torch.randn(d, classes, generator=g)
    y = ((x.float() / 255 - 0.5) @ w).argmax(1)
    return TensorSplit(x, y, mean=0.5, std=0.3)


def make(engine_cls, opt_factory, *, schedule=False, model_factory=lambda: nn.Linear(20, 5), **kw):
    torch.manual_seed(0)
    split = classification_split()
    model = model_factory()
    opt = opt_factory(model.parameters())
    sched = cosine(opt, 1100, warmup_steps=100) if schedule else None
    extra = {"chunk_size": 32} if engine_cls is CompiledEngine else {}
    if engine_cls is EagerEngine:
        kw.pop("batch_shape", None)
    engine = engine_cls(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=sched,
                        train=split, **kw, **extra)  # fmt: skip
    return engine


CASES = {
    "sgd_momentum_cosine_clip": (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4), True, {"clip_grad_norm": 0.5}),
    "adam_value_clip": (lambda p: Adam(p, lr=1e-3), False, {"clip_grad_value": 0.05}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_matches_eager_after_1000_steps(case):
    factory, schedule, kw = CASES[case]
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:1000]
    eager = make(EagerEngine, factory, schedule=schedule, **kw)
    compiled = make(CompiledEngine, factory, schedule=schedule, **kw)
    eager.run_samples(order)
    compiled.run_samples(order)
    # A fallback to eager would make this test meaningless.
    assert compiled._fns and compiled.fallback_reason is None
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p_e, p_c in zip(eager.params, compiled.params):
        for key, value in eager.optimizer.state[p_e].items():
            torch.testing.assert_close(compiled.optimizer.state[p_c][key], value, rtol=1e-5, atol=1e-6)
    if schedule:
        assert compiled.scheduler.last_epoch == eager.scheduler.last_epoch == 1000
        assert compiled.optimizer.param_groups[0]["lr"] == pytest.approx(eager.optimizer.param_groups[0]["lr"])
    se, sc = eager.read(), compiled.read()
    assert sc["steps"] == se["steps"] == 1000
    assert sc["loss"] == pytest.approx(se["loss"], rel=1e-4)
    assert sc["grad_norm"] == pytest.approx(se["grad_norm"], rel=1e-4)
    assert sc["grad_norm_max"] == pytest.approx(se["grad_norm_max"], rel=1e-4)


class PlainSGD(torch.optim.Optimizer):
    """``p -= lr * grad``; subclasses add their own state handling in ``update``."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, self.state[p], group)

    def update(self, p, state, group):
        p.add_(p.grad * -group["lr"])


class IntStepSGD(PlainSGD):
    """Keeps a Python int in its state: cannot be traced into a compiled step."""

    def update(self, p, state, group):
        state["n"] = state.get("n", 0) + 1
        super().update(p, state, group)


def test_untraceable_optimizer_falls_back_to_eager_with_one_warning():
    engine = make(CompiledEngine, lambda p: IntStepSGD(p))
    reference = make(EagerEngine, lambda p: IntStepSGD(p))
    order = torch.arange(100)
    with pytest.warns(UserWarning, match="falls back to eager: optimizer state 'n' is a int") as record:
        engine.run_samples(order)
        engine.run_samples(order)
    assert len(record) == 1
    reference.run_samples(order)
    reference.run_samples(order)
    for a, b in zip(reference.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a)


class SharedStepSGD(PlainSGD):
    """Counts steps in one tensor shared by all parameters' state."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr)
        self.shared = torch.zeros(())

    def update(self, p, state, group):
        state.setdefault("step", self.shared).add_(1)
        super().update(p, state, group)


def test_state_shared_between_parameters_falls_back_with_the_reason():
    engine = make(CompiledEngine, lambda p: SharedStepSGD(p))
    reference = make(EagerEngine, lambda p: SharedStepSGD(p))
    order = torch.arange(100)
    with pytest.warns(UserWarning, match="state 'step' of parameter 1 shares its memory with optimizer state 'step'"):
        engine.run_samples(order)
    reference.run_samples(order)
    assert float(engine.optimizer.shared) == float(reference.optimizer.shared) == 200  # two tensors x 100 steps
    for a, b in zip(reference.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b, a)


class FlatMomentumSGD(PlainSGD):
    """Momentum buffers as disjoint slices of one flat tensor."""

    def update(self, p, state, group):
        if "buf" not in state:
            if not hasattr(self, "flat"):
                self.flat, self.used = torch.zeros(sum(q.numel() for g in self.param_groups for q in g["params"])), 0
            state["buf"] = self.flat[self.used : self.used + p.numel()].view_as(p)
            self.used += p.numel()
        state["buf"].mul_(0.9).add_(p.grad)
        p.add_(state["buf"] * -group["lr"])


def test_state_in_slices_of_one_buffer_compiles_as_batch_steps_only():
    per_sample = make(CompiledEngine, lambda p: FlatMomentumSGD(p))
    with pytest.warns(UserWarning, match="'buf' of parameter 1 and optimizer state 'buf' of parameter 0 are slices"):
        per_sample.run_samples(torch.arange(100))
    eager = make(EagerEngine, lambda p: FlatMomentumSGD(p))
    batched = make(CompiledEngine, lambda p: FlatMomentumSGD(p), batch_shape=(1, 8))
    for step in range(10):
        eager.run_batch([torch.arange(8) + 8 * step])
        batched.run_batch([torch.arange(8) + 8 * step])
    assert batched.fallback_reason is None and (1, 1, 8) in batched._fns
    for a, b in zip(eager.model.parameters(), batched.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert batched.optimizer.state[batched.params[1]]["buf"]._base is batched.optimizer.flat  # still slices


class HistorySGD(PlainSGD):
    """Appends each step's gradient norm to a state tensor that grows."""

    def update(self, p, state, group):
        state["hist"] = torch.cat([state.get("hist", torch.zeros(0)), p.grad.norm()[None]])
        super().update(p, state, group)


def test_state_that_changes_shape_falls_back_with_the_reason():
    # A mini-batch step is compiled without a loop, so nothing else would catch the mismatch.
    engine = make(CompiledEngine, lambda p: HistorySGD(p), batch_shape=(1, 8))
    with pytest.warns(UserWarning, match=r"the step turns optimizer state 'hist' of parameter 0 from torch.float32"):
        for step in range(4):
            engine.run_batch([torch.arange(8) + 8 * step])
    assert engine.fallback_reason is not None
    assert [len(s["hist"]) for s in engine.optimizer.state.values()] == [4, 4]


def test_non_finite_sample_is_masked_in_compiled_chunk():
    split = classification_split(n=64)
    split.inputs = split.inputs.float()
    split.inputs[50, 0] = float("nan")  # in the third chunk: the first two run eagerly
    torch.manual_seed(0)
    model = nn.Linear(20, 5)
    engine = CompiledEngine(model=model, loss_fn=loss_for("classification"), optimizer=Adam(model.parameters(), lr=1e-2),
                            scheduler=None, train=split, chunk_size=16)  # fmt: skip
    engine.run_samples(torch.arange(64))
    assert engine.fallback_reason is None
    stats = engine.read()
    assert stats["skipped_steps"] == 1 and stats["steps"] == 64
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for s in engine.optimizer.state.values() for v in s.values())


def _recipe(engine: CompiledEngine) -> str:
    return _cache.recipe_key((32, 1, 1), (), model=engine.model, optimizer=engine.optimizer, params=engine.params,
                             train=engine.train, loss_fn=engine.loss_fn, rule=engine.rule, configs={})  # fmt: skip


def test_second_build_loads_the_cached_package(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    first = make(CompiledEngine, lambda p: SGD(p, lr=0.05, momentum=0.9))
    graphs = counters["stats"]["unique_graphs"]
    first.run_samples(torch.arange(100))
    assert first.fallback_reason is None and not first.cache_hit
    assert counters["stats"]["unique_graphs"] == graphs  # the chunk's scan is exported without Dynamo
    # Inductor's check of the CPU's vector ISAs is remembered once it passed them all.
    record = _cache.vec_isa_record()
    assert record is None or record.exists() == compat.vec_isas_all_passed()
    assert len(list((tmp_path / "compiled").glob("chunk-*.pt2"))) == 1
    assert len(list((tmp_path / "compiled").glob("recipe-*.txt"))) == 1
    second = make(CompiledEngine, lambda p: SGD(p, lr=0.05, momentum=0.9))
    # The recipe names the package: the second build neither traces nor compiles.
    monkeypatch.setattr(_trace, "trace_step", lambda *a: pytest.fail("traced despite a known recipe"))
    second.run_samples(torch.arange(100))
    assert second.cache_hit and second.fallback_reason is None
    monkeypatch.undo()
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A different hyper-parameter is a different graph: no stale package is reused.
    third = make(CompiledEngine, lambda p: SGD(p, lr=0.05, momentum=0.5))
    third.run_samples(torch.arange(100))
    assert not third.cache_hit
    # A different base lr is the same graph (lrs are an input): same recipe, no compile.
    fourth = make(CompiledEngine, lambda p: SGD(p, lr=0.01, momentum=0.9))
    assert _recipe(fourth) == _recipe(first)
    assert _recipe(make(CompiledEngine, lambda p: SGD(p, lr=0.05, momentum=0.9), clip_grad_norm=1.0)) != _recipe(first)


def test_recipe_naming_a_missing_package_traces_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    first = make(CompiledEngine, lambda p: SGD(p, lr=0.05))
    first.run_samples(torch.arange(100))
    (package,) = (tmp_path / "compiled").glob("chunk-*.pt2")
    package.unlink()
    second = make(CompiledEngine, lambda p: SGD(p, lr=0.05))
    second.run_samples(torch.arange(100))
    assert not second.cache_hit and second.fallback_reason is None and package.exists()
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_minibatch_with_accumulation_matches_eager():
    batches = torch.randperm(1200, generator=torch.Generator().manual_seed(2))[:960].view(-1, 2, 8)  # 60 steps
    shape = {"batch_shape": (2, 8)}
    eager = make(EagerEngine, lambda p: Adam(p, lr=1e-2), clip_grad_norm=0.3)
    compiled = make(CompiledEngine, lambda p: Adam(p, lr=1e-2), clip_grad_norm=0.3, **shape)
    for step in batches:
        eager.run_batch(list(step))
        compiled.run_batch(list(step))
    compiled.run_batch([torch.arange(5)])  # a short last batch: eager, same rule
    eager.run_batch([torch.arange(5)])
    assert compiled.fallback_reason is None and (1, 2, 8) in compiled._fns
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    se, sc = eager.read(), compiled.read()
    assert sc["steps"] == se["steps"] == 61
    assert sc["loss"] == pytest.approx(se["loss"], rel=1e-5)


def test_minibatch_linear_layers_compile_as_mm_plus_a_fusable_bias_add(monkeypatch, tmp_path):
    """A non-tiny ``addmm`` reaches Inductor's lowering as ``mm`` + ``add``, with eager's numbers."""
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))  # compile here, not load a cached package
    seen = []
    real = _aoti._UnfusedBias.__call__

    def spy(self, graph):
        count = lambda: len(graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default))
        before = count()
        real(self, graph)
        seen.append((before, count()))

    monkeypatch.setattr(_aoti._UnfusedBias, "__call__", spy)
    mlp = lambda: nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))  # 64x20x64: not tiny
    shape = {"batch_shape": (1, 64)}
    eager = make(EagerEngine, lambda p: Adam(p, lr=1e-2), model_factory=mlp, clip_grad_norm=0.5)
    compiled = make(CompiledEngine, lambda p: Adam(p, lr=1e-2), model_factory=mlp, clip_grad_norm=0.5, **shape)
    batches = torch.randperm(1200, generator=torch.Generator().manual_seed(4))[:1152].view(-1, 1, 64)  # 18 steps
    for step in batches:
        eager.run_batch(list(step))
        compiled.run_batch(list(step))
    assert compiled.fallback_reason is None and (1, 1, 64) in compiled._fns
    assert seen and seen[0][0] >= 1 and seen[0][1] == 0  # the forward's addmm became mm + add
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,device", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"), (torch.float32, "meta")])
def test_unfused_bias_pass_only_for_full_precision_cpu_addmm(dtype, device):
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    bias, x, w = (torch.randn(s, generator=g).to(dtype) for s in ((64,), (32, 48), (48, 64)))
    gm = make_fx(lambda b, x, w: torch.ops.aten.addmm(b, x, w))(*(t.to(device) for t in (bias, x, w)))
    _aoti.UNFUSED_BIAS(gm.graph)
    gm.recompile()
    left = len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default))
    assert left == (0 if (dtype, device) == (torch.float32, "cpu") else 1)  # bf16: mm would round first
    if device == "cpu":
        torch.testing.assert_close(gm(bias, x, w), torch.addmm(bias, x, w))


class ScaledSGD(PlainSGD):
    """Reads a tensor attribute in step(): a constant of the traced step."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr)
        self.scale = torch.tensor([0.5, 0.25])

    def update(self, p, state, group):
        p.add_(p.grad * -group["lr"] * self.scale.sum())


def test_step_reading_constants_falls_back_with_the_reason():
    # An optimizer's tensor attribute (mini-batch: one step, no scan to refuse it) and a frozen
    # layer (per-sample chunk) would be fixed at their compile-time values in a compiled step.
    def build(engine_cls, frozen, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 5))
        model[0].requires_grad_(not frozen)
        opt = ScaledSGD([p for p in model.parameters() if p.requires_grad])
        return engine_cls(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None,
                          train=classification_split(), **kw)  # fmt: skip

    for frozen, kw in ((False, {"batch_shape": (1, 8)}), (True, {"chunk_size": 32})):
        eager, compiled = build(EagerEngine, frozen), build(CompiledEngine, frozen, **kw)
        with pytest.warns(UserWarning, match="the step reads tensors that are neither trainable parameters nor"):
            for step in range(8):
                idx = torch.arange(32) + 32 * step
                for engine in (eager, compiled):
                    engine.run_batch([idx[:8]]) if "batch_shape" in kw else engine.run_samples(idx)
        for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
            torch.testing.assert_close(b, a)


def test_cuda_graph_engine_needs_cuda():
    from singlestep.engine import CudaGraphEngine
    from singlestep.errors import ConfigError

    with pytest.raises(ConfigError, match="'cuda_graph' needs a CUDA device"):
        make(CudaGraphEngine, lambda p: SGD(p, lr=0.1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager_on_gpu():
    from singlestep.engine import CudaGraphEngine

    def on_gpu(engine_cls):
        torch.manual_seed(0)
        split = classification_split().to(torch.device("cuda"))
        model = nn.Linear(20, 5).cuda()
        opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
        extra = {"chunk_size": 32} if engine_cls is CudaGraphEngine else {}
        return engine_cls(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None,
                          train=split, clip_grad_norm=0.5, **extra)  # fmt: skip

    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:1000].cuda()
    eager, graphed = on_gpu(EagerEngine), on_gpu(CudaGraphEngine)
    eager.run_samples(order)
    graphed.run_samples(order)
    assert graphed.fallback_reason is None and graphed._fns
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert graphed.read()["loss"] == pytest.approx(eager.read()["loss"], rel=1e-4)


FOREACH_CALLS = [
    ("_foreach_add", lambda a, b: (a, b), {"alpha": 0.5}),
    ("_foreach_add", lambda a, b: (a, 2.0), {}),
    ("_foreach_add_", lambda a, b: (a, torch.tensor(3.0)), {}),
    ("_foreach_mul", lambda a, b: (a, [2.0, -1.0]), {}),
    ("_foreach_mul_", lambda a, b: (a, [torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0)]), {}),
    ("_foreach_lerp_", lambda a, b: (a, b, 0.1), {}),
    ("_foreach_addcmul_", lambda a, b: (a, b, b, 0.25), {}),
    ("_foreach_addcdiv_", lambda a, b: (a, b, [t.abs() + 1 for t in b], 0.5), {}),
    ("_foreach_addcmul_", lambda a, b: (a, b, b), {"value": -2.0}),
    ("_foreach_sqrt", lambda a, b: ([t.abs() for t in a],), {}),
    ("_foreach_div_", lambda a, b: (a, [t.abs() + 1 for t in b]), {}),
    ("_foreach_maximum_", lambda a, b: (a, b), {}),
    ("_foreach_neg", lambda a, b: (a,), {}),
    ("_foreach_sign", lambda a, b: (a,), {}),
    ("_foreach_clamp_min_", lambda a, b: (a, -0.1), {}),
    ("_foreach_norm", lambda a, b: (a,), {}),
    ("_foreach_norm", lambda a, b: (a, 1), {}),
    ("_foreach_copy_", lambda a, b: (a, b), {}),
    ("_foreach_zero_", lambda a, b: (a,), {}),
    ("_foreach_pow", lambda a, b: ([t.abs() for t in a], 2.0), {}),
]


@pytest.mark.parametrize("name,make,kwargs", FOREACH_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(FOREACH_CALLS)])
def test_foreach_decompositions_match_foreach_ops(name, make, kwargs):
    """The compiled trace spells ``_foreach`` ops out per tensor; both must give the same numbers."""
    from singlestep.engine._trace import _foreach_decompositions

    table = _foreach_decompositions()

    def fresh():
        torch.manual_seed(0)
        a, b = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
        return a, make(a, b)

    packet = getattr(torch.ops.aten, name)
    for overload in packet.overloads():  # the overload torch's dispatcher picks for these arguments
        op = getattr(packet, overload)
        a1, args1 = fresh()
        try:
            out1 = op(*args1, **kwargs)
        except (RuntimeError, TypeError):
            continue
        break
    else:
        pytest.fail(f"no overload of {name} takes these arguments")
    a2, args2 = fresh()
    out2 = table[op](*args2, **kwargs)
    if name.endswith("_"):
        assert out2 is None
        out1, out2 = a1, a2
    assert len(out1) == len(out2) == 2
    for x, y in zip(out1, out2):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_auto_times_several_eager_chunks_and_keeps_the_fastest(tmp_path, monkeypatch):
    """The chunks after the warm-up still run slower than the steady state: the fastest of four counts."""
    import types

    import singlestep.engine.compiled as compiled_module

    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    clock = [0.0]
    monkeypatch.setattr(compiled_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    seconds = iter([0.9, 0.3, 0.5, 0.4])  # scripted durations of the timed chunks
    calls: list[int] = []

    def fake_eager(self, idx):  # the warm-up chunk takes no time, each timed one its scripted time
        if calls:
            clock[0] += next(seconds)
        calls.append(len(idx))

    monkeypatch.setattr(EagerEngine, "run_samples", fake_eager)
    engine = make(CompiledEngine, lambda p: SGD(p, lr=0.05), auto=True, total_steps=160)
    engine.run_samples(torch.arange(32 * 5))
    assert calls == [32] * 5  # a warm-up chunk, then four timed ones
    assert engine.policy.eager_step_seconds[(32, 1, 1)] == pytest.approx(0.3 / 32)
    assert engine.choice == "eager"  # 160 steps repay nothing


def test_auto_compiles_only_when_the_steps_left_repay_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    timed: list[int] = []

    def fixed_timing(self, shape, steps, runs):  # a machine-independent eager cost: 200 us/step
        timed.append(self.steps_done)
        for run in runs:
            run()
            self.steps_done += steps
        self.policy.eager_step_seconds[shape] = 200e-6

    monkeypatch.setattr(CompiledEngine, "_timed_eager", fixed_timing)
    lines: list[str] = []
    # 1,000 steps: ~0.2 s of eager steps cannot repay even loading a cached package.
    short = make(CompiledEngine, lambda p: SGD(p, lr=0.05), auto=True, total_steps=1000, log=lines.append)
    short.run_samples(torch.arange(1000))
    assert timed == [32]  # the second chunk is timed, after a warm-up chunk
    assert short.choice == "eager" and short.label == "auto (eager)" and not short._fns.get((32, 1, 1))
    assert not list(tmp_path.glob("compiled/chunk-*.pt2"))
    assert any(line.startswith("engine auto: eager") and "would not pay off" in line for line in lines)
    # 40,000 steps (~7 s to gain) would repay a cached package but not a cold compile (>= ~8.5 s),
    # so with no package for this recipe it stays eager without tracing the step.
    lines.clear()
    mid = make(CompiledEngine, lambda p: SGD(p, lr=0.05), auto=True, total_steps=40_000, log=lines.append)
    with monkeypatch.context() as m:
        m.setattr(_trace, "trace_step", lambda *a, **k: pytest.fail("traced the step"))
        mid.run_samples(torch.arange(1000))
    assert mid.choice == "eager" and mid.fallback_reason is None
    assert any("no cached package" in line and "would not pay off" in line for line in lines)
    # 2,000,000 steps (~400 s eager) repay a compile of ~12 s.
    lines.clear()
    long = make(CompiledEngine, lambda p: SGD(p, lr=0.05), auto=True, total_steps=2_000_000, log=lines.append)
    long.run_samples(torch.arange(1000))
    assert long.choice == "compiled" and long.label == "auto (compiled)" and long.fallback_reason is None
    assert any(line.startswith("engine auto: compiled, using compiling") for line in lines)
    assert len(list(tmp_path.glob("compiled/chunk-*.pt2"))) == 1
    # Now the recipe is known: the same 40,000 steps load the package.
    lines.clear()
    again = make(CompiledEngine, lambda p: SGD(p, lr=0.05), auto=True, total_steps=40_000, log=lines.append)
    again.run_samples(torch.arange(1000))
    assert again.choice == "compiled" and again.cache_hit
    assert any(line.startswith("engine auto: compiled, using a cached package") for line in lines)
