"""Registry: duplicate names, dotted-path loading of user classes, kind checks."""

from __future__ import annotations

import textwrap

import pytest
import torch

from singlestep.errors import RegistryError
from singlestep.registry import OPTIMIZERS, Registry, load_builtins


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.add("a", lambda: 1, description="first")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", lambda: 2)


def test_description_defaults_to_first_doc_line():
    reg = Registry("thing")

    @reg.register("documented")
    def f():
        """One line.

        More text.
        """

    assert reg.entries()[0].description == "One line."


def test_dotted_path_to_user_class_in_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_opts_mod.py").write_text(textwrap.dedent("""
        import torch
        class SignSGD(torch.optim.SGD):
            pass
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("my_opts_mod:SignSGD", "my_opts_mod.SignSGD"):
        cls = OPTIMIZERS.get(path)
        assert issubclass(cls, torch.optim.Optimizer) and cls.__name__ == "SignSGD"


def test_torch_optimizer_by_dotted_path():
    assert OPTIMIZERS.get("torch.optim.SGD") is torch.optim.SGD


def test_non_optimizer_class_rejected_clearly():
    with pytest.raises(RegistryError, match="not a torch.optim.Optimizer subclass"):
        OPTIMIZERS.get("torch.nn.Linear")


def test_missing_module_and_attribute():
    with pytest.raises(RegistryError, match="cannot import module 'no_such_pkg_x'"):
        OPTIMIZERS.get("no_such_pkg_x:Opt")
    with pytest.raises(RegistryError, match="has no attribute 'NoSuch'"):
        OPTIMIZERS.get("torch.optim:NoSuch")


def test_unknown_key_suggests():
    load_builtins()
    with pytest.raises(RegistryError, match="unknown optimizer 'sgdd'"):
        OPTIMIZERS.get("sgdd")


def test_registering_a_non_optimizer_fails():
    reg = Registry("optimizer", OPTIMIZERS._check)
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        reg.add("bad", object)
