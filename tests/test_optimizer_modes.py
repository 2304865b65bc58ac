"""Optimizers with train() / eval() (schedule-free): the trainer's mode switches around steps,
evaluation and saving."""

from __future__ import annotations

import json

import pytest
import torch

import singlestep.trainer
from singlestep.config import validate
from singlestep.trainer import Trainer
from tests.conftest import ROOT, base_config, run_cli

CREATED: list[ModalSGD] = []


class ModalSGD(torch.optim.Optimizer):
    """Plain SGD with schedulefree's contract: starts in eval mode and refuses to step in it.

    ``eval()`` doubles the parameters and ``train()`` halves them back (exact in floating point),
    so the weights evaluated and saved show which mode the optimizer was in. Every switch, step,
    evaluation and save is recorded with the mode at that moment.
    """

    def __init__(self, params, lr: float = 0.05):
        super().__init__(params, {"lr": lr})
        self.mode = "eval"
        self.scaled = False
        self.log: list[tuple[str, str]] = []
        CREATED.append(self)

    def _record(self, event: str) -> None:
        if not (event == "step" and self.log and self.log[-1] == ("step", self.mode)):  # one entry per run of steps
            self.log.append((event, self.mode))

    @torch.no_grad()
    def train(self) -> None:
        if self.scaled:
            for group in self.param_groups:
                torch._foreach_div_(group["params"], 2.0)
            self.scaled = False
        self.mode = "train"
        self._record("train()")

    @torch.no_grad()
    def eval(self) -> None:
        if self.mode == "train":
            for group in self.param_groups:
                torch._foreach_mul_(group["params"], 2.0)
            self.scaled = True
        self.mode = "eval"
        self._record("eval()")

    @torch.no_grad()
    def step(self, closure=None):
        if self.mode != "train":
            raise RuntimeError("Optimizer was not in train mode when step is called")
        self._record("step")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def _train(tmp_path, name: str, monkeypatch=None, engine: str = "eager") -> Trainer:
    cfg = base_config(optimizer={"name": name, "lr": 0.05})
    cfg["trainer"].update(engine=engine, epochs=2, eval_every=40, chunk_size=8)
    cfg["output"] = {"curves": False, "run_dir": str(tmp_path / f"{name.rpartition(':')[2]}-{engine}")}
    trainer = Trainer(validate(cfg, "test.yaml"), out=open("/dev/null", "w"))
    if monkeypatch is not None:  # record the optimizer's mode whenever the trainer evaluates or saves
        evaluate, save = singlestep.trainer.evaluate, torch.save
        opt = trainer.optimizer
        def recorded(event, fn):
            return lambda *args, **kwargs: (opt._record(event), fn(*args, **kwargs))[1]

        monkeypatch.setattr(singlestep.trainer, "evaluate", recorded("evaluate", evaluate))
        monkeypatch.setattr(torch, "save", recorded("save", save))
    trainer.fit()
    return trainer


def test_trainer_steps_in_train_mode_and_evaluates_and_saves_in_eval_mode(tmp_path, monkeypatch):
    modal = _train(tmp_path, "tests.test_optimizer_modes:ModalSGD", monkeypatch)
    opt = modal.optimizer
    assert opt is CREATED[-1] and modal.state.step == 128
    # 128 steps with a val evaluation at steps 40, 80 and 120, the last checkpoint (in train mode:
    # the state a resumed run steps on), then the final evaluation (val, test) and model.pt.
    val_round = [("eval()", "eval"), ("evaluate", "eval"), ("train()", "train"), ("step", "train")]
    assert opt.log == (
        [("train()", "train"), ("step", "train")]
        + val_round * 3
        + [("save", "train")]
        + [("eval()", "eval"), ("evaluate", "eval"), ("evaluate", "eval"), ("save", "eval"), ("train()", "train")]
    )
    assert opt.mode == "train"
    # The steps are plain SGD's: the same weights as torch.optim.SGD after the same run, and
    # model.pt holds the eval-mode (doubled) weights.
    plain = _train(tmp_path, "torch.optim.SGD")
    for p, q in zip(modal.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved = torch.load(modal.run_dir / "model.pt", weights_only=True)
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(saved[key], 2 * value, rtol=0, atol=0)
    events = [json.loads(line) for line in (modal.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]  # it trains


def test_cli_trains_schedulefree_adamw(tmp_path):
    pytest.importorskip("schedulefree")
    result = run_cli("--config", str(ROOT / "configs" / "quickstart.yaml"),
                     "optimizer.name=schedulefree.AdamWScheduleFree", "trainer.epochs=1", "trainer.progress=false",
                     f"output.run_dir={tmp_path / 'run'}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: quickstart | 2,000 steps") and "val loss" in last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # noise 0.1: the best possible mean squared error is ~0.01; an untrained model is near 1.
    assert summary["final"]["val"]["loss"] < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["compiled", "auto"])
def test_eval_mode_optimizer_gives_eagers_numbers_under_every_engine(tmp_path, monkeypatch, engine):
    """ModalSGD reads its lr as alpha= (a host read when traced): the compiled engine runs it
    eagerly and says so; auto's short run stays eager. Either way, eager's weights."""
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path / "cache"))
    eager = _train(tmp_path, "tests.test_optimizer_modes:ModalSGD")
    if engine == "compiled":
        with pytest.warns(UserWarning, match=r"falls back to eager: .*test_optimizer_modes\.py:\d+"):
            other = _train(tmp_path, "tests.test_optimizer_modes:ModalSGD", engine=engine)
    else:
        other = _train(tmp_path, "tests.test_optimizer_modes:ModalSGD", engine=engine)
    assert other.optimizer.mode == "train" and other.state.step == eager.state.step == 128
    for p, q in zip(eager.model.parameters(), other.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
