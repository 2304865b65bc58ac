"""Every registered optimizer runs in the compiled engine and matches its eager steps.

The compiled engine claims to take any optimizer in torch.optim's shape; this holds it to that
for each one we ship, on an MLP (matrices and biases, so Muon's fallback is exercised too).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singlestep.engine import CompiledEngine, EagerEngine
from singlestep.losses import loss_for
from singlestep.registry import OPTIMIZERS, load_builtins
from tests.test_engine_compiled import classification_split
from tests.test_optim import OPTIM_TABLE

load_builtins()


def run(engine_cls, name: str, kwargs: dict, order: torch.Tensor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 5))
    opt = OPTIMIZERS.get(name)(model.parameters(), **kwargs)
    extra = {"chunk_size": 16} if engine_cls is CompiledEngine else {}
    engine = engine_cls(model=model, loss_fn=loss_for("classification"), optimizer=opt, scheduler=None,
                        train=classification_split(), clip_grad_norm=1.0, **extra)  # fmt: skip
    engine.run_samples(order)
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_registered_optimizer_compiles_and_matches_eager(name):
    kwargs = OPTIM_TABLE[name].conformance[-1]
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(3))[:200]
    eager = run(EagerEngine, name, kwargs, order)
    if name == "muon":
        # Newton-Schulz runs in bfloat16, which Inductor computes in float32 between roundings, and
        # the sign-based fallback (lion here) turns those last-bit differences into whole steps.
        # The first compiled chunk's check sees that and the run stays eager, bit for bit, saying so.
        with pytest.warns(UserWarning, match=r"compiled step's parameter \d+ differs from eager steps' by"):
            compiled = run(CompiledEngine, name, kwargs, order)
        assert compiled.fallback_reason is not None and not compiled._fns
        for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        return
    compiled = run(CompiledEngine, name, kwargs, order)
    assert compiled.fallback_reason is None, compiled.fallback_reason
    assert compiled._fns
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
