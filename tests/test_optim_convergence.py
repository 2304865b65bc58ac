"""Convergence on known minima for the optimizers torch.optim has no reference for.

Lion and Schedule-Free AdamW on an ill-conditioned quadratic and on Rosenbrock; Muon on a least
squares problem with a matrix weight (plus a bias that must go to the fallback optimizer).
Gradients are written out in closed form to keep the loops cheap.
"""

from __future__ import annotations

import torch

from singlestep.optim import Lion, Muon, ScheduleFreeAdamW
from singlestep.optim.schedulers import cosine

_CENTER = torch.tensor([1.0, -2.0])
_CURVATURE = torch.tensor([10.0, 1.0])  # condition number 10


def _quadratic(x: torch.Tensor) -> float:
    return float(0.5 * (_CURVATURE * (x - _CENTER) ** 2).sum())


def _quadratic_grad(x: torch.Tensor) -> torch.Tensor:
    return _CURVATURE * (x - _CENTER)


def _rosenbrock(x: torch.Tensor) -> float:
    return float((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2)


def _rosenbrock_grad(x: torch.Tensor) -> torch.Tensor:
    a, b = x[0], x[1]
    return torch.stack([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)])


def _minimise(opt_cls, grad_fn, steps: int, schedule: bool = False, **kwargs) -> torch.Tensor:
    x = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = opt_cls([x], **kwargs)
    sched = cosine(opt, steps) if schedule else None
    for _ in range(steps):
        x.grad = grad_fn(x.detach())
        opt.step()
        if sched is not None:
            sched.step()
    if hasattr(opt, "eval"):
        opt.eval()  # schedule-free: the averaged point x is the answer
    return x.detach()


def test_lion_quadratic():
    # Lion moves every coordinate by exactly lr, so it needs the decaying schedule to settle.
    x = _minimise(Lion, _quadratic_grad, 1000, schedule=True, lr=0.02)
    assert _quadratic(x) < 1e-6, x


def test_lion_rosenbrock():
    x = _minimise(Lion, _rosenbrock_grad, 1000, schedule=True, lr=0.02)
    assert _rosenbrock(x) < 1e-3, x
    torch.testing.assert_close(x, torch.ones(2), atol=0.05, rtol=0)


def test_schedule_free_quadratic():
    x = _minimise(ScheduleFreeAdamW, _quadratic_grad, 1000, lr=0.05)
    assert _quadratic(x) < 1e-3, x


def test_schedule_free_rosenbrock():
    x = _minimise(ScheduleFreeAdamW, _rosenbrock_grad, 2000, lr=0.05)
    assert _rosenbrock(x) < 1e-2, x
    torch.testing.assert_close(x, torch.ones(2), atol=0.1, rtol=0)


def _least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    w_true, b_true = torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
    return x, x @ w_true.T + b_true  # noise-free: the minimum loss is 0


def _ls_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    residual = x @ w.detach().T + b.detach() - y  # [256, 4]
    w.grad = 2 * residual.T @ x / residual.numel()
    b.grad = 2 * residual.sum(0) / residual.numel()
    return float((residual**2).mean())


def test_muon_least_squares_and_fallback():
    x, y = _least_squares()
    w, b = torch.zeros(4, 16, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = Muon([w, b], lr=0.1, fallback_lr=0.05)
    sched = cosine(opt, 200)
    first = None
    for _ in range(200):
        loss = _ls_grads(w, b, x, y)
        first = loss if first is None else first
        opt.step()
        sched.step()
    assert _ls_grads(w, b, x, y) < 1e-3 * first
    # The matrix went through Muon, the bias through the AdamW fallback.
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert set(opt.state[w]) == {"momentum_buffer"}
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.param_groups[1]["lr"] < 0.05  # the schedule scaled the fallback's lr too


def test_muon_update_is_orthogonalised():
    """One step from rest: the update's singular values are all near 1 (times lr), conv filters too.

    The gradient's rows span a 30x range of scales; Newton-Schulz-5 maps its singular values into
    roughly [0.7, 1.2] (Jordan: "S' ~ Uniform(0.5, 1.5)").
    """
    torch.manual_seed(0)
    for shape in [(8, 32), (32, 8), (6, 4, 3, 3)]:
        p = torch.randn(shape, requires_grad=True)
        before = p.detach().clone()
        p.grad = torch.randn(shape) * torch.logspace(-1.5, 0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
        Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
        rows, cols = shape[0], p[0].numel()
        scale = max(1.0, rows / cols) ** 0.5
        sv = torch.linalg.svdvals((p.detach() - before).reshape(rows, cols)) / (0.1 * scale)
        assert sv.min() > 0.5 and sv.max() < 1.5, (shape, sv)


def test_muon_routes_groups_to_the_fallback():
    w_muon, w_head, b = torch.randn(4, 4), torch.randn(3, 4), torch.randn(4)
    for t in (w_muon, w_head, b):
        t.requires_grad_(True)
    opt = Muon(
        [{"params": [w_muon, b]}, {"params": [w_head], "use_muon": False, "lr": 0.003}],
        lr=0.02,
        fallback="lion",
        fallback_lr=1e-4,
    )
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(w_muon)]["use_muon"] and by_param[id(w_muon)]["lr"] == 0.02
    assert not by_param[id(b)]["use_muon"] and by_param[id(b)]["lr"] == 1e-4
    assert not by_param[id(w_head)]["use_muon"] and by_param[id(w_head)]["lr"] == 0.003
    for t in (w_muon, w_head, b):
        t.grad = torch.ones_like(t)
    opt.step()
    assert set(opt.state[w_head]) == {"exp_avg"}  # lion's only state
