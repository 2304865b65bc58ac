"""Every fast path against its plain path, and every private-API probe turned off.

A fast path is only as good as its guard: each switch in ``singlestep.fastpaths`` is turned off
here and the run compared with the default one; each probe in ``singlestep._compat`` is turned off
and the engines still give the same numbers through the public APIs.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from singlestep import _compat as compat
from singlestep.data.base import TensorSplit
from singlestep.engine import CompiledEngine, EagerEngine
from singlestep.fastpaths import FAST, FastPaths, plain
from singlestep.losses import loss_for
from singlestep.models.linear import Linear
from singlestep.optim import SGD, Adam

# Switches whose plain path computes the very same numbers; the fused kernels differ in last bits
# (as torch's fused=True differs from foreach=True).
_BIT_IDENTICAL = {"closed_form", "direct_backward", "bare_step", "host_arithmetic", "one_thread"}


def _split() -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (600, 20), generator=g, dtype=torch.uint8)
    y = ((x.float() / 255 - 0.5) @ torch.randn(20, 5, generator=g)).argmax(1)
    return TensorSplit(x, y, mean=0.5, std=0.3)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return Linear(20, 5)  # the closed form's model
    return nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 5))


def _run(engine_cls, kind: str, opt_cls=Adam, n: int = 300, **kw) -> tuple[list[torch.Tensor], dict]:
    model = _model(kind)
    opt = opt_cls(model.parameters(), lr=0.01)
    engine = engine_cls(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None,
                        train=_split(), clip_grad_norm=0.5, **kw)  # fmt: skip
    engine.run_samples(torch.randperm(600, generator=torch.Generator().manual_seed(1))[:n])
    return [p.detach().clone() for p in model.parameters()], engine.read()


def test_every_switch_is_listed_with_its_tolerance():
    assert {f.name for f in fields(FastPaths)} == _BIT_IDENTICAL | {"fused_kernels"}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("name", sorted(f.name for f in fields(FastPaths)))
def test_plain_path_gives_the_fast_paths_numbers(name, kind):
    fast, fast_stats = _run(EagerEngine, kind)
    with plain(name):
        assert getattr(FAST, name) is False
        slow, slow_stats = _run(EagerEngine, kind)
    assert getattr(FAST, name) is True  # restored
    tol = dict(rtol=0, atol=0) if name in _BIT_IDENTICAL else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(b, a, **tol)
    assert slow_stats["loss"] == pytest.approx(fast_stats["loss"], rel=1e-6)


def test_switches_are_read_when_the_engine_is_built():
    with plain("closed_form", "host_arithmetic"):
        model = _model("linear")
        engine = EagerEngine(model=model, loss_fn=loss_for("classification"),
                             optimizer=SGD(model.parameters(), lr=0.1), scheduler=None, train=_split())  # fmt: skip
    assert engine._closed is None and type(engine.ops).__name__ == "_DeviceOps"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_every_probe_off_gives_the_same_eager_numbers(kind):
    fast, _ = _run(EagerEngine, kind, opt_cls=SGD)
    with compat.probes_off():
        slow, _ = _run(EagerEngine, kind, opt_cls=SGD)
    # Without the 'host_scalars' probe nothing proves the step is untraced, so our optimizers keep
    # their foreach formula instead of the fused kernel: last-bit differences, as fused_kernels off.
    for a, b in zip(fast, slow):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with compat.probes_off(*(name for name in compat.PROBES if name != "host_scalars")):
        same, _ = _run(EagerEngine, kind, opt_cls=SGD)
    for a, b in zip(fast, same):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_engine_with_every_probe_off_still_compiles_and_matches(tmp_path, monkeypatch):
    """The public paths (torch's scan wrapper, aoti_load_package, the package's own __call__)."""
    monkeypatch.setenv("SINGLESTEP_CACHE", str(tmp_path))
    eager, _ = _run(EagerEngine, "linear", opt_cls=SGD, n=400)
    with compat.probes_off():
        compiled, stats = _run(CompiledEngine, "linear", opt_cls=SGD, n=400, chunk_size=32)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert stats["steps"] == 400
    assert list((tmp_path / "compiled").glob("chunk-*.pt2"))  # it did compile, not fall back


@pytest.mark.parametrize("probe", sorted(compat.PROBES))
def test_each_probe_off_alone_gives_the_same_eager_numbers(probe):
    fast, _ = _run(EagerEngine, "mlp", opt_cls=SGD, n=100)
    with compat.probes_off(probe):
        slow, _ = _run(EagerEngine, "mlp", opt_cls=SGD, n=100)
    tol = dict(rtol=1e-5, atol=1e-6) if probe == "host_scalars" else dict(rtol=0, atol=0)  # see above
    for a, b in zip(fast, slow):
        torch.testing.assert_close(b, a, **tol)


def test_probes_off_is_reported_once(caplog):
    caplog.set_level("INFO", logger="singlestep.compat")
    compat._REPORTED.discard("grad_mode")
    with compat.probes_off("grad_mode"):
        assert compat.call_without_grad(torch.is_grad_enabled) is False
        assert compat.call_without_grad(torch.is_grad_enabled) is False
    lines = [r.getMessage() for r in caplog.records if "'grad_mode'" in r.getMessage()]
    assert len(lines) == 1 and "public path runs instead" in lines[0]


# Any torch._name except the _foreach_/_fused_ kernels torch.optim itself calls, private modules
# anywhere under torch, and the private attributes of torch objects the engines once touched.
_PRIVATE = re.compile(
    r"torch(\.\w+)*\._(?!foreach_|fused_)[A-Za-z]|_execution_engine|__wrapped__|\._step_count|\._last_lr"
    r"|torch\.fx\.experimental|_global_optimizer|_optimizer_step_p"
)


def test_private_torch_names_only_in_the_compat_module():
    root = Path(__file__).resolve().parents[1] / "singlestep"
    hits = [f"{path.relative_to(root)}:{i}: {line.strip()}"
            for path in sorted(root.rglob("*.py")) if path.name != "_compat.py"
            for i, line in enumerate(path.read_text().splitlines(), 1) if _PRIVATE.search(line)]  # fmt: skip
    assert hits == []


def test_no_source_file_over_500_lines():
    root = Path(__file__).resolve().parents[1] / "singlestep"
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
