"""A user's own optimizer, loaded by dotted path: ``optimizer: {name: examples.my_optimizers:SignSGD}``.

Nothing here is registered: the config names the class by import path and the registry imports it
with the working directory on ``sys.path``. Check it with
``python -c "from examples.my_optimizers import SignSGD; from singlestep.optim.testing import check_optimizer; check_optimizer(SignSGD, lr=0.01)"``.
"""

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["SignSGD", "sign_sgd"]


class SignSGD(Optimizer):
    r"""signSGD (Bernstein et al., 2018): move every coordinate by lr against the sign of its gradient.

    .. math:: \theta_t = (1 - \gamma\lambda)\,\theta_{t-1} - \gamma\,\mathrm{sign}(g_t)

    Conventions:
        No state and no eps; ``sign(0) = 0`` (a zero gradient leaves the coordinate alone); the
        weight decay is decoupled and multiplied by the current lr, as in AdamW.

    Args:
        params: parameters or parameter-group dicts.
        lr: step size :math:`\gamma` (a float or a 0-dim tensor).
        weight_decay: decoupled decay :math:`\lambda`.
    """

    def __init__(self, params: ParamsT, lr: float = 0.01, weight_decay: float = 0.0) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _init_group(self, group, params, grads):
        for p in group["params"]:
            if p.grad is not None:  # no gradient: leave the parameter alone
                params.append(p)
                grads.append(p.grad)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            self._init_group(group, params, grads)
            sign_sgd(params, grads, lr=group["lr"], weight_decay=group["weight_decay"])
        return loss


def sign_sgd(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor, weight_decay: float) -> None:
    """Functional signSGD; see :class:`SignSGD`."""
    for param, grad in zip(params, grads):
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(grad.sign() * -lr)  # not add_(..., alpha=-lr): lr may be a 0-dim tensor
