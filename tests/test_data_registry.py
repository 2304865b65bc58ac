"""Every registered dataset builder keeps the schema contract the config checker relies on."""

from __future__ import annotations

import inspect
import typing

import pytest

from singlestep.registry import DATASETS, load_builtins

load_builtins()
OURS = ["mnist", "fashion_mnist", "cifar10", "text", "shakespeare"]


def test_file_datasets_are_registered():
    assert set(OURS) <= set(DATASETS.names())


@pytest.mark.parametrize("name", OURS)
def test_builder_signature_is_a_schema(name):
    """Device first, then keyword-only settings with resolvable plain annotations; no **kwargs."""
    builder = DATASETS.get(name)
    hints = typing.get_type_hints(builder)  # annotations must resolve for the config checker
    params = list(inspect.signature(builder).parameters.values())
    assert params[0].name == "device"
    for p in params[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.name in hints, p.name
    required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]
    assert required == (["path"] if name == "text" else [])
