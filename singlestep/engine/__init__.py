"""Step engines: how one optimizer step, or a chunk of per-sample steps, executes.

The trainer owns the loop (order, boundaries, logging, evaluation); an engine owns the arithmetic
of a step. Every engine keeps the same contract (DESIGN.md): forward, loss, grads, finite check,
clip, ``optimizer.step()``, ``scheduler.step()``, and accumulates its loss / grad-norm statistics
on the device until :meth:`Engine.read` is called.
"""

from singlestep.engine.base import Engine, StepStats
from singlestep.engine.compiled import CompiledEngine
from singlestep.engine.eager import EagerEngine

__all__ = ["Engine", "StepStats", "EagerEngine", "CompiledEngine", "build_engine"]


def build_engine(kind: str, *, chunk_size: int = 64, **kwargs) -> Engine:
    """Create the engine named by ``trainer.engine`` (``auto`` resolves to the best available)."""
    if kind in ("auto", "eager"):
        return EagerEngine(**kwargs)
    if kind == "compiled":
        return CompiledEngine(chunk_size=chunk_size, **kwargs)
    raise ValueError(f"unknown engine {kind!r}")
