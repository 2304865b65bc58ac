"""Property: whatever a config file or an override says, the outcome is a Config or a UserError.

Random mappings (real key names with random values, random keys, nested lists and mappings),
random YAML text and random ``key=value`` overrides go through ``validate``, ``load_config``,
``apply_overrides`` and the CLI's ``--print-config`` path; no other exception may escape, and a
config that loads prints a resolved config that loads back to itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from singlestep.config import (
    COMPONENTS,
    OPTIMIZER_RESERVED,
    TOP_LEVEL,
    Config,
    OutputConfig,
    TrainerConfig,
    apply_overrides,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_overrides,
    validate,
)
from singlestep.errors import UserError
from singlestep.registry import load_builtins
from singlestep.signature import builder_params
from singlestep.train import main
from tests.conftest import base_config

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # a dev dependency: pip install -e .[dev]
    pytest.skip("needs hypothesis", allow_module_level=True)

# Bounded for CI: the whole file runs in seconds; a failure prints the example and a blob to replay.
FUZZ = settings(
    max_examples=200, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip

load_builtins()
SECTION_KEYS = {"trainer": [f.name for f in dataclasses.fields(TrainerConfig)],
                "output": [f.name for f in dataclasses.fields(OutputConfig)]}  # fmt: skip
COMPONENT_KEYS = {
    key: sorted({p.name for name in registry.names() for p, _ in builder_params(registry.get(name), n)} | {"name"})
    for key, (registry, n) in COMPONENTS.items()
}
COMPONENT_KEYS["optimizer"] += list(OPTIMIZER_RESERVED)
REAL_KEYS = sorted({k for ks in (TOP_LEVEL, *SECTION_KEYS.values(), *COMPONENT_KEYS.values()) for k in ks} | {"match"})
REAL_PATHS = [[k] for k in TOP_LEVEL] + [[s, k] for s, ks in {**SECTION_KEYS, **COMPONENT_KEYS}.items() for k in ks]
NAMES = [n for registry, _ in COMPONENTS.values() for n in registry.names()] + [
    "torch.optim.SGD", "torch.optim:Adam", "torch.nn.Linear", "torch.optim.NoSuch", "nosuchmodule.Thing",
    ".relative.Name", "a..b", "torch.optim:", ":Name", "torch..optim.SGD", "singlestep.models.linear.Linear",
    "builtins.print", "builtins.len", "typing.Protocol", "collections.OrderedDict",
]  # fmt: skip
# Values that once escaped as ValueError (the last four) or that a message treats specially.
WORDS = ["None", "none", "Null", "nil", "~", "null", "cpu", "cuda", "cuda:0", "cuda:200", "auto", "per_sample",
         "minibatch", "eager", "compiled", "1e-3", "1e3", "true", "yes", "[0.9]",
         "2020-13-45", "._", "0b_", "!!float x"]  # fmt: skip


def _safe_text(s: str) -> bool:
    """False for a dotted name whose top module exists but is not loaded yet: importing it could run anything."""
    top = re.split(r"[.:]", s.strip(), maxsplit=1)[0]
    if not top.isidentifier() or top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):
        return True


texts = st.text(max_size=16).filter(_safe_text)
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    # No subnormals: a Trainer run earlier in this process sets torch.set_flush_denormal(True),
    # under which hypothesis refuses to draw them.
    | st.floats(allow_subnormal=False) | texts | st.sampled_from(NAMES + WORDS)
)  # fmt: skip
keys = st.sampled_from(REAL_KEYS) | st.text(max_size=8) | st.integers(-3, 3) | st.none() | st.booleans()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
)


@st.composite
def configs(draw) -> Any:
    """Mostly a working config with a few keys set to random values, sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    raw = base_config()
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(REAL_PATHS) | st.lists(keys, min_size=1, max_size=3))
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = draw(values)
    return raw


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


@st.composite
def overrides(draw) -> list[str]:
    """``key=value`` strings: real or random key paths, YAML-written or random values, and plain junk."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            out.append(draw(texts))
            continue
        key = ".".join(draw(st.sampled_from(REAL_PATHS))) if kind < 3 else draw(texts)
        value = _flow(draw(values)) if kind == 1 else draw(texts | st.sampled_from(NAMES + WORDS))
        out.append(f"{key}={value}")
    return out


def _outcome(call) -> Any:
    """The call's result, or the UserError it raised; any other exception fails the test."""
    try:
        return call()
    except UserError as exc:
        assert str(exc), "a user error needs a message"
        return exc


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="singlestep-fuzz-") as d:
        yield Path(d)


def _write(folder: Path, text: str) -> Path:
    path = folder / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@FUZZ
@given(raw=configs())
def test_validate_gives_a_config_or_a_config_error(raw):
    result = _outcome(lambda: validate(raw, "<fuzz>"))
    assert isinstance(result, (Config, UserError))


@FUZZ
@given(raw=configs(), items=overrides())
def test_overrides_give_a_mapping_or_a_config_error(raw, items):
    def apply():
        apply_overrides(raw, parse_overrides(items), {})
        return raw

    result = _outcome(apply)
    assert isinstance(result, (dict, UserError)) or not isinstance(raw, dict)


@FUZZ
@given(text=st.one_of(configs().map(dump_yaml), st.text(max_size=60), st.sampled_from(WORDS)), items=overrides())
def test_load_config_gives_a_config_or_a_config_error(folder, text, items):
    result = _outcome(lambda: load_config(_write(folder, text), items))
    assert isinstance(result, (Config, UserError))


@FUZZ
@given(raw=configs(), items=overrides())
def test_cli_print_config_exits_0_or_2_and_its_output_loads_back(folder, raw, items):
    path = _write(folder, dump_yaml(raw))  # the project's dumper: the string '1e3' stays a string
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(path), "--print-config", *items])
    if code == 2:
        assert not out.getvalue() and err.getvalue().startswith("error: ") and "Traceback" not in err.getvalue()
        return
    assert code == 0, (code, err.getvalue())
    # The resolved config is itself a config that resolves to the same text (saved with each run).
    printed = out.getvalue()
    assert dump_yaml(config_to_dict(load_config(_write(folder, printed)))) == printed
