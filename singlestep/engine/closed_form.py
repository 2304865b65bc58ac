"""Per-sample loss and gradients without an autograd graph, for models whose backward is known.

A per-sample step of a linear model does a few thousand FLOPs; recording the autograd graph and
walking it back costs more than the arithmetic (~60 us of a ~120 us eager step). For
``cross_entropy(W x + b, y)`` and ``mse(W x + b, y)`` the backward is three ATen calls, so the eager
engine can run them itself: the same kernels autograd's formulas call (``nll_loss_backward`` /
``mse_loss_backward``, ``_log_softmax_backward_data``, ``mm``), with the same inputs, so the loss and
the gradients are bit-identical to ``torch.autograd.grad`` (tests check this per dtype).

It is used only where nothing could tell the difference: the model is exactly
:class:`singlestep.models.linear.Linear` or ``nn.Linear`` running its class's own ``forward``,
the loss is the task's own, every parameter is trainable, no module, global or tensor hook is
registered, and nothing watches autograd or changes the ops (anomaly mode, autocast,
saved-tensor hooks, torch function or dispatch modes, transforms): checked per chunk. Any other model or loss, or any
chunk where one of these holds, runs through autograd as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singlestep import _compat as compat
from singlestep.losses import _regression_loss
from singlestep.models.linear import Linear

__all__ = ["ClosedForm", "closed_form_for"]

# (x [1, ...], y [1, ...]) -> (loss, [grad of each parameter, in the engine's order])
ClosedForm = Callable[[Tensor, Tensor], tuple[Tensor, list[Tensor]]]

_nll_loss_backward = torch.ops.aten.nll_loss_backward.default
_mse_loss_backward = torch.ops.aten.mse_loss_backward.default
_MEAN = 1  # torch's Reduction::Mean
_IGNORE_INDEX = -100  # F.cross_entropy's default


class _LinearClosedForm:
    """Loss and grads of ``loss(fc(flatten(x)), y)`` for one sample, as autograd would compute them."""

    def __init__(self, model: nn.Module, fc: nn.Linear, classification: bool):
        self.model, self.fc, self.classification = model, fc, classification
        self.flatten = fc is not model
        self.weight, self.bias = fc.weight, fc.bias
        self.params = [p for p in (fc.weight, fc.bias) if p is not None]  # the engine's order
        self.one = torch.ones((), dtype=fc.weight.dtype, device=fc.weight.device)

    def ready(self, xs: Tensor, ys: Tensor) -> bool:
        """Whether this chunk may skip autograd: nothing observes the graph, shapes are the plain ones."""
        fc, model, w = self.fc, self.model, self.weight
        if fc.weight is not w or fc.bias is not self.bias or (self.flatten and model.fc is not fc):
            return False  # a parameter or the layer was replaced since the engine was built
        if w.dtype != self.one.dtype or w.device != self.one.device or not ys.numel():
            return False  # the model was converted or moved after the engine was built (or no steps)
        if not torch.is_grad_enabled():
            return False  # autograd's error, not a silent closed form
        if not _plain_forward(model) or (self.flatten and not _plain_forward(fc)):
            return False  # a forward patched on the instance or the class computes something else
        if compat.hooks_registered((model, fc), self.params):
            return False
        if any(not p.requires_grad or not p.is_contiguous() for p in self.params):
            return False
        if not compat.autograd_unobserved():
            return False
        if not self.flatten and xs.dim() != 2:
            return False
        if self.classification:
            # class indices (not probabilities), none of them cross_entropy's ignore_index
            return ys.dim() == 1 and ys.dtype == torch.int64 and bool(ys.min() >= 0)
        return ys.is_floating_point()

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        return compat.call_without_grad(self._loss_and_grads, x, y)  # no graph to record: this is the backward

    def _loss_and_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.flatten:
            x = x.flatten(1)
        out = F.linear(x, self.weight, self.bias)  # [1, out]: addmm, as the forward under autograd
        if self.classification:
            logp = torch.log_softmax(out, 1)
            loss = compat.nll_loss(logp, y, None, _MEAN, _IGNORE_INDEX)
            # cross_entropy's backward: nll_loss's (total weight 1 for one unweighted sample), then log_softmax's
            d = _nll_loss_backward(self.one, logp, y, None, _MEAN, _IGNORE_INDEX, self.one)
            d = compat.log_softmax_backward(d, logp, 1, logp.dtype)
        else:
            y = y.reshape(out.shape)
            loss = compat.mse_loss(out, y, _MEAN)
            d = _mse_loss_backward(self.one, out, y, _MEAN)
        # linear's backward: mm_mat2_backward for the transposed weight (one row: plain products)
        # and the bias's sum over a batch of one, which is the row itself.
        gw = d.t().mm(x)
        if self.bias is None:
            return loss, [gw]
        return loss, [gw, d.view(-1)]


_FORWARDS = {Linear: Linear.forward, nn.Linear: nn.Linear.forward}


def _plain_forward(m: nn.Module) -> bool:
    """``m`` runs its class's own ``forward``, as defined when this module was imported."""
    return "forward" not in vars(m) and _FORWARDS.get(type(m)) is type(m).forward


def closed_form_for(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], params: list[Tensor]
) -> _LinearClosedForm | None:
    """The closed form for this model and loss, or None when the step needs autograd."""
    if not compat.closed_form_ok():
        return None
    if type(model) is Linear:
        fc = model.fc
        if not _plain_forward(model):
            return None
    elif type(model) is nn.Linear:
        fc = model
    else:
        return None
    if type(fc) is not nn.Linear or not _plain_forward(fc):
        return None
    if loss_fn is F.cross_entropy:
        classification = True
    elif loss_fn is _regression_loss:
        classification = False
    else:
        return None
    closed = _LinearClosedForm(model, fc, classification)
    if len(params) != len(closed.params) or any(p is not q for p, q in zip(params, closed.params)):
        return None  # a frozen or extra parameter: autograd decides what gets a grad
    if not fc.weight.is_floating_point() or any(p.dtype != fc.weight.dtype for p in closed.params):
        return None
    return closed
