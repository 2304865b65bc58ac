"""``muon``: momentum orthogonalised by Newton-Schulz for matrices, a named fallback for the rest."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from singlestep.optim._scalar_state import _scalar_state_to_fp32, _scalar_zero
from singlestep.optim.adam import adam
from singlestep.optim.lion import lion
from singlestep.registry import OPTIMIZERS

__all__ = ["Muon", "muon", "zeropower_via_newtonschulz5"]

# Fallback optimizers Muon can run for parameters it does not orthogonalise.
_FALLBACKS = ("adamw", "adam", "lion")

# Group keys that only Muon understands (build.py accepts them in param_groups rules).
_GROUP_KEYS = ("use_muon",)


@OPTIMIZERS.register("muon")
class Muon(Optimizer):
    r"""Muon (Keller Jordan, 2024): SGD-momentum whose matrix updates are orthogonalised.

    For every parameter with two or more dimensions (conv filters are flattened to
    ``[out, in * kh * kw]``), with learning rate :math:`\gamma`, momentum :math:`\mu` and weight
    decay :math:`\lambda`:

    .. math::
        b_t &= \mu b_{t-1} + (1 - \mu) g_t \\
        u_t &= (1 - \mu) g_t + \mu b_t \text{ (nesterov)} \quad\text{or}\quad b_t \\
        O_t &= \mathrm{NS}_5(u_t) \approx U V^\top \quad (u_t = U \Sigma V^\top) \\
        \theta_t &= (1 - \gamma\lambda)\,\theta_{t-1}
            - \gamma \sqrt{\max(1, \text{rows}/\text{cols})}\; O_t

    where :math:`\mathrm{NS}_5` is five steps of the quintic Newton-Schulz iteration
    :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, :math:`(a, b, c) = (3.4445,
    -4.7750, 2.0315)`, started from :math:`X = u / (\lVert u \rVert_F + 10^{-7})` in bfloat16.

    Every other parameter (1-D biases and norm gains, 0-D scalars, and all parameters of a
    group with ``use_muon: False``) is updated by the *fallback* optimizer named by
    ``fallback`` (``adamw``, ``adam`` or ``lion``), with ``fallback_lr``, ``fallback_betas``,
    ``fallback_eps`` and ``fallback_weight_decay``. Embeddings and output heads are matrices but
    are usually better left to the fallback (Jordan's advice); route them with a param-groups
    rule in the config::

        optimizer:
          name: muon
          lr: 0.02
          param_groups:
            - {match: "tok_emb.*", use_muon: false}
            - {match: "head.*", use_muon: false, fallback_lr: 0.003}

    How groups are split: each incoming group becomes up to two param groups, one per kind
    (``group["use_muon"]`` is True or False in ``optimizer.param_groups``). In a fallback group
    the fallback hyper-parameters become the group's ``lr`` / ``betas`` / ``eps`` /
    ``weight_decay``, so lr schedulers scale both kinds alike. A fallback group's values are, in
    order of precedence: the incoming group's ``fallback_*`` keys; for ``lr`` (only when the whole
    group has ``use_muon: False``) and ``weight_decay`` (so the no-decay rule applies), the
    incoming group's own ``lr`` / ``weight_decay``; then the constructor's ``fallback_*`` values.

    Conventions:
        As ``KellerJordan/Muon`` (``muon.py``): momentum is an EMA (``lerp``, so the buffer holds
        :math:`(1-\mu)\sum\mu^k g`, starting at 0), Nesterov by default, orthogonalisation in
        bfloat16, decoupled weight decay multiplied by the current lr. One deviation: the
        :math:`\sqrt{\max(1, \text{rows}/\text{cols})}` scale uses the flattened matrix shape, so
        for conv filters it is ``out / (in*kh*kw)``, not the reference's ``kh / kw``. The fallback
        ``adamw`` / ``adam`` is exactly :class:`~singlestep.optim.adam.Adam`'s update (AdamW:
        decoupled decay), ``lion`` exactly :class:`~singlestep.optim.lion.Lion`'s. Default
        fallback betas and eps are those of the reference's auxiliary Adam ((0.9, 0.95), 1e-10).
        Muon's lr is in units of spectral norm per step: 0.02 is a good start; the fallback lr is
        an ordinary Adam lr.

    Args:
        params: parameters or parameter-group dicts (groups may carry ``use_muon``).
        lr: learning rate :math:`\gamma` of the orthogonalised updates (a float or a 0-dim tensor).
        momentum: momentum :math:`\mu`.
        nesterov: use the Nesterov form of the momentum.
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled decay :math:`\lambda` of the Muon-updated matrices.
        fallback: optimizer for the other parameters: ``adamw``, ``adam`` or ``lion``.
        fallback_lr: learning rate of the fallback.
        fallback_betas: betas of the fallback.
        fallback_eps: eps of the fallback (unused by ``lion``).
        fallback_weight_decay: weight decay of the fallback (decoupled for ``adamw`` / ``lion``,
            L2 for ``adam``).

    Example:
        Matrices go to Muon, the bias to the fallback, each in a group of its own:

        >>> import torch
        >>> from singlestep.optim import Muon
        >>> layer = torch.nn.Linear(3, 2)
        >>> opt = Muon(layer.parameters(), lr=0.02)
        >>> [(g["use_muon"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]
        [(True, [(2, 3)]), (False, [(2,)])]
    """

    extra_group_keys = _GROUP_KEYS

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        fallback: str = "adamw",
        fallback_lr: float = 3e-4,
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-10,
        fallback_weight_decay: float = 0.0,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 1 <= ns_steps or int(ns_steps) != ns_steps:
            raise ValueError(f"Invalid ns_steps value: {ns_steps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if fallback not in _FALLBACKS:
            raise ValueError(f"Invalid fallback value: {fallback!r} (expected one of {', '.join(_FALLBACKS)})")
        if not 0.0 <= fallback_lr:
            raise ValueError(f"Invalid fallback_lr value: {fallback_lr}")
        if len(fallback_betas) != 2:
            raise ValueError(f"Invalid fallback_betas: {fallback_betas} (expected two values)")
        if not 0.0 <= fallback_betas[0] < 1.0:
            raise ValueError(f"Invalid fallback_betas parameter at index 0: {fallback_betas[0]}")
        if not 0.0 <= fallback_betas[1] < 1.0:
            raise ValueError(f"Invalid fallback_betas parameter at index 1: {fallback_betas[1]}")
        if not 0.0 <= fallback_eps:
            raise ValueError(f"Invalid fallback_eps value: {fallback_eps}")
        if not 0.0 <= fallback_weight_decay:
            raise ValueError(f"Invalid fallback_weight_decay value: {fallback_weight_decay}")

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": int(ns_steps),
            "weight_decay": weight_decay,
            "fallback": fallback,
            "fallback_lr": fallback_lr,
            "fallback_betas": (float(fallback_betas[0]), float(fallback_betas[1])),
            "fallback_eps": fallback_eps,
            "fallback_weight_decay": fallback_weight_decay,
        }
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_scalar_state_to_fp32)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, split into its Muon part (matrices) and its fallback part (the rest)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        use_muon = param_group.get("use_muon")
        if use_muon is None:
            muon_params = [p for p in params if p.ndim >= 2]
        elif use_muon:
            bad = [tuple(p.shape) for p in params if p.ndim < 2]
            if bad:
                raise ValueError(
                    f"use_muon=True on parameters of shape {bad}: Muon only orthogonalises matrices;"
                    " leave use_muon unset to send 0-D/1-D parameters to the fallback"
                )
            muon_params = params
        else:
            muon_params = []
        muon_ids = {id(p) for p in muon_params}
        fallback_params = [p for p in params if id(p) not in muon_ids]

        if muon_params or not fallback_params:  # an empty group still goes through torch's checks
            group = {k: v for k, v in param_group.items() if k != "params"}
            group.update(params=muon_params, use_muon=True)
            super().add_param_group(group)
        if fallback_params:
            group = {k: v for k, v in param_group.items() if k not in ("params", "lr", "weight_decay")}
            group.update(params=fallback_params, use_muon=False)

            def fb(key: str) -> Any:
                return param_group.get(f"fallback_{key}", self.defaults[f"fallback_{key}"])

            group["lr"] = fb("lr")
            if use_muon is False and "fallback_lr" not in param_group and "lr" in param_group:
                group["lr"] = param_group["lr"]
            group["weight_decay"] = fb("weight_decay")
            if "fallback_weight_decay" not in param_group and "weight_decay" in param_group:
                group["weight_decay"] = param_group["weight_decay"]
            group["betas"] = tuple(fb("betas"))
            group["eps"] = fb("eps")
            if group.get("fallback", self.defaults["fallback"]) not in _FALLBACKS:
                raise ValueError(
                    f"Invalid fallback value: {group['fallback']!r} (expected one of {', '.join(_FALLBACKS)})"
                )
            super().add_param_group(group)

    def _init_group(self, group, params, grads, momentum_buffers, exp_avgs, exp_avg_sqs, state_steps):
        use_muon = group["use_muon"]
        fallback = group["fallback"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # Lazy state initialization
            if len(state) == 0:
                if use_muon:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if fallback != "lion":
                        state["step"] = _scalar_zero(p)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if use_muon:
                momentum_buffers.append(state["momentum_buffer"])
            else:
                exp_avgs.append(state["exp_avg"])
                if fallback != "lion":
                    exp_avg_sqs.append(state["exp_avg_sq"])
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
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, momentum_buffers, exp_avgs, exp_avg_sqs, state_steps)

            if group["use_muon"]:
                muon(
                    params,
                    grads,
                    momentum_buffers,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"],
                    weight_decay=group["weight_decay"],
                )
            elif group["fallback"] == "lion":
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
            else:
                beta1, beta2 = group["betas"]
                adam(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    state_steps,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                    decoupled_weight_decay=group["fallback"] == "adamw",
                )

        return loss


def zeropower_via_newtonschulz5(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise a matrix (``U S V^T -> U S' V^T``, ``S'`` near 1) in bfloat16.

    Five quintic Newton-Schulz steps with coefficients chosen for the steepest slope at zero, as
    in Keller Jordan's Muon: the singular values land in roughly [0.7, 1.2], not exactly 1, which
    does not hurt training. A zero matrix stays zero (the 1e-7 in the normalisation).
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT  # [rows, cols] -> [cols, rows]: iterate on the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    weight_decay: float,
) -> None:
    """Functional Muon step for matrix parameters; see :class:`Muon`."""
    for param, grad, buf in zip(params, grads, momentum_buffers):
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf  # lerp (not lerp_): p.grad stays as it was
        matrix = update.reshape(update.size(0), -1)  # conv [out, in, kh, kw] -> [out, in*kh*kw]
        ortho = zeropower_via_newtonschulz5(matrix, steps=ns_steps)
        scale = max(1.0, matrix.size(0) / matrix.size(1)) ** 0.5
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(ortho.reshape(param.shape).to(param.dtype) * (-lr * scale))
