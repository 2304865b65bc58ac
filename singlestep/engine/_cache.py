"""The compiled engine's disk cache: where packages live, and the two keys that find them.

Compiled packages are kept in ``$SINGLESTEP_CACHE/compiled`` (default ``~/.cache/singlestep``)
under a hash of the traced step graph, its input shapes, the compiler settings and the torch
build (:func:`graph_key`). A *recipe* file, named by a hash of everything the trace is built from
(:func:`recipe_key`: code files, model and optimizer structure and settings, shapes), names the
package, so a run whose recipe is known loads it without tracing. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from singlestep import _compat as compat
from singlestep.engine.step import StepRule

__all__ = ["cache_dir", "graph_key", "recipe_key", "recipe_target", "vec_isa_record"]

# Bump when the chunk's structure changes, so stale cached packages are never loaded.
_FORMAT = "singlestep-chunk-v4"


def cache_dir() -> Path:
    """Where compiled chunks are kept between runs (``$SINGLESTEP_CACHE/compiled``)."""
    return Path(os.environ.get("SINGLESTEP_CACHE", Path.home() / ".cache" / "singlestep")) / "compiled"


def _machine() -> str:
    return f"{_FORMAT}|{torch.__version__}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}"


def graph_key(graph: torch.fx.GraphModule, example: tuple, shape: tuple[int, int, int], signature: str,
              configs: dict[str, Any]) -> str:  # fmt: skip
    """A hash of everything the compiled chunk depends on: graph code and input metas.

    The graph holds no tensor constants (a step that reads any runs eagerly), so its code is all of it.
    """
    h = hashlib.sha256(_machine().encode())
    h.update(f"|{shape}|{signature}|{configs}|".encode())
    h.update(graph.code.encode())
    for t in compat.tree_leaves(example):
        h.update(f"{tuple(t.shape)}:{t.dtype}:{t.device.type}|".encode())
    return h.hexdigest()[:32]


def recipe_key(shape: tuple[int, int, int], example: tuple, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               params: list[Tensor], train: Any, loss_fn: Any, rule: StepRule, configs: dict[str, Any]) -> str:  # fmt: skip
    """A hash of what the traced step is built from, computed without tracing it.

    Code: every source file of this package, of the classes involved (model modules, optimizer,
    split, loss, gradient transforms) and of any loaded module outside the Python and
    site-packages trees (the user's own code), by size and modification time. Objects: the model's
    modules and their plain attributes, parameter shapes, the optimizer's class, plain attributes
    and group settings other than lr (an input of the chunk), the step rule, input shapes, torch
    build and settings. Anything unaccounted for only makes a key differ, which costs a trace.
    """
    h = hashlib.sha256(_machine().encode())
    h.update(f"|{shape}|{train.signature()}|{configs}|{_qualname(type(train))}|{_qualname(loss_fn)}".encode())
    h.update(f"|{torch.get_default_dtype()}|{torch.are_deterministic_algorithms_enabled()}".encode())
    h.update(f"|{torch.get_float32_matmul_precision()}|{rule.clip_grad_norm}|{rule.clip_grad_value}|{rule.check_finite}".encode())
    h.update(f"|{[_qualname(t) for t in rule.grad_transforms]}".encode())
    for name, m in model.named_modules():
        h.update(f"|{name}:{_qualname(type(m))}:{m.training}:{_plain_attrs(m)}".encode())
    for name, p in model.named_parameters():
        h.update(f"|{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}".encode())
    h.update(f"|{_qualname(type(optimizer))}:{_plain_attrs(optimizer)}".encode())
    pos = {id(p): i for i, p in enumerate(params)}
    for group in optimizer.param_groups:
        settings = sorted((key, repr(v)) for key, v in group.items() if key not in ("params", "lr", "initial_lr"))
        h.update(f"|{[pos.get(id(p)) for p in group['params']]}:{settings}".encode())
    for t in compat.tree_leaves(example):
        h.update(f"{tuple(t.shape)}:{t.dtype}:{t.device.type}|".encode())
    classes = [type(m) for m in model.modules()] + [type(optimizer), type(train)]
    for path in sorted(_code_files(classes, [loss_fn, *rule.grad_transforms])):
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"|{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def recipe_target(recipe: Path) -> Path | None:
    """The package a recipe file names, if both exist."""
    try:
        name = recipe.read_text().strip()
    except OSError:
        return None
    path = recipe.parent / name
    return path if name.startswith("chunk-") and name.endswith(".pt2") and path.exists() else None


def vec_isa_record() -> Path | None:
    """A file whose existence says every claimed ISA passed Inductor's build-and-load check here.

    Inductor checks each vector ISA the CPU claims, once per process, by compiling a probe and
    loading it in a fresh Python process: ~1.5 s of every cold compile on the 2-core CPU. The
    outcome depends on the machine, the compiler and torch, which name the record; once it says
    all passed, later compiles tell Inductor so (``cpp.vec_isa_ok``) instead of checking again.
    Where any failed, no record is written and Inductor keeps checking.
    """
    import shutil

    claimed = compat.claimed_vec_isas()
    name = compat.cpp_compiler() if claimed else None
    if name is None:
        return None
    compiler = shutil.which(name) or name
    try:
        stamp = os.stat(compiler).st_mtime_ns
    except OSError:
        return None
    h = hashlib.sha256(f"{torch.__version__}|{compiler}:{stamp}|{[str(i) for i in claimed]}".encode())
    return cache_dir() / f"vec-isa-{h.hexdigest()[:32]}.ok"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _plain_attrs(obj: Any) -> list[tuple[str, Any]]:
    """Public attributes holding plain values (numbers, strings, flags): settings code may read."""
    plain = (bool, int, float, str, type(None))
    return sorted((k, v) for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, plain))


def _code_files(classes: list[type], functions: list[Any]) -> set[str]:
    """Source files the traced step may run: see :func:`recipe_key`."""
    import sysconfig

    files = {str(f) for f in Path(__file__).resolve().parents[1].rglob("*.py")}
    for obj in [*classes, *functions]:
        for cls in getattr(obj, "__mro__", (obj,)):
            module = sys.modules.get(getattr(cls, "__module__", "") or "")
            if module is not None and getattr(module, "__file__", None):
                files.add(module.__file__)
    paths = sysconfig.get_paths()
    trees = tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and not os.path.realpath(f).startswith(trees):
            files.add(f)
    return files
