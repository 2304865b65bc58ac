"""``rmsprop``: steps divided by a running root-mean-square of the gradients."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["RMSprop", "rmsprop"]


@OPTIMIZERS.register("rmsprop")
class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), optionally centered and with momentum.

    With learning rate :math:`\gamma`, smoothing :math:`\alpha`, momentum :math:`\mu` and weight
    decay :math:`\lambda`:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
        \tilde v_t &= v_t - \bar g_t^2, \quad
            \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t \quad\text{(centered)}
            \qquad \tilde v_t = v_t \text{ (otherwise)} \\
        b_t &= \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon) \\
        \theta_t &= \theta_{t-1} - \gamma b_t
        \qquad (\mu = 0:\ \theta_t = \theta_{t-1} - \gamma g_t / (\sqrt{\tilde v_t} + \epsilon))

    Conventions:
        Same numbers as ``torch.optim.RMSprop``. eps is added *outside* the square root. The square
        average starts at 0 with no bias correction, so early steps are large
        (:math:`\approx g/(\sqrt{1-\alpha}\,|g|)`). The momentum buffer starts at 0 (the first
        momentum step is the plain normalised gradient). Weight decay is L2.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        alpha: smoothing constant :math:`\alpha` of the square average.
        eps: term added to the denominator.
        weight_decay: L2 penalty :math:`\lambda`.
        momentum: momentum factor :math:`\mu`.
        centered: normalise by the estimated variance instead of the raw second moment.
        maximize: ascend the objective instead of descending it.

    Example:
        No bias correction: the first step is :math:`\gamma / \sqrt{1 - \alpha}`, ten times ``lr`` here:

        >>> import torch
        >>> from singlestep.optim import RMSprop
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = RMSprop([w], lr=0.01)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9000, -1.9000])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def _init_group(self, group, params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["step"] = _scalar_zero(p)
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(state["square_avg"])
            state_steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])

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
            momentum_buffers: list[Tensor] = []
            grad_avgs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps)

            rmsprop(
                params,
                grads,
                square_avgs,
                momentum_buffers,
                grad_avgs,
                state_steps,
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                maximize=group["maximize"],
            )

        return loss


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    grad_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """Functional RMSprop; see :class:`RMSprop`."""
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        grad = grads[i] if not maximize else -grads[i]
        square_avg = square_avgs[i]

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)

        if centered:
            grad_avg = grad_avgs[i]
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(eps)

        if momentum > 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf * -lr)
        else:
            param.add_(grad / avg * -lr)
