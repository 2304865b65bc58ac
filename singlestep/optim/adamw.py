"""``adamw``: Adam with decoupled weight decay (torch.optim.AdamW)."""

from torch.optim.optimizer import ParamsT

from singlestep.optim.adam import Adam
from singlestep.registry import OPTIMIZERS

__all__ = ["AdamW"]


@OPTIMIZERS.register("adamw")
class AdamW(Adam):
    r"""AdamW (Loshchilov and Hutter, 2019): Adam whose weight decay shrinks the weights directly.

    With learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)` and weight decay
    :math:`\lambda`:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \\
        \theta'_{t-1} &= (1 - \gamma\lambda)\, \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta'_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    Conventions:
        Same numbers as ``torch.optim.AdamW``. The decay is multiplied by the *current* lr
        (:math:`1 - \gamma\lambda`, torch's convention, so a schedule also scales the decay) and
        applied before the Adam step. eps is outside the square root, after bias correction; both
        moments start at 0. Default ``weight_decay`` is 1e-2 (Adam's is 0).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        betas: decay rates :math:`(\beta_1, \beta_2)` of the two moment estimates.
        eps: term added to the denominator.
        weight_decay: decoupled decay :math:`\lambda`.
        amsgrad: normalise by the running maximum of :math:`v_t`.
        maximize: ascend the objective instead of descending it.

    Example:
        The parameters are first scaled by ``1 - lr * weight_decay`` (0.99), then the Adam step
        moves them by about ``lr``:

        >>> import torch
        >>> from singlestep.optim import AdamW
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = AdamW([w], lr=0.1, weight_decay=0.1)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.8900, -1.8800])
    """

    _decoupled_weight_decay = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize
        )
