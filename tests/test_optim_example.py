"""The user-optimizer example of docs/optimizers.md: SignSGD by dotted path, and the optimizer configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from singlestep.optim.testing import check_optimizer
from singlestep.registry import OPTIMIZERS, load_builtins

ROOT = Path(__file__).resolve().parents[1]
load_builtins()


def test_sign_sgd_passes_check_optimizer():
    from examples.my_optimizers import SignSGD

    check_optimizer(SignSGD, lr=0.01)
    check_optimizer(SignSGD, lr=0.01, weight_decay=0.1)


def test_check_optimizer_catches_a_broken_optimizer():
    from examples.my_optimizers import SignSGD

    class Ascends(SignSGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign() * group["lr"])  # wrong sign

    with pytest.raises(AssertionError, match="failed 'descent'"):
        check_optimizer(Ascends, lr=0.01)

    class WritesGrad(SignSGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign_() * -group["lr"])  # sign_ overwrites p.grad

    with pytest.raises(AssertionError, match="failed 'grad-untouched'"):
        check_optimizer(WritesGrad, lr=0.01)


def test_dotted_path_resolves_from_the_working_directory(monkeypatch):
    from examples.my_optimizers import SignSGD

    monkeypatch.chdir(ROOT)
    assert OPTIMIZERS.get("examples.my_optimizers:SignSGD") is SignSGD
    assert "examples.my_optimizers:SignSGD" not in OPTIMIZERS  # loaded, not registered


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compare").glob("*.yaml")) + [ROOT / "configs" / "sign_sgd.yaml"],
                         ids=lambda p: p.stem)  # fmt: skip
def test_optimizer_configs_validate(path, monkeypatch):
    from singlestep.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    if path.parent.name == "compare":
        assert cfg.optimizer.name == path.stem  # one file per registered optimizer
        assert cfg.data.name == "fashion_mnist" and cfg.model.name == "linear"


def test_every_optimizer_has_a_compare_config():
    have = {p.stem for p in (ROOT / "configs" / "compare").glob("*.yaml")}
    assert have == set(OPTIMIZERS.names())
