"""``schedule_free_adamw``: Schedule-Free AdamW (Defazio et al., 2024): no lr schedule needed."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.registry import OPTIMIZERS

__all__ = ["ScheduleFreeAdamW", "schedule_free_adamw"]


@OPTIMIZERS.register("schedule_free_adamw")
class ScheduleFreeAdamW(Optimizer):
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled"): averaging, no schedule.

    Three sequences share the memory of two: the base iterate :math:`z` (kept in the state), the
    weighted average :math:`x` (used for evaluation) and their interpolation :math:`y` (where the
    gradient is taken, held in the parameters during training). With learning rate
    :math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, weight decay :math:`\lambda`, warm-up of
    :math:`W` steps, polynomial power :math:`r` and weighting power :math:`p`:

    .. math::
        \gamma_t &= \gamma \min(1, t / W), \qquad
        \gamma^{\max}_t = \max(\gamma^{\max}_{t-1}, \gamma_t) \\
        w_t &= t^r\,(\gamma^{\max}_t)^p, \qquad c_t = w_t / \textstyle\sum_{i \le t} w_i \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        d_t = g_t / (\sqrt{v_t / (1 - \beta_2^t)} + \epsilon) + \lambda y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t d_t \\
        x_t &= (1 - c_t)\, x_{t-1} + c_t z_t \\
        y_t &= (1 - \beta_1)\, z_t + \beta_1 x_t

    implemented, like the authors' ``schedulefree.AdamWScheduleFree``, by updating :math:`y` in
    place: :math:`y \leftarrow \mathrm{lerp}(y, z_{t-1}, c_t) + \gamma_t(\beta_1(1 - c_t) - 1)\, d_t`.

    Call :meth:`eval` before evaluating or saving weights for inference (the parameters become
    :math:`x`) and :meth:`train` before stepping again (back to :math:`y`). The trainer does this
    around every evaluation. The optimizer starts in train mode.

    Conventions:
        Follows ``schedulefree/adamw_schedulefree.py`` (current version: bias correction inside the
        square root, warm-up and weighting use the scheduled lr). eps is outside the square root.
        Weight decay is evaluated at :math:`y` and goes through the :math:`z` step (not
        multiplicative). :math:`z_0 = x_0 = y_0 = \theta_0` and :math:`v_0 = 0`. Differences:
        the step counter, weight sum and max lr are per parameter float32 0-dim tensors in the
        state (the reference keeps Python floats per group), so nothing is read back to the host
        and ``torch.compile`` sees no changing constants; with ``lr = 0`` every weight is 0 and
        :math:`c_t` is defined as 0 (not 0/0). Requires :math:`0 < \beta_1 < 1` because
        :meth:`eval` recovers :math:`x` by extrapolating with :math:`1/\beta_1`. z and v are kept
        in the parameter's dtype (as torch keeps Adam's moments); prefer float32 parameters.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate :math:`\gamma` (a float or a 0-dim tensor).
        betas: :math:`(\beta_1, \beta_2)`: interpolation between :math:`z` and :math:`x`, and the
            second-moment decay.
        eps: term added to the denominator.
        weight_decay: weight decay :math:`\lambda`, applied at :math:`y`.
        warmup_steps: linear warm-up length :math:`W` in steps (0: none).
        r: polynomial weighting power :math:`r` of the average.
        weight_lr_power: power :math:`p` of the max lr in the averaging weights.

    Example:
        Train at :math:`y`, evaluate at the average :math:`x`:

        >>> import torch
        >>> from singlestep.optim import ScheduleFreeAdamW
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = ScheduleFreeAdamW([w], lr=0.1)
        >>> for _ in range(3):
        ...     w.grad = torch.tensor([0.5, -0.5])
        ...     opt.step()
        >>> w.detach()  # y, where gradients are taken
        tensor([ 0.7900, -1.7900])
        >>> opt.eval()  # x: evaluate and save here
        >>> w.detach()
        tensor([ 0.8000, -1.8000])
        >>> opt.train()  # back to y before the next step
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (expected two values)")
        if not 0.0 < betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (must be in (0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0 <= warmup_steps or int(warmup_steps) != warmup_steps:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps}")
        if not 0.0 <= r:
            raise ValueError(f"Invalid r value: {r}")
        if not 0.0 <= weight_lr_power:
            raise ValueError(f"Invalid weight_lr_power value: {weight_lr_power}")

        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "warmup_steps": int(warmup_steps),
            "r": r,
            "weight_lr_power": weight_lr_power,
            "train_mode": True,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the averaged weights :math:`x` in the parameters (before evaluation or export)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta1, _ = group["betas"]
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "z" in state:
                        # x = (y - (1 - beta1) z) / beta1
                        p.lerp_(state["z"], 1 - 1 / beta1)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the gradient point :math:`y` back in the parameters (before stepping again)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta1, _ = group["betas"]
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "z" in state:
                        # y = (1 - beta1) z + beta1 x
                        p.lerp_(state["z"], 1 - beta1)
                group["train_mode"] = True

    def _init_group(self, group, params, grads, zs, exp_avg_sqs, state_steps, weight_sums, lr_maxes):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ScheduleFreeAdamW does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                state["step"] = _scalar_zero(p)
                state["weight_sum"] = _scalar_zero(p)
                state["lr_max"] = _scalar_zero(p)
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            zs.append(state["z"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            weight_sums.append(state["weight_sum"])
            lr_maxes.append(state["lr_max"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform a single optimization step (the optimizer must be in train mode).

        Args:
            closure: a closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError(
                    "ScheduleFreeAdamW.step() called in eval mode; call optimizer.train() after evaluating"
                )
            params: list[Tensor] = []
            grads: list[Tensor] = []
            zs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            weight_sums: list[Tensor] = []
            lr_maxes: list[Tensor] = []
            self._init_group(group, params, grads, zs, exp_avg_sqs, state_steps, weight_sums, lr_maxes)
            beta1, beta2 = group["betas"]

            schedule_free_adamw(
                params,
                grads,
                zs,
                exp_avg_sqs,
                state_steps,
                weight_sums,
                lr_maxes,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                warmup_steps=group["warmup_steps"],
                r=group["r"],
                weight_lr_power=group["weight_lr_power"],
            )

        return loss


def schedule_free_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    weight_sums: list[Tensor],
    lr_maxes: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
) -> None:
    """Functional Schedule-Free AdamW (train-mode step on y); see :class:`ScheduleFreeAdamW`."""
    tiny = torch.finfo(torch.float32).tiny
    for i, y in enumerate(params):
        grad = grads[i]
        z = zs[i]
        exp_avg_sq = exp_avg_sqs[i]
        step_t = state_steps[i]
        lr_max = lr_maxes[i]
        weight_sum = weight_sums[i]

        step_t += 1

        # All 0-dim float32 tensors: the schedule lives on the device.
        if warmup_steps > 0:
            lr_t = (step_t / warmup_steps).clamp_(max=1.0) * lr
        else:
            lr_t = torch.ones_like(step_t) * lr
        torch.maximum(lr_max, lr_t, out=lr_max)
        weight = step_t**r * lr_max**weight_lr_power
        weight_sum.add_(weight)
        # weight <= weight_sum, so the clamp only matters when both are 0 (lr = 0): c = 0, not NaN.
        ckp1 = weight / weight_sum.clamp(min=tiny)
        bias_correction2 = 1 - beta2 ** step_t.double()  # float64: see Adam

        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
        grad_normalized = grad / denom  # a new tensor: p.grad is never written

        if weight_decay != 0:
            grad_normalized.add_(y, alpha=weight_decay)

        # Update y in place without materialising x (the reference's memory trick).
        y.lerp_(z, ckp1.to(y.dtype))
        y.add_(grad_normalized * (lr_t * (beta1 * (1 - ckp1) - 1)))

        z.sub_(grad_normalized * lr_t)
