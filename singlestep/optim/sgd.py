"""``sgd``: stochastic gradient descent with optional (Nesterov) momentum; torch.optim.SGD's numbers."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._foreach import _foreach_ok, _fused_cpu_ok
from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["SGD", "sgd"]


@OPTIMIZERS.register("sgd")
class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    With learning rate :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau` and weight
    decay :math:`\lambda`, one step on parameters :math:`\theta` does

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda \theta_{t-1}
              \quad (- \text{ when maximize}) \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t, \qquad b_1 = g_1 \\
        d_t &= g_t + \mu b_t \text{ (nesterov)} \quad\text{or}\quad b_t \\
        \theta_t &= \theta_{t-1} - \gamma d_t

    and with ``momentum=0`` simply :math:`\theta_t = \theta_{t-1} - \gamma g_t`.

    Conventions:
        Same numbers as ``torch.optim.SGD``. Weight decay is L2 (added to the gradient, so it is
        also scaled by momentum). The first momentum step copies the gradient undamped
        (:math:`b_1 = g_1`, not :math:`(1-\tau) g_1`). The buffer is created as zeros so that
        ``step()`` never branches on whether state exists; when ``dampening != 0`` a float32 step
        counter picks the undamped first step without a host sync.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        momentum: momentum factor :math:`\mu`.
        dampening: dampening :math:`\tau` of the momentum's gradient term.
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend the objective instead of descending it.

    Example:
        Nesterov momentum's first step moves by :math:`\gamma (1 + \mu) g_1`:

        >>> import torch
        >>> from singlestep.optim import SGD
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = SGD([w], lr=0.1, momentum=0.9, nesterov=True)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9050, -1.9050])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"Invalid dampening value: {dampening}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def _init_group(self, group, params, grads, momentum_buffers, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SGD does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                state = self.state[p]
                # Lazy state initialization
                if len(state) == 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["dampening"] != 0:
                        state["step"] = _scalar_zero(p)
                momentum_buffers.append(state["momentum_buffer"])
                if group["dampening"] != 0:
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
            momentum_buffers: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, momentum_buffers, state_steps)

            sgd(
                params,
                grads,
                momentum_buffers,
                state_steps,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )

        return loss


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Functional SGD; see :class:`SGD`. ``state_steps`` is only used when ``dampening != 0``."""
    if dampening == 0 and _fused_cpu_ok(params, grads, momentum_buffers, lr=lr):
        # The zero-initialised buffer makes every step the general one (0 * momentum + grad).
        torch._fused_sgd_(params, grads, momentum_buffers, weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=0.0, nesterov=nesterov, maximize=maximize, is_first_step=False)  # fmt: skip
        return
    if dampening == 0 and _foreach_ok(params, grads, momentum_buffers):
        _multi_tensor_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)  # fmt: skip
        return
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        if momentum != 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum)
            if dampening != 0:
                step_t = state_steps[i]
                step_t += 1
                # torch copies the first gradient undamped: weight 1 on step 1, 1 - dampening after.
                buf.add_(grad * torch.where(step_t > 1, 1.0 - dampening, 1.0))
            else:
                buf.add_(grad)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf

        param.add_(grad * -lr)


def _multi_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The loop above with ``dampening == 0``, one ``_foreach`` call per op (same numbers)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, grads)
        grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    torch._foreach_add_(params, torch._foreach_mul(grads, -lr))
