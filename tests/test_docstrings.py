"""Every ``>>>`` example in ``singlestep/`` runs and prints what its docstring says (doctest).

The modules are found by their source, so a new example is picked up without touching this file;
``test_every_optimizer_has_an_example`` keeps the set from shrinking to nothing unnoticed.
"""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

from singlestep.registry import OPTIMIZERS, load_builtins

PACKAGE = Path(__file__).resolve().parents[1] / "singlestep"
load_builtins()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def _examples(module) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    tests = _examples(module)
    assert tests, f"{name} contains '>>>' but doctest finds no example in its docstrings"
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.attempted >= len(tests)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed:\n{out.getvalue()}"


def test_every_optimizer_has_an_example():
    """The registered optimizers' modules are among those examined, each with an example of its class."""
    for name in OPTIMIZERS.names():
        cls = OPTIMIZERS.get(name)
        assert cls.__module__ in MODULES, f"optimizer {name!r} ({cls.__module__}) has no '>>>' example"
        found = {t.name.rsplit(".", 1)[-1] for t in _examples(importlib.import_module(cls.__module__))}
        assert cls.__name__ in found, f"optimizer {name!r}: no example in the docstring of {cls.__name__}"
    assert "singlestep.optim.testing" in MODULES
