"""The loop and the eager engine: step semantics, clipping, accumulation, finite checks, state."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from singlestep.config import validate
from singlestep.data.base import TensorSplit
from singlestep.engine import EagerEngine
from singlestep.losses import loss_for
from singlestep.trainer import LoopState, Trainer
from tests.conftest import base_config


def train(tmp_path, **changes) -> Trainer:
    cfg = base_config(**changes)
    cfg["output"] = {"run_dir": str(tmp_path / "run"), "curves": False}
    trainer = Trainer(validate(cfg, "test.yaml"), out=open("/dev/null", "w"))
    trainer.fit()
    return trainer


def params_of(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_per_sample_equals_minibatch_of_one(tmp_path):
    a = train(tmp_path / "a", trainer={"mode": "per_sample", "epochs": 2, "log_every": 10, "progress": False})
    b = train(tmp_path / "b", trainer={"mode": "minibatch", "batch_size": 1, "epochs": 2, "log_every": 10, "progress": False})
    assert a.state.step == b.state.step == 128
    for pa, pb in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_accumulation_equals_the_larger_batch(tmp_path):
    big = train(tmp_path / "a", trainer={"mode": "minibatch", "batch_size": 16, "epochs": 2, "progress": False})
    acc = train(tmp_path / "b", trainer={"mode": "minibatch", "batch_size": 4, "grad_accum_steps": 4, "epochs": 2, "progress": False})
    assert big.state.step == acc.state.step == 8
    for pa, pb in zip(params_of(big), params_of(acc)):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_short_last_batch_is_a_step(tmp_path):
    t = train(tmp_path, data={"name": "synthetic_regression", "in_features": 2, "train_size": 10, "val_size": 0, "test_size": 0},
              trainer={"mode": "minibatch", "batch_size": 4, "epochs": 3, "progress": False})  # fmt: skip
    assert t.state.step == 9  # ceil(10 / 4) per epoch
    assert t.state.epoch == 3


def test_max_steps_stops_mid_epoch(tmp_path):
    t = train(tmp_path, trainer={"mode": "per_sample", "epochs": 5, "max_steps": 40, "progress": False, "log_every": 7})
    assert t.state.step == 40 and t.state.epoch == 0 and t.state.pos == 40
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [e["step"] for e in lines if e["event"] == "train"]
    assert train_steps == [7, 14, 21, 28, 35, 40]


class Recording(torch.optim.SGD):
    """SGD that remembers every gradient it was handed."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        self.seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        return super().step(closure)


def make_engine(x, y, clip=None, clip_value=None, check_finite=True):
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], y.shape[1])
    opt = Recording(model.parameters())
    engine = EagerEngine(model=model, loss_fn=loss_for("regression"), optimizer=opt, scheduler=None,
                         train=TensorSplit(x, y), clip_grad_norm=clip, clip_grad_value=clip_value,
                         check_finite=check_finite)  # fmt: skip
    return engine, opt


def test_clipping_caps_global_norm_and_logs_pre_clip():
    x = torch.full((4, 3), 10.0)
    y = torch.full((4, 1), -50.0)  # large residuals: large grads
    engine, opt = make_engine(x, y, clip=0.5)
    # Pre-clip norm of the first step, computed independently with torch's own utility.
    ref = nn.Linear(3, 1)
    ref.load_state_dict(engine.model.state_dict())
    loss_for("regression")(ref(x[:1]), y[:1]).backward()
    pre_clip = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    engine.run_samples(torch.arange(1))
    stats = engine.read()
    assert pre_clip > 5
    assert stats["grad_norm"] == pytest.approx(pre_clip, rel=1e-5)
    assert float(opt.seen[0]) == pytest.approx(0.5, rel=1e-4)
    engine.run_samples(torch.arange(4))
    assert all(float(n) <= 0.5 * (1 + 1e-4) for n in opt.seen)


def test_value_clipping_clamps_each_element():
    x = torch.full((2, 3), 10.0)
    y = torch.full((2, 1), -50.0)
    engine, opt = make_engine(x, y, clip_value=0.01)
    engine.run_samples(torch.arange(1))
    # 4 grad elements (3 weights + bias), each clamped to 0.01 in magnitude.
    assert float(opt.seen[0]) == pytest.approx((4 * 0.01**2) ** 0.5, rel=1e-4)


def test_non_finite_steps_are_skipped_and_counted():
    x = torch.tensor([[1.0], [float("nan")], [2.0]])
    y = torch.tensor([[1.0], [1.0], [2.0]])
    engine, opt = make_engine(x, y)
    engine.run_samples(torch.arange(3))
    stats = engine.read()
    assert len(opt.seen) == 2  # the optimizer never saw the NaN gradient
    assert stats["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())


def test_loop_state_round_trip():
    a = LoopState(seed=3)
    first = a.new_epoch(10).clone()
    a.step, a.pos = 4, 4
    saved = a.state_dict()
    second_a = a.new_epoch(10)
    b = LoopState(seed=99)
    b.load_state_dict(saved)
    assert torch.equal(b.order, first) and b.step == 4 and b.pos == 4
    assert torch.equal(b.new_epoch(10), second_a)


def test_orders_differ_per_epoch_and_depend_on_seed():
    s = LoopState(seed=0)
    e1, e2 = s.new_epoch(50).clone(), s.new_epoch(50).clone()
    assert not torch.equal(e1, e2)
    assert sorted(e1.tolist()) == list(range(50))
    assert torch.equal(LoopState(seed=0).new_epoch(50), e1)


def test_linear_regression_learns_the_true_map(tmp_path):
    train(tmp_path, data={"name": "synthetic_regression", "in_features": 4, "train_size": 512, "noise": 0.01},
          trainer={"mode": "per_sample", "epochs": 3, "progress": False, "log_every": 500})  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["test"]["r2"] > 0.99
    assert summary["steps"] == 3 * 512


def test_seed_example_predicts_five(tmp_path):
    from singlestep.config import load_config

    cfg = load_config("configs/seed_example.yaml", [f"output.run_dir={tmp_path / 'run'}", "trainer.progress=false"])
    t = Trainer(cfg, out=open("/dev/null", "w"))
    t.fit()
    with torch.no_grad():
        prediction = float(t.model(torch.tensor([[5.0]])))
    assert prediction == pytest.approx(5.0, abs=0.05)
