"""``torch.compile(fullgraph=True)`` traces every optimizer's ``step()``: no graph break, no recompile.

The compiled engine relies on this: state created lazily as tensors, a float32 ``step`` tensor, a
0-dim tensor lr that schedulers fill in place, and no ``.item()`` or branching on tensor values.
The fast tests use the ``aot_eager`` backend (Dynamo + AOTAutograd functionalisation, no C++
compiler); the inductor test is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from singlestep.registry import OPTIMIZERS, load_builtins

load_builtins()

_KWARGS = {
    "sgd": {"momentum": 0.9, "dampening": 0.1},
    "adam": {"amsgrad": True, "weight_decay": 0.1},
    "rmsprop": {"momentum": 0.9, "centered": True},
    "schedule_free_adamw": {"warmup_steps": 3},
}


def _compiled_matches_eager(name: str, backend: str, steps: int = 4) -> None:
    torch._dynamo.reset()
    counters.clear()
    cls, kwargs = OPTIMIZERS.get(name), _KWARGS.get(name, {})
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    lr, twin_lr = torch.tensor(0.01), torch.tensor(0.01)
    opt, ref = cls(params, **kwargs, lr=lr), cls(twins, **kwargs, lr=twin_lr)

    @torch.compile(fullgraph=True, backend=backend)
    def compiled_step() -> None:
        opt.step()

    for i in range(steps):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        compiled_step()  # fullgraph=True: any graph break raises here
        ref.step()
        lr.fill_(0.01 * (i + 2))  # what a scheduler does between steps
        twin_lr.fill_(0.01 * (i + 2))
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, "the step recompiled (state creation or an lr change)"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_step_traces_in_one_graph(name):
    _compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_step_compiles_with_inductor(name):
    _compiled_matches_eager(name, "inductor")
