"""Registries of models, datasets, optimizers and schedulers, with a dotted-path fallback.

A component in the config is named either by its registry key (``adam``) or by an import path
(``mypkg.opts:SignSGD`` or ``mypkg.opts.SignSGD``), resolved with the working directory on
``sys.path`` so a user's own module next to their config just works.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from singlestep.errors import RegistryError

__all__ = [
    "Entry",
    "Registry",
    "MODELS",
    "DATASETS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "load_builtins",
    "import_object",
]


@dataclass(frozen=True)
class Entry:
    """One registered component: its key, the class or builder, and a one-line description."""

    name: str
    obj: Callable[..., Any]
    description: str


def _first_doc_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def import_object(path: str) -> Any:
    """Import ``pkg.mod:Name`` or ``pkg.mod.Name``; the working directory is importable too.

    Raises:
        RegistryError: the module or attribute does not exist (the message says which).
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"'{path}' is not an import path (expected 'package.module:Name')")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RegistryError(f"cannot import module '{module_name}' for '{path}': {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"module '{module_name}' has no attribute '{attr}'") from None
    return obj


class Registry:
    """A name -> component table for one kind of component.

    Args:
        kind: what the entries are, for messages ("optimizer").
        check: optional validator; called with each resolved object, returns an error string or None.
    """

    def __init__(self, kind: str, check: Callable[[Any], str | None] | None = None):
        self.kind = kind
        self._check = check
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, description: str | None = None) -> Callable:
        """Decorator form of :meth:`add`."""

        def deco(obj: Callable) -> Callable:
            self.add(name, obj, description=description)
            return obj

        return deco

    def add(self, name: str, obj: Callable, *, description: str | None = None) -> None:
        """Register ``obj`` under ``name``; a name already taken raises ``ValueError``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered ({self._entries[name].obj!r})")
        problem = self._check(obj) if self._check else None
        if problem:
            raise ValueError(f"cannot register {self.kind} '{name}': {problem}")
        self._entries[name] = Entry(name, obj, description or _first_doc_line(obj))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> Callable:
        """Resolve a registry key or a dotted import path to the component.

        Raises:
            RegistryError: unknown name (with close matches), failed import, or wrong kind of object.
        """
        if name in self._entries:
            return self._entries[name].obj
        if "." not in name and ":" not in name:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise RegistryError(
                f"unknown {self.kind} '{name}'{hint}; registered: {', '.join(self.names())};"
                " or give an import path like 'mypkg.module:Name'"
            )
        obj = import_object(name)
        problem = self._check(obj) if self._check else None
        if problem:
            raise RegistryError(f"'{name}' cannot be used as {self.kind}: {problem}")
        return obj


def _check_optimizer(obj: Any) -> str | None:
    import torch

    if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
        return f"{obj!r} is not a torch.optim.Optimizer subclass"
    return None


def _check_callable(obj: Any) -> str | None:
    return None if callable(obj) else f"{obj!r} is not callable"


MODELS = Registry("model", _check_callable)
DATASETS = Registry("dataset", _check_callable)
OPTIMIZERS = Registry("optimizer", _check_optimizer)
SCHEDULERS = Registry("scheduler", _check_callable)

_BUILTIN_MODULES = ("singlestep.models", "singlestep.data", "singlestep.optim")  # optim imports its schedulers


def load_builtins() -> None:
    """Import the packages whose modules register the built-in components (idempotent)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
