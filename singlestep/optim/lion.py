"""``lion``: sign of an interpolated momentum, decoupled weight decay (Chen et al., 2023)."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.registry import OPTIMIZERS

__all__ = ["Lion", "lion"]


@OPTIMIZERS.register("lion")
class Lion(Optimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): signed momentum.

    With learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)` and weight decay
    :math:`\lambda`:

    .. math::
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \theta_t &= (1 - \gamma\lambda)\,\theta_{t-1} - \gamma\, \mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    Conventions:
        As the authors' reference implementation (``google/automl``, ``lion_pytorch.py``). No eps
        and no second moment: every coordinate moves by exactly :math:`\pm\gamma` (0 where
        :math:`c_t = 0`, since ``sign(0) = 0``), so lr is typically 3-10x smaller than AdamW's and
        weight decay 3-10x larger. Weight decay is decoupled and multiplied by the current lr, as
        in AdamW. The momentum starts at 0, so the first step is :math:`-\gamma\,\mathrm{sign}(g_1)`.
        The update uses :math:`\beta_1`, the stored momentum :math:`\beta_2`.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        betas: :math:`(\beta_1, \beta_2)`: interpolation for the update, decay of the momentum.
        weight_decay: decoupled decay :math:`\lambda`.

    Example:
        Every coordinate moves by exactly :math:`\gamma`:

        >>> import torch
        >>> from singlestep.optim import Lion
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Lion([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9000, -1.9000])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (expected two values)")
        if not 0.0 <= betas[0] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _init_group(self, group, params, grads, exp_avgs):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lion does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])

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
            exp_avgs: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs)
            beta1, beta2 = group["betas"]

            lion(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
            )

        return loss


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Functional Lion; see :class:`Lion`."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        param.add_(update * -lr)
        exp_avg.lerp_(grad, 1 - beta2)
