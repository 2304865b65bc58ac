"""``adam``: bias-corrected first and second moment estimates, L2 weight decay (torch.optim.Adam)."""

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._foreach import _foreach_ok, _fused_cpu_ok, _host_scalars_ok
from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["Adam", "adam"]


@OPTIMIZERS.register("adam")
class Adam(Optimizer):
    r"""Adam (Kingma and Ba, 2015), optionally AMSGrad; weight decay is an L2 term on the gradient.

    With learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)` and weight decay
    :math:`\lambda`:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2
            \qquad (\text{amsgrad: } \hat v_t = \max(\hat v_{t-1}, v_t)) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    Conventions:
        Same numbers as ``torch.optim.Adam``. eps is added *outside* the square root and *after*
        the second-moment bias correction. Both moments start at 0 and are bias corrected, so the
        first step has size about :math:`\gamma` per coordinate. Weight decay is L2 (it goes
        through the moments); :class:`~singlestep.optim.adamw.AdamW` decouples it. The bias
        corrections are computed in float64 from the float32 ``step`` tensor (torch's
        ``capturable`` path uses float32, which drifts ~1e-5 relative from eager within 50
        steps): as tensor maths on an accelerator and whenever the step is traced or compiled;
        on the CPU in plain execution, as torch does in eager mode, in double on the host: by
        torch's fused CPU kernel for dense contiguous float32/float64 groups (last-bit
        differences from the ``_foreach`` formula, as torch's ``fused`` and ``foreach`` paths
        differ), else the ``_foreach`` path reads the step back and uses the same float64
        formulas (float32 parameters bit-identical to its tensor form in tests).

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        betas: decay rates :math:`(\beta_1, \beta_2)` of the two moment estimates.
        eps: term added to the denominator.
        weight_decay: L2 penalty :math:`\lambda`.
        amsgrad: normalise by the running maximum of :math:`v_t` (Reddi et al., 2018).
        maximize: ascend the objective instead of descending it.

    Example:
        The first step moves every coordinate by about :math:`\gamma`, whatever the gradient's size:

        >>> import torch
        >>> from singlestep.optim import Adam
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -0.5])
        >>> opt.step()
        >>> w.detach()
        tensor([ 0.9000, -1.9000])
    """

    # AdamW flips this; it is stored in every param group so a state_dict says which rule it used.
    _decoupled_weight_decay = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (expected two values)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": self._decoupled_weight_decay,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["step"] = _scalar_zero(p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
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
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            beta1, beta2 = group["betas"]

            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )

        return loss


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Functional Adam / AdamW; see :class:`Adam` (``decoupled_weight_decay`` selects AdamW)."""
    if _fused_cpu_ok(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr=lr):
        torch._foreach_add_(state_steps, 1)
        fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad=amsgrad, lr=lr,
              beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize)  # fmt: skip
        return
    if _foreach_ok(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
        _multi_tensor_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad=amsgrad,
                           beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
                           decoupled_weight_decay=decoupled_weight_decay)  # fmt: skip
        return
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        exp_avg_sq = exp_avg_sqs[i]
        step_t = state_steps[i]

        step_t += 1

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        # 0-dim tensors: no host sync and nothing for a compiler to specialise on. float64 because
        # beta**t in float32 is off by ~1e-5 relative after 50 steps (beta itself rounds to float32).
        step = step_t.double()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        step_size = lr / bias_correction1

        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)

        param.add_(exp_avg / denom * -step_size)


def _multi_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """The loop above with one ``_foreach`` call per op; the bias corrections of all tensors are
    computed together from their stacked step counters (float64, as above), on the host when the
    counters may be read there (``_host_scalars_ok``)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(state_steps, 1)

    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    bias_correction2_sqrt: list[float] | list[Tensor]
    neg_step_size: list[float] | list[Tensor]
    if _host_scalars_ok(state_steps):
        # On the CPU, outside tracing: the counts read once and the same float64 formulas on the
        # host, ~10 fewer tiny tensor ops a step (``float / tensor`` is ``reciprocal() * float``,
        # tensor / tensor divides). C pow and torch's pow can differ in the last bit (beta2 =
        # 0.999: 2 of the first 300 steps), below float32 parameters' resolution (tested equal).
        steps = torch.stack(state_steps).tolist()
        bias_correction2_sqrt = [math.sqrt(1 - beta2**s) for s in steps]
        if isinstance(lr, Tensor):
            lr_value = float(lr)
            neg_step_size = [-(lr_value / (1 - beta1**s)) for s in steps]
        else:
            neg_step_size = [-((1 / (1 - beta1**s)) * lr) for s in steps]
    else:
        step = torch.stack(state_steps).double()  # [n]
        bias_correction2_sqrt = list((1 - beta2**step).sqrt().unbind())
        neg_step_size = list((lr / (1 - beta1**step)).neg().unbind())

    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)

    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, neg_step_size)
    torch._foreach_add_(params, update)
