"""The conformance checks of ``singlestep.optim.testing``: named, all run, all reported.

Fast tests cover the report (every failing property listed with its message, a check that raises
recorded as that check's failure, slow checks skipped unless asked) and the compiled-engine
check's decision on stand-in engines; the ``slow`` ones compile for real.
"""

from __future__ import annotations

import re

import pytest
import torch

import singlestep.engine
from singlestep.engine import EagerEngine
from singlestep.optim import SGD
from singlestep.optim.testing import CHECKS, check_optimizer, run_checks


class _Base(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, {"lr": lr})


class AscendsAndWritesGrad(_Base):
    """Two faults: it climbs (descent) and turns p.grad into its sign in place (grad-untouched)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign_() * group["lr"])


class GroupCounterSGD(_Base):
    """A Python int step count in ``param_groups`` (as pytorch-optimizer's AdaBelief keeps)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            scale = 1.0 / (1.0 + 0.01 * group["step"])
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * (group["lr"] * scale))


def test_checks_have_unique_readable_names():
    names = [c.name for c in CHECKS]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names), names
    assert [c.name for c in CHECKS if c.slow] == ["compiled-engine"]


def test_a_broken_optimizer_reports_every_fault():
    report = run_checks(AscendsAndWritesGrad, {"lr": 0.01})
    assert [r.name for r in report.failures] == ["grad-untouched", "descent"]
    assert report["grad-untouched"].message == "step() replaced or modified p.grad"
    assert re.match(r"loss [\d.]+ -> [\d.]+ after 200 steps", report["descent"].message)
    assert report["param-groups"].status == report["bf16"].status == "pass"  # the rest ran
    assert str(report).splitlines()[0] == "AscendsAndWritesGrad(lr=0.01): 2 of 10 checks failed"

    with pytest.raises(AssertionError) as info:
        check_optimizer(AscendsAndWritesGrad, lr=0.01)
    lines = str(info.value).splitlines()
    assert lines[0] == "AscendsAndWritesGrad(lr=0.01) failed 2 of 10 conformance checks:"
    assert lines[1] == "  failed 'grad-untouched': step() replaced or modified p.grad"
    assert lines[2].startswith("  failed 'descent': loss ")


def test_a_check_that_raises_is_recorded_and_the_others_still_run():
    class NoBf16(SGD):
        @torch.no_grad()
        def step(self, closure=None):
            if any(p.dtype == torch.bfloat16 for g in self.param_groups for p in g["params"]):
                raise RuntimeError("no bf16 here")
            return super().step(closure)

    class BadEval(SGD):
        def eval(self):
            raise RuntimeError("eval is broken")

        def train(self):
            pass

    report = run_checks(NoBf16, {"lr": 0.1})
    assert [r.name for r in report.failures] == ["bf16"]
    assert "RuntimeError('no bf16 here')" in report["bf16"].message
    report = run_checks(BadEval, {"lr": 0.1})
    assert [(r.name, r.message) for r in report.failures] == [("eval-train", "raised RuntimeError('eval is broken')")]


def test_slow_checks_are_skipped_unless_asked():
    report = check_optimizer(SGD, lr=0.1)
    assert report.ok and report["compiled-engine"].status == "skip"
    assert report["eval-train"].status == "skip"  # SGD has no eval()/train()
    assert [r.name for r in report.results] == [c.name for c in CHECKS]


def test_unknown_check_names_are_refused():
    with pytest.raises(ValueError, match=r"Invalid check name\(s\) \['descnet'\]; expected some of: invalid-lr, "):
        run_checks(SGD, {"lr": 0.1}, only=["descent", "descnet"])


# ----------------------------------------------------------------------------- compiled engine, stand-ins


class _FallsBack(EagerEngine):
    """Runs eagerly, as the compiled engine does once it has refused the optimizer."""

    def __init__(self, *args, chunk_size=64, **kwargs):
        super().__init__(*args, **kwargs)
        self.fallback_reason = None

    def run_samples(self, idx):
        self.fallback_reason = "optimizer state 'decay' is a float, not a tensor"
        super().run_samples(idx)


class _Drifts(_FallsBack):
    """Claims to have compiled, but its parameters end up elsewhere."""

    def run_samples(self, idx):
        EagerEngine.run_samples(self, idx)
        with torch.no_grad():
            self.params[0].mul_(1.01)


def test_compiled_check_passes_a_fall_back_with_its_reason(monkeypatch):
    monkeypatch.setattr(singlestep.engine, "CompiledEngine", _FallsBack)
    result = run_checks(SGD, {"lr": 0.05}, slow=True, only=["compiled-engine"])["compiled-engine"]
    assert (result.status, result.message) == ("pass", "runs eagerly: optimizer state 'decay' is a float, not a tensor")


def test_compiled_check_fails_results_that_differ_without_a_fall_back(monkeypatch):
    monkeypatch.setattr(singlestep.engine, "CompiledEngine", _Drifts)
    result = run_checks(SGD, {"lr": 0.05}, slow=True, only=["compiled-engine"])["compiled-engine"]
    assert result.status == "fail"
    assert re.match(r"after 200 per-sample steps the compiled engine's parameter 0 differs from eager steps' by "
                    r"[\d.e-]+ \(largest \|value\| [\d.]+\) and the engine did not fall back", result.message)  # fmt: skip


# ----------------------------------------------------------------------------- compiled engine, for real


@pytest.mark.slow
def test_python_counter_in_param_groups_is_reported_as_running_eagerly():
    report = run_checks(GroupCounterSGD, {"lr": 0.05}, slow=True)
    result = report["compiled-engine"]
    assert result.status == "pass" and report.ok
    assert result.message.startswith("runs eagerly: step() changes param_groups[0]['step']")
    assert "runs eagerly: step() changes param_groups[0]['step']" in str(report)


@pytest.mark.slow
def test_traceable_optimizer_compiles_and_matches():
    result = run_checks(SGD, {"lr": 0.05, "momentum": 0.9}, slow=True, only=["compiled-engine"])["compiled-engine"]
    assert (result.status, result.message) == (
        "pass", "compiles and matches eager steps over 200 per-sample steps (rtol 0.0001)")  # fmt: skip
