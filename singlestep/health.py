"""When training goes wrong: from one log window's statistics, train on or stop, and why.

The trainer reads the device-side statistics once per ``log_every`` steps; that read is where a
non-finite step or a diverging loss is noticed (no extra sync). The decision is a value: None
(train on) or the reason to stop, which the run reports, puts in ``summary.json`` (status
``diverged``) and ends with exit code 3.
"""

from __future__ import annotations

import math
from typing import Any

from singlestep.config import TrainerConfig

__all__ = ["window_problem"]


def window_problem(stats: dict[str, Any], t: TrainerConfig, skipped_total: int, step: int) -> str | None:
    """Why the run should stop after this window, or None.

    Args:
        stats: the window's statistics (``Engine.read()``): loss, skipped_steps, steps.
        t: the trainer config (check_finite, on_nonfinite, max_nonfinite, divergence_threshold).
        skipped_total: steps skipped since the run started, this window's included.
        step: the step the window ends at.

    >>> t = TrainerConfig(divergence_threshold=10.0)
    >>> window_problem({"loss": 0.5, "skipped_steps": 0, "steps": 100}, t, 0, 100) is None
    True
    >>> window_problem({"loss": 0.5, "skipped_steps": 3, "steps": 100}, t, 3, 100)
    "non-finite loss or gradients: 3 of the 100 steps up to step 100 were skipped (trainer.on_nonfinite: stop; 'skip' trains on past them)"
    >>> window_problem({"loss": 20.0, "skipped_steps": 0, "steps": 100}, t, 0, 100)
    'the training loss 20 is over trainer.divergence_threshold 10 (the window ending at step 100)'
    """
    skipped, steps, loss = stats["skipped_steps"], stats["steps"], stats["loss"]
    if not t.check_finite and not math.isfinite(loss):
        return (f"the training loss is {loss} in the window ending at step {step:,} (trainer.check_finite is off, so "
                "the optimizer saw it and the parameters may be non-finite too)")  # fmt: skip
    if skipped and t.on_nonfinite == "stop":
        return (f"non-finite loss or gradients: {skipped:,} of the {steps:,} steps up to step {step:,} were skipped "
                "(trainer.on_nonfinite: stop; 'skip' trains on past them)")  # fmt: skip
    if skipped and t.max_nonfinite is not None and skipped_total > t.max_nonfinite:
        return (f"{skipped_total:,} steps were skipped for a non-finite loss or gradients by step {step:,}, more than "
                f"trainer.max_nonfinite ({t.max_nonfinite})")  # fmt: skip
    if t.divergence_threshold is not None and math.isfinite(loss) and loss > t.divergence_threshold:
        return (f"the training loss {loss:.4g} is over trainer.divergence_threshold {t.divergence_threshold:g} "
                f"(the window ending at step {step:,})")  # fmt: skip
    return None
