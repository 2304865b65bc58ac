"""``trainer.engine: auto``: compile a shape only when that pays for itself over the steps left.

The eager cost is measured (the fastest of up to four eager chunks after the warm-up, those that
fit in the call that times them); the compiled speed-up and the compile time are estimates from
measurements on a 2-core CPU (docs/performance.md): per-sample chunks run ~8x faster than eager
steps for small models (one thread), ~2.5x for larger ones (the tiny LM), mini-batch steps
~1.15x; a cold compile costs ~8.5 s plus ~20 ms per graph node, a cached package ~0.2 s (a
trace, or a recipe and a load). The decision is a value (:class:`Decision`) the engine acts on.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AutoPolicy", "Decision"]

_PER_SAMPLE_SPEEDUP = 8.0  # softmax regression, closed-form eager: SGD 78 / 7.7 us, Adam 103 / 15.0, Adagrad 97 / 12.5
_PER_SAMPLE_SPEEDUP_LARGE = 2.5
_MINIBATCH_SPEEDUP = 1.15
COMPILE_BASE_S = 8.5
_COMPILE_PER_NODE_S = 0.02
CACHED_LOAD_S = 0.2

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Decision:
    """Whether to compile a shape, and the line that says why."""

    compile: bool
    message: str


class AutoPolicy:
    """The cost model behind ``auto``: measured eager seconds per step against estimated savings.

    Args:
        total_steps: the run's steps (None: unknown, nothing to gain).
    """

    def __init__(self, total_steps: int | None):
        self.total_steps = total_steps
        self.eager_step_seconds: dict[Shape, float] = {}

    def gain(self, shape: Shape, steps_done: int, one_thread: bool) -> float:
        """Seconds compiling would save over the steps left, before its own cost."""
        eager = self.eager_step_seconds.get(shape, 0.0)
        if shape[1:] != (1, 1):
            speedup = _MINIBATCH_SPEEDUP
        else:
            speedup = _PER_SAMPLE_SPEEDUP if one_thread else _PER_SAMPLE_SPEEDUP_LARGE
        return max(0, (self.total_steps or 0) - steps_done) * eager * (1 - 1 / speedup)

    def decide(self, shape: Shape, steps_done: int, one_thread: bool, *, cached: bool, nodes: int | None) -> Decision:
        """Compile (or load) ``shape`` or not: ``cached`` a package is known; ``nodes`` the traced
        graph's size (None: not traced, the cold compile's base cost is the floor)."""
        cost = CACHED_LOAD_S if cached else COMPILE_BASE_S + _COMPILE_PER_NODE_S * (nodes or 0)
        if cached:
            how = "a cached package"
        elif nodes is None:
            how = f"compiling (no cached package; at least ~{cost:.0f}s)"
        else:
            how = f"compiling (~{cost:.0f}s, {nodes} graph nodes)"
        gain = self.gain(shape, steps_done, one_thread)
        situation = self._situation(shape, steps_done)
        if gain <= cost:
            return Decision(False, f"engine auto: eager, {how} would not pay off: {situation}, ~{gain:.1f}s to gain")
        return Decision(True, f"engine auto: compiled, using {how}: {situation}, ~{gain - cost:.0f}s saved")

    def _situation(self, shape: Shape, steps_done: int) -> str:
        eager = self.eager_step_seconds.get(shape, 0.0)
        left = max(0, (self.total_steps or 0) - steps_done)
        return f"eager {eager * 1e6:,.0f} us/step, {left:,} steps left"
