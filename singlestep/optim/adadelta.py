"""``adadelta``: steps sized by the ratio of running RMS of updates to running RMS of gradients."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["Adadelta", "adadelta"]


@OPTIMIZERS.register("adadelta")
class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012): unit-corrected steps from running averages of g² and Δθ².

    With learning rate :math:`\gamma` (1.0 in the paper), decay :math:`\rho` and weight decay
    :math:`\lambda`:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        v_t &= \rho v_{t-1} + (1 - \rho) g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
        u_t &= \rho u_{t-1} + (1 - \rho) \Delta_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma \Delta_t

    Conventions:
        Same numbers as ``torch.optim.Adadelta``. eps is added *inside* both square roots (it
        also sets the size of the very first steps, :math:`\approx\sqrt{\epsilon}/\sqrt{v_1}`, since
        both accumulators start at 0). Weight decay is L2. ``lr`` only scales the final step, so
        ``lr=0`` freezes the parameters while the accumulators keep updating.

    Args:
        params: parameters or parameter-group dicts.
        lr: coefficient :math:`\gamma` that scales the delta (a float or a 0-dim tensor).
        rho: decay :math:`\rho` of both running averages, in [0, 1].
        eps: term added inside the square roots.
        weight_decay: L2 penalty :math:`\lambda`.
        maximize: ascend the objective instead of descending it.

    Example:
        Both accumulators start at 0, so the first step is small even at ``lr=1``: about
        :math:`\sqrt{\epsilon / (1 - \rho)}`:

        >>> import torch
        >>> from singlestep.optim import Adadelta
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Adadelta([w], lr=1.0)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9968, -1.9968])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def _init_group(self, group, params, grads, square_avgs, acc_deltas, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adadelta does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["step"] = _scalar_zero(p)
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
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
            square_avgs: list[Tensor] = []
            acc_deltas: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, square_avgs, acc_deltas, state_steps)

            adadelta(
                params,
                grads,
                square_avgs,
                acc_deltas,
                state_steps,
                lr=group["lr"],
                rho=group["rho"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )

        return loss


def adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Functional Adadelta; see :class:`Adadelta`."""
    for param, grad, square_avg, acc_delta, step_t in zip(params, grads, square_avgs, acc_deltas, state_steps):
        step_t += 1
        grad = grad if not maximize else -grad

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        param.add_(delta * -lr)
