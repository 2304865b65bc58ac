"""Step engines: how one optimizer step, or a chunk of per-sample steps, executes.

The trainer owns the loop (order, boundaries, logging, evaluation); an engine owns the arithmetic
of a step. Every engine runs the one step definition, ``step.take_step`` (grad transforms, norm,
finite check, clip, ``optimizer.step()``, statistics kept on the device until
:meth:`Engine.read`); docs/architecture.md maps the files.
"""

from typing import Callable

from singlestep.engine.base import Engine, StepStats
from singlestep.engine.compiled import CompiledEngine
from singlestep.engine.cuda_graph import CudaGraphEngine
from singlestep.engine.eager import EagerEngine

__all__ = ["Engine", "StepStats", "EagerEngine", "CompiledEngine", "CudaGraphEngine", "build_engine"]


def build_engine(
    kind: str,
    *,
    chunk_size: int = 64,
    batch_shape: tuple[int, int] | None = None,
    total_steps: int | None = None,
    log: Callable[[str], None] | None = None,
    **kwargs,
) -> Engine:
    """Create the engine named by ``trainer.engine``.

    ``auto`` is the compiled engine deciding per shape, from the measured eager step time and
    the steps left, whether compiling pays for itself (a cached package nearly always does).
    """
    if kind == "eager":
        return EagerEngine(**kwargs)
    options = dict(chunk_size=chunk_size, batch_shape=batch_shape, total_steps=total_steps, log=log, **kwargs)
    if kind in ("compiled", "auto"):
        return CompiledEngine(auto=kind == "auto", **options)
    if kind == "cuda_graph":
        return CudaGraphEngine(**options)
    raise ValueError(f"unknown engine {kind!r}")
