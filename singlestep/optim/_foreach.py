"""When an optimizer may update a group's tensors with one ``torch._foreach_*`` call per op.

A ``_foreach`` op does the same per-element maths as a loop of single-tensor ops (same roundings,
same results), but crosses from Python into ATen once for the whole list: for a per-sample step on
a small model, or a model of many small tensors, the launches are most of the step's cost. Like
torch.optim, we take the foreach path when every tensor involved shares one device and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singlestep import _compat as compat
from singlestep.fastpaths import FAST

__all__: list[str] = []


def _foreach_ok(*tensor_lists: list[Tensor]) -> bool:
    """True when all tensors in all lists share the first one's device and dtype (and are dense)."""
    first = next((ts[0] for ts in tensor_lists if ts), None)
    if first is None:
        return False
    device, dtype = first.device, first.dtype
    return all(t.device == device and t.dtype == dtype and not t.is_sparse for ts in tensor_lists for t in ts)


def _fused_cpu_ok(*tensor_lists: list[Tensor], lr: float | Tensor = 0.0) -> bool:
    """True when torch's fused CPU kernel (``torch._fused_adam_`` and friends) may update a group.

    One kernel call per step instead of ~10 ``_foreach`` calls: on a small model each of those
    costs a few microseconds, the whole per-sample update a few more. The fused kernels do the
    same per-element maths in a different order of roundings (as torch's ``fused=True`` does
    next to its ``foreach`` path): per step, a few elements differ in the last bit. So they are
    taken where nothing traces the step (``_host_scalars_ok``: a traced or compiled step keeps
    the ``_foreach`` formula), for dense contiguous float32/float64 CPU tensors of one dtype (the
    kernels walk memory linearly, so every tensor must have the parameter's layout). Not with grad
    mode on (the functional form called on tensors that need grad: the kernels have no autograd
    formula and would update them silently) nor with a tensor lr on another device.
    """
    first = tensor_lists[0][0] if tensor_lists and tensor_lists[0] else None  # the params
    if not FAST.fused_kernels or first is None or first.dtype not in _FUSED_DTYPES or torch.is_grad_enabled():
        return False
    if not _host_scalars_ok(()):
        return False
    if isinstance(lr, Tensor) and not lr.is_cpu:
        return False
    dtype = first.dtype
    for ts in tensor_lists:  # a plain loop: this runs on every per-sample step
        for t in ts:
            if not (t.is_cpu and t.dtype is dtype and t.layout is _STRIDED and t.is_contiguous()):
                return False
    return True


_FUSED_DTYPES = (torch.float32, torch.float64)
_STRIDED = torch.strided


def _host_scalars_ok(tensors: list[Tensor]) -> bool:
    """True when small per-step values (step counts) may be read on the host and used as numbers.

    That is: CPU tensors (reading one costs less than the several tiny tensor ops it replaces, and
    there is no device to wait for), in plain execution, where nothing traces the step
    (``singlestep._compat.not_traced``: a read would fail or freeze the value into a graph).
    Elsewhere the caller keeps its tensor maths.
    """
    return compat.not_traced() and all(t.device.type == "cpu" for t in tensors)
