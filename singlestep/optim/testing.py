"""Conformance checks any optimizer class can run: ``check_optimizer(MyOpt, lr=0.01)``.

The checks are the contract the trainer and engines rely on (see docs/optimizers.md). Each is a
named record in :data:`CHECKS` (like torch's ``OptimizerInfo`` entries): every check runs, and the
:class:`ConformanceReport` lists every one with its outcome, so a broken optimizer shows all its
faults at once, not the first. The fast checks run on the CPU on tiny tensors (a 4x3 matrix, a
3-vector and a parameter that never gets a gradient) with gradients of a fixed convex quadratic
written out in closed form, and take well under a second together.

Usage::

    from singlestep.optim.testing import check_optimizer, run_checks
    from examples.my_optimizers import SignSGD

    check_optimizer(SignSGD, lr=0.01)   # raises AssertionError listing every failed check
    print(run_checks(SignSGD, {"lr": 0.01}, slow=True))   # one line per check, compiled engine too

or, in a test table, once per set of keyword arguments::

    @pytest.mark.parametrize("kwargs", [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}])
    def test_conformance(kwargs):
        check_optimizer(MySGD, **kwargs)

The checks, by name:
    * ``invalid-lr``: a negative ``lr`` raises ``ValueError`` (torch-style validation in ``__init__``);
    * ``param-groups``: two param groups with different ``lr`` behave exactly like two separate optimizers;
    * ``grad-none``: a parameter whose ``grad`` is None is left untouched;
    * ``grad-untouched``: ``p.grad`` is never replaced or modified by ``step()``;
    * ``zero-grads``: all-zero gradients keep parameters and state finite;
    * ``zero-lr``: with every learning rate (``lr`` and any ``*_lr`` argument) at 0, parameters stay
      bitwise equal;
    * ``state-dict``: ``state_dict()`` taken mid-run survives ``torch.save`` +
      ``torch.load(weights_only=True)`` and a freshly built optimizer that loads it continues
      bitwise identically;
    * ``bf16``: bfloat16 parameters step without error, stay bfloat16 and finite;
    * ``descent``: 200 steps on the quadratic with the given kwargs at least halve the loss (pick an
      ``lr`` that can do that; with ``maximize=True`` the gradients of ``-f`` are fed);
    * ``tensor-lr``: ``lr`` given as a 0-dim tensor gives the same result as the float;
    * ``eval-train``: if the optimizer has ``eval()`` / ``train()`` (schedule-free style), they are
      inverses (skipped otherwise);
    * ``compiled-engine`` (slow, ~5-15 s: it compiles; only with ``slow=True``): 200 per-sample steps
      of a small MLP in :class:`singlestep.engine.CompiledEngine` give the parameters that
      :class:`singlestep.engine.EagerEngine` gives (rtol 1e-4), or the engine refuses the optimizer
      and runs eagerly, which passes with the note ``runs eagerly: <the engine's reason>``. It fails
      only when the results differ without a fall-back. Compiled chunks go to the engine's cache
      (``$SINGLESTEP_CACHE``), as in a training run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from singlestep.optim import _conformance as props
from singlestep.optim._conformance import Case, Outcome, Status

__all__ = ["CHECKS", "Check", "CheckResult", "ConformanceReport", "check_optimizer", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One conformance property: a readable name, what it asks, and the function that checks it.

    Attributes:
        name: the id reports and test ids use, e.g. ``"param-groups"``.
        summary: the property in one line.
        fn: takes the case under test, returns ``(status, message)``; an exception it raises is
            recorded as that check's failure.
        slow: run only when asked (``run_checks(..., slow=True)``); reported as skipped otherwise.
    """

    name: str
    summary: str
    fn: Callable[[Case], Outcome]
    slow: bool = False


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: the check's name.
        status: ``"pass"``, ``"fail"`` or ``"skip"``.
        message: for a failure, what was seen; for a pass or a skip, a note or an empty string
            (the compiled-engine check passes with ``"runs eagerly: <reason>"`` when the engine
            refuses the optimizer).
    """

    name: str
    status: Status
    message: str = ""

    @property
    def failed(self) -> bool:
        """True for a failure (a skip or a pass with a note is not one)."""
        return self.status == "fail"

    def __str__(self) -> str:
        mark = {"pass": "ok", "fail": "FAILED", "skip": "skipped"}[self.status]
        return f"{mark:8}{self.name}" + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class ConformanceReport:
    """Every check's result for one optimizer class and one set of keyword arguments.

    Attributes:
        optimizer: the optimizer as it was built, e.g. ``"SignSGD(lr=0.01)"``.
        results: one :class:`CheckResult` per check, in the order of :data:`CHECKS`.
    """

    optimizer: str
    results: tuple[CheckResult, ...]

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks, in order."""
        return [r for r in self.results if r.failed]

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count against it)."""
        return not self.failures

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r} in this report (have: {', '.join(r.name for r in self.results)})")

    def __str__(self) -> str:
        ran = sum(r.status != "skip" for r in self.results)
        head = f"{self.optimizer}: {len(self.failures)} of {ran} checks failed"
        return "\n".join([head, *(f"  {r}" for r in self.results)])

    def raise_if_failed(self) -> None:
        """Raise ``AssertionError`` naming every failed check and what it saw; do nothing if none failed."""
        if self.failures:
            ran = sum(r.status != "skip" for r in self.results)
            lines = [f"  failed '{r.name}': {r.message}" for r in self.failures]
            head = f"{self.optimizer} failed {len(lines)} of {ran} conformance checks:"
            raise AssertionError("\n".join([head, *lines]))


CHECKS: tuple[Check, ...] = (
    Check("invalid-lr", "a negative lr raises ValueError", props.invalid_lr),
    Check("param-groups", "two param groups behave like two separate optimizers", props.param_groups),
    Check("grad-none", "a parameter whose grad is None is left untouched", props.grad_none),
    Check("grad-untouched", "step() never replaces or modifies p.grad", props.grad_untouched),
    Check("zero-grads", "all-zero gradients keep parameters and state finite", props.zero_grads),
    Check("zero-lr", "with every learning rate at 0 the parameters stay bitwise equal", props.zero_lr),
    Check("state-dict", "a mid-run state_dict survives torch.save/load and continues bitwise",
          props.state_dict_round_trip),  # fmt: skip
    Check("bf16", "bfloat16 parameters step, stay bfloat16 and finite", props.bf16),
    Check("descent", f"{props.DESCENT_STEPS} steps at least halve a convex quadratic", props.descent),
    Check("tensor-lr", "a 0-dim tensor lr gives the float lr's result", props.tensor_lr),
    Check("eval-train", "eval() and train(), when offered, are inverses", props.eval_train),
    Check("compiled-engine", "the compiled engine gives eager's results or runs eagerly and says why",
          props.compiled_engine, slow=True),  # fmt: skip
)


def run_checks(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any] | None = None, *, slow: bool = False,
               only: Iterable[str] | None = None) -> ConformanceReport:  # fmt: skip
    """Run every check on ``cls`` built with ``kwargs`` and report each one; never stops at a failure.

    Args:
        cls: a ``torch.optim.Optimizer`` subclass taking ``params`` first.
        kwargs: hyper-parameters for ``cls`` (as they would come from the config).
        slow: also run the slow checks (``compiled-engine``, which compiles: ~5-15 s); without it
            they are reported as skipped.
        only: names of the checks to run (see :data:`CHECKS`); None runs them all.

    Returns:
        The report: one result per check run or skipped, in the order of :data:`CHECKS`. A check
        that raises is recorded as failed with the exception.

    Raises:
        ValueError: ``only`` names a check that does not exist.
        AssertionError: ``cls`` has no default ``lr`` and ``kwargs`` gives none.

    Example:
        >>> from singlestep.optim import SGD
        >>> report = run_checks(SGD, {"lr": 0.1}, only=["descent", "grad-untouched"])
        >>> print(report)
        SGD(lr=0.1): 0 of 2 checks failed
          ok      grad-untouched
          ok      descent
    """
    wanted = None if only is None else set(only)
    unknown = sorted((wanted or set()) - {c.name for c in CHECKS})
    if unknown:
        raise ValueError(f"Invalid check name(s) {unknown}; expected some of: {', '.join(c.name for c in CHECKS)}")
    kwargs = dict(kwargs or {})
    case = Case(cls, kwargs)
    results = []
    for check in CHECKS:
        if wanted is not None and check.name not in wanted:
            continue
        if check.slow and not slow:
            results.append(CheckResult(check.name, "skip", "slow; run_checks(..., slow=True) runs it"))
            continue
        try:
            status, message = check.fn(case)
        except Exception as exc:  # noqa: BLE001  (a check that raises is that check's finding; the rest still run)
            status, message = "fail", f"raised {exc!r}"
        results.append(CheckResult(check.name, status, message))
    return ConformanceReport(f"{cls.__name__}({_fmt(kwargs)})", tuple(results))


def check_optimizer(cls: type[torch.optim.Optimizer], **kwargs: Any) -> ConformanceReport:
    """Run every fast conformance check on ``cls`` built with ``kwargs``; see the module docstring.

    The slow ``compiled-engine`` check is skipped here (it compiles); ask for it with
    ``run_checks(cls, kwargs, slow=True)``.

    Args:
        cls: a ``torch.optim.Optimizer`` subclass taking ``params`` first.
        **kwargs: hyper-parameters for ``cls`` (as they would come from the config).

    Returns:
        The report, when no check failed.

    Raises:
        AssertionError: naming the optimizer, its kwargs, and every failed check with what it saw.

    Example:
        >>> from singlestep.optim import SGD
        >>> check_optimizer(SGD, lr=0.1, momentum=0.9).ok
        True
    """
    report = run_checks(cls, kwargs)
    report.raise_if_failed()
    return report


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
