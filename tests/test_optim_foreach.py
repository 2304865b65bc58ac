"""The ``_foreach`` and fused paths of sgd / adam / adagrad compute the same numbers as their per-tensor loops."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from singlestep.optim import adagrad as adagrad_mod
from singlestep.optim import adam as adam_mod
from singlestep.optim import sgd as sgd_mod
from singlestep.optim._foreach import _foreach_ok, _fused_cpu_ok, _host_scalars_ok
from singlestep.optim.adamw import AdamW

CASES = [
    (sgd_mod, "SGD", {"lr": 0.1}),
    (sgd_mod, "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (sgd_mod, "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    (adam_mod, "Adam", {"lr": 0.01}),
    (adam_mod, "Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    (adam_mod, "AdamW", {"lr": 0.01, "weight_decay": 0.1}),  # AdamW runs adam.adam
    (adagrad_mod, "Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
]


def _run(module, cls_name: str, kwargs: dict, monkeypatch, path: str, lr_tensor: bool, dtype=torch.float32) -> list[torch.Tensor]:
    with monkeypatch.context() as m:
        if path != "fused":
            m.setattr(module, "_fused_cpu_ok", lambda *lists, **kw: False)
        if path == "loop":
            m.setattr(module, "_foreach_ok", lambda *lists: False)
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((4, 3), (3,), (2, 2, 2))]
        kw = dict(kwargs, lr=torch.tensor(kwargs["lr"])) if lr_tensor else kwargs
        cls = AdamW if cls_name == "AdamW" else getattr(module, cls_name)
        opt = cls(params, **kw)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1) + i)
            opt.step()
        return [p.detach().clone() for p in params]


@pytest.mark.parametrize("path", ["foreach", "fused", "fused-float64"])
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_foreach_and_fused_paths_match_loop(case, lr_tensor, path, monkeypatch):
    module, cls_name, kwargs = case
    dtype = torch.float64 if path.endswith("float64") else torch.float32
    path = path.split("-")[0]
    looped = _run(module, cls_name, kwargs, monkeypatch, "loop", lr_tensor=lr_tensor, dtype=dtype)
    other = _run(module, cls_name, kwargs, monkeypatch, path, lr_tensor=lr_tensor, dtype=dtype)
    moved = [not torch.equal(a, b) for a, b in zip(looped, _run(module, cls_name, dict(kwargs, lr=0.0), monkeypatch, path, False, dtype))]  # fmt: skip
    assert any(moved)  # the steps did something
    # float64: the loop computes a tensor lr's and Adagrad's decayed lr in float32, the kernel in double
    tol = {"rtol": 1e-6, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    for a, b in zip(looped, other):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_fused_kernel_runs_only_in_plain_cpu_execution(case, monkeypatch):
    """The fused kernel is the plain-CPU path; traced steps keep the foreach formula."""
    module, cls_name, kwargs = case
    calls: list[str] = []
    for name in ("_fused_sgd_", "_fused_adam_", "_fused_adamw_", "_fused_adagrad_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cls = AdamW if cls_name == "AdamW" else getattr(module, cls_name)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    expected = {"SGD": "_fused_sgd_", "Adam": "_fused_adam_", "AdamW": "_fused_adamw_", "Adagrad": "_fused_adagrad_"}
    assert calls == [expected[cls_name]]
    with _PassThrough():  # as under make_fx / export: the foreach formula, no fused call
        opt.step()
    assert calls == [expected[cls_name]]


@torch.no_grad()
def test_fused_only_for_contiguous_cpu_float_tensors_of_one_layout():
    a, b = torch.zeros(3, 2), torch.zeros(2)
    assert _fused_cpu_ok([a, b], [a.clone(), b.clone()], [])
    assert not _fused_cpu_ok([a.t()], [a.t().contiguous()])  # the kernel would pair wrong elements
    assert not _fused_cpu_ok([a.half()], [a.half()])
    assert not _fused_cpu_ok([a], [a.double()])
    assert not _fused_cpu_ok([a], [torch.zeros(3, 2).to_sparse()])
    assert not _fused_cpu_ok([], [])
    with _PassThrough():
        assert not _fused_cpu_ok([a], [a])
    assert _fused_cpu_ok([a], [a], lr=torch.tensor(0.1))
    assert not _fused_cpu_ok([a], [a], lr=torch.tensor(0.1, device="meta"))  # a tensor lr elsewhere
    with torch.enable_grad():  # the functional form on tensors that need grad: no autograd formula
        assert not _fused_cpu_ok([a], [a])


def test_foreach_only_for_one_device_and_dtype():
    a, b = torch.zeros(2), torch.zeros(2)
    assert _foreach_ok([a, b], [a])
    assert not _foreach_ok([a, torch.zeros(2, dtype=torch.float64)])
    assert not _foreach_ok([], [])


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: with one active the step counts stay tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_tensors", [3, 20])  # 20: the stacked float64 pow takes the vector path
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("cls", [adam_mod.Adam, AdamW], ids=["Adam", "AdamW"])
def test_adam_host_bias_corrections_match_tensor_maths(cls, lr_tensor, n_tensors, dtype, monkeypatch):
    monkeypatch.setattr(adam_mod, "_fused_cpu_ok", lambda *lists, **kw: False)  # the foreach path's two forms

    def run(host: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.randn(5, 3, dtype=dtype, requires_grad=True) for _ in range(n_tensors)]
        opt = cls(params, lr=torch.tensor(0.01) if lr_tensor else 0.01, weight_decay=0.1)
        for step in range(300):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1) + i)
            if host:
                opt.step()
            else:
                with _PassThrough():
                    opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(host=False), run(host=True)):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:  # C pow and torch's pow differ in the last bit at a few steps
            torch.testing.assert_close(b, a, rtol=1e-13, atol=0)


def test_host_scalars_only_on_the_cpu_outside_tracing():
    from torch.fx.experimental.proxy_tensor import make_fx

    steps = [torch.zeros(()), torch.zeros(())]
    assert _host_scalars_ok(steps)
    assert not _host_scalars_ok([torch.zeros((), device="meta")])
    with _PassThrough():
        assert not _host_scalars_ok(steps)
    seen: list[bool] = []
    torch.func.vmap(lambda x: seen.append(_host_scalars_ok(steps)) or x)(torch.zeros(2))
    for pre_dispatch in (False, True):  # the engine's trace, and export's pre-dispatch trace
        make_fx(lambda x: seen.append(_host_scalars_ok([x])) or x * 2, pre_dispatch=pre_dispatch)(torch.zeros(()))
    torch.jit.trace(lambda x: seen.append(_host_scalars_ok([x])) or x * 2, torch.zeros(()), check_trace=False)
    assert seen == [False, False, False, False]
