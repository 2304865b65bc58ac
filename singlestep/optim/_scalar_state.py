"""Per-parameter scalar state (``step`` and friends): float32, 0-dim, on the parameter's device.

torch keeps ``state["step"]`` as a float32 0-dim tensor; ours also lives on the parameter's device
so that a compiled or CUDA-graphed ``step()`` never touches the host. ``Optimizer.load_state_dict``
casts every floating state tensor except ``step`` to the parameter's dtype and leaves ``step``
where it was saved, so a post-load hook puts all scalar state back to float32 on the right device
(bf16 parameters would otherwise get a bf16 step counter or weight sum).
"""

from __future__ import annotations

import torch

__all__: list[str] = []

# State keys that hold one float32 number per parameter (schedule-free keeps two more).
_SCALAR_KEYS = ("step", "weight_sum", "lr_max")


def _scalar_zero(p: torch.Tensor) -> torch.Tensor:
    """A fresh float32 0-dim zero on ``p``'s device."""
    return torch.zeros((), dtype=torch.float32, device=p.device)


def _scalar_state_to_fp32(optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` post-hook: scalar state back to float32 on the parameter's device."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in _SCALAR_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(dtype=torch.float32, device=p.device)
