"""``adagrad``: per-coordinate steps scaled by the root of the summed squared gradients."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._foreach import _foreach_ok, _fused_cpu_ok
from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["Adagrad", "adagrad"]


@OPTIMIZERS.register("adagrad")
class Adagrad(Optimizer):
    r"""Adagrad (Duchi, Hazan and Singer, 2011): per-coordinate steps from accumulated squared grads.

    With learning rate :math:`\gamma`, learning-rate decay :math:`\eta`, weight decay
    :math:`\lambda` and initial accumulator :math:`s_0`:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        \tilde\gamma_t &= \gamma / (1 + (t - 1)\eta) \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta_t &= \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

    Conventions:
        Same numbers as ``torch.optim.Adagrad``. eps is added *outside* the square root. The
        accumulator starts at ``initial_accumulator_value`` (0 by default, so the first step moves
        every coordinate with a non-zero gradient by about :math:`\gamma`). Weight decay is L2.
        Unlike torch, state is created lazily at the first step (torch creates it in ``__init__``).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        lr_decay: learning-rate decay :math:`\eta`.
        weight_decay: L2 penalty :math:`\lambda`.
        initial_accumulator_value: starting value :math:`s_0` of the squared-gradient sum.
        eps: term added to the denominator.
        maximize: ascend the objective instead of descending it.

    Example:
        With the accumulator starting at 0 the first step moves each coordinate by about :math:`\gamma`:

        >>> import torch
        >>> from singlestep.optim import Adagrad
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Adagrad([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9000, -1.9000])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")

        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def _init_group(self, group, params, grads, state_sums, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("this Adagrad does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["step"] = _scalar_zero(p)
                state["sum"] = torch.full_like(
                    p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                )
            state_sums.append(state["sum"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step.

        Args:
            closure: a closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            state_sums: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, state_sums, state_steps)

            adagrad(
                params,
                grads,
                state_sums,
                state_steps,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                lr_decay=group["lr_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )

        return loss


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Functional Adagrad; see :class:`Adagrad`."""
    if _fused_cpu_ok(params, grads, state_sums, lr=lr):
        torch._foreach_add_(state_steps, 1)
        torch._fused_adagrad_(params, grads, state_sums, state_steps, lr=lr, lr_decay=lr_decay,
                              weight_decay=weight_decay, eps=eps, maximize=maximize)  # fmt: skip
        return
    if _foreach_ok(params, grads, state_sums):
        _multi_tensor_adagrad(params, grads, state_sums, state_steps, lr=lr, weight_decay=weight_decay,
                              lr_decay=lr_decay, eps=eps, maximize=maximize)  # fmt: skip
        return
    for param, grad, state_sum, step_t in zip(params, grads, state_sums, state_steps):
        step_t += 1
        grad = grad if not maximize else -grad

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        clr = lr / (1 + (step_t - 1) * lr_decay)  # 0-dim tensor: no host read of the step
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(eps)
        param.add_(grad / std * -clr)


def _multi_tensor_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """The loop above with one ``_foreach`` call per op (same numbers)."""
    torch._foreach_add_(state_steps, 1)
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)

    neg_clr = (lr / (1 + (torch.stack(state_steps) - 1) * lr_decay)).neg()  # [n]
    torch._foreach_addcmul_(state_sums, grads, grads, value=1)
    std = torch._foreach_sqrt(state_sums)
    torch._foreach_add_(std, eps)
    update = torch._foreach_div(grads, std)
    torch._foreach_mul_(update, list(neg_clr.unbind()))
    torch._foreach_add_(params, update)
