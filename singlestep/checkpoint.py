"""Run state on disk: checkpoints written atomically, loaded without unpickling code.

A checkpoint is one ``torch.save`` file, ``RUN_DIR/checkpoints/step-<N>.pt``, holding everything
a run needs to continue exactly where it stopped (assembled by ``Trainer.state_dict``)::

    {format, versions: {torch, singlestep}, config (resolved), model, optimizer, scheduler,
     loop: LoopState + counters, rng: {torch, cuda, python, numpy}, engine (auto's choice,
     compiled shapes), metrics_bytes (metrics.jsonl's length when it was written)}

Writing: a temporary file in the same folder, flushed and fsynced, then renamed over the final
name and the folder fsynced; a crash mid-write leaves the previous checkpoints as they were. Only
tensors and plain values (numbers, strings, lists, dicts) are written, and every load uses
``torch.load(weights_only=True)``: a checkpoint that names a Python object (a pickled function)
is refused, never executed.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import singlestep
from singlestep.errors import ConfigError, UserError, first_line

__all__ = [
    "FORMAT",
    "RESUMABLE_KEYS",
    "Resume",
    "changed_keys",
    "check_belongs",
    "checkpoints",
    "find_checkpoint",
    "load_checkpoint",
    "not_plain",
    "prune",
    "resume_config",
    "rng_state",
    "save_checkpoint",
    "set_aside_newer",
    "set_rng_state",
    "versions",
]  # fmt: skip

FORMAT = 2  # 2: the loop's boundary_done, the trainer's on_nonfinite keys in the config
# Config keys a resumed run may change: it may train longer (or stop earlier, but not before the
# checkpoint). Every other key shapes the numbers, so a change is refused.
RESUMABLE_KEYS = ("trainer.epochs", "trainer.max_steps")
_NAME = re.compile(r"^step-(\d+)\.pt$")
# What torch.load(weights_only=True) accepts, besides tensors and containers.
_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)


def not_plain(obj: Any, where: str = "") -> str | None:
    """The key path of the first value a weights-only load would refuse, with its type; None if
    everything is tensors and plain values.

    >>> not_plain({"a": [1, 2.0, torch.zeros(1)]}) is None
    True
    >>> not_plain({"a": {"fn": print}})
    "['a']['fn'] (builtin_function_or_method)"
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:  # exact types: a str subclass is a class to unpickle
        return None
    if isinstance(obj, (dict, OrderedDict)):
        items = obj.items()
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):  # not a namedtuple
        items = enumerate(obj)
    else:
        return f"{where} ({type(obj).__name__})"
    for key, value in items:
        if not isinstance(key, (str, int)):
            return f"{where} key {key!r} ({type(key).__name__})"
        found = not_plain(value, f"{where}[{key!r}]")
        if found:
            return found
    return None


def save_checkpoint(folder: Path, step: int, state: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically to ``folder/step-<step>.pt``.

    Raises:
        UserError: the file cannot be written (disk full, permissions); earlier checkpoints are
            left as they were, and no temporary file remains.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)  # the rename itself survives a power cut
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on every platform/filesystem; the file itself is synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called after a new one is safely written),
    and any temporary file a killed process left mid-write."""
    for old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    for tmp in folder.glob(".step-*.tmp"):
        if not tmp.name.endswith(f".{os.getpid()}.tmp"):
            tmp.unlink(missing_ok=True)


def find_checkpoint(target: str | Path) -> tuple[Path, Path]:
    """``--resume``'s argument, a run folder, its ``checkpoints/`` or a checkpoint file in it, as
    ``(run_dir, checkpoint)``; a folder resumes from its newest checkpoint.

    Raises:
        UserError: no such folder or file, a folder without checkpoints, or a file that is not in
            a run folder's ``checkpoints/`` (a resume writes into the run folder it belongs to).
    """
    target = Path(target)
    if target.is_file():
        run_dir = target.parent.parent
        if target.parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {target}: a checkpoint resumes in its own run folder, "
                            "RUN_DIR/checkpoints/step-<N>.pt; this file is not in one")  # fmt: skip
        return run_dir, target
    if not target.is_dir():
        raise UserError(f"--resume {target}: no such run folder or checkpoint file")
    if target.name == "checkpoints" and (target.parent / "config.yaml").is_file():
        target = target.parent
    found = checkpoints(target / "checkpoints")
    if not found:
        why = "its checkpoints/ folder is empty" if (target / "checkpoints").is_dir() else "it has no checkpoints/ folder"
        raise UserError(f"--resume {target}: no checkpoint to resume from ({why}); start the run again with "
                        "--config and a new output.run_dir")  # fmt: skip
    return target, found[-1]


def set_aside_newer(folder: Path, chosen: Path) -> Path | None:
    """Move the checkpoints newer than ``chosen`` into ``folder/abandoned-<time>/`` (never deleted):
    a run resumed from an older checkpoint makes them a future it no longer has, and a later
    ``--resume RUN_DIR`` must not pick them. Returns where they went, or None."""
    newer = [p for p in checkpoints(folder) if _step(p) > _step(chosen)]
    if not newer:
        return None
    aside = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 2
    while aside.exists():
        aside = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir()
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def _step(path: Path) -> int:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else -1


_KEYS = ("format", "versions", "config", "model", "optimizer", "scheduler", "loop", "rng", "engine", "metrics_bytes")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else is refused with a clear message.

    Raises:
        UserError: unreadable, truncated, not a singlestep checkpoint, or holding a Python object
            that a weights-only load refuses (it is never unpickled).
    """
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is not a checkpoint file (not a torch.save archive; truncated or another file?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = f"it names {found.group(1)}" if found else first_line(exc)
        raise UserError(f"checkpoint {path} holds something other than tensors and plain values ({why}); refused: "
                        "checkpoints are loaded with weights_only=True and never run pickled code") from None  # fmt: skip
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first_line(exc)}; truncated?)") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"checkpoint {path} is not a singlestep checkpoint")
    if state["format"] != FORMAT:
        raise UserError(f"checkpoint {path} has format {state['format']}, this singlestep reads format {FORMAT}; "
                        f"resume it with the singlestep that wrote it ({state.get('versions', {}).get('singlestep')})")  # fmt: skip
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def changed_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted config keys whose resolved values differ, with both values, e.g.
    ``optimizer.lr: 0.01 -> 0.1``; the keys a resume may change are left out.

    >>> changed_keys({"optimizer": {"lr": 0.01}, "trainer": {"epochs": 1}},
    ...              {"optimizer": {"lr": 0.1}, "trainer": {"epochs": 3}})
    ['optimizer.lr: 0.01 -> 0.1']
    """
    a, b = _flat(dict(saved)), _flat(dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS or _same(a.get(key), b.get(key)):
            continue
        out.append(f"{key}: {_show(a.get(key, '(absent)'))} -> {_show(b.get(key, '(absent)'))}")
    return out


def _show(value: Any) -> str:
    return "null" if value is None else value if isinstance(value, str) else repr(value)


@dataclass
class Resume:
    """Where a resumed run continues: its folder and the loaded checkpoint (``checkpoint.py``)."""

    run_dir: Path
    path: Path
    state: dict[str, Any]


# ----------------------------------------------------------------------------- what else a run holds


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "singlestep": singlestep.__version__}


def rng_state() -> dict[str, Any]:
    """Every global RNG a step might draw from (dropout, a user's optimizer), as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_config(state: Mapping[str, Any], overrides: list[str], source: str) -> Any:
    """The config a resumed run trains with: the checkpoint's own, with ``overrides`` applied.

    Raises:
        ConfigError: an override changes a key other than those in :data:`RESUMABLE_KEYS`
            (all such keys listed, with old and new values).
    """
    from singlestep.config import config_from_dict, config_to_dict  # the registries load with it

    cfg = config_from_dict(_copy(state["config"]), f"{source} (config)", overrides)
    changed = changed_keys(state["config"], config_to_dict(cfg))
    if changed:
        allowed = " or ".join(RESUMABLE_KEYS)
        raise ConfigError(f"resuming from {source}: these keys differ from the checkpoint's run: {', '.join(changed)}; "
                          f"a resumed run may only change {allowed} (start a new run to change anything else)")  # fmt: skip
    saved, now = state.get("versions", {}), versions()
    for name in ("torch", "singlestep"):
        if saved.get(name) != now[name]:
            warnings.warn(f"checkpoint written with {name} {saved.get(name)}, resuming with {now[name]}: the numbers "
                          "may differ from an uninterrupted run", stacklevel=2)  # fmt: skip
    return cfg


def check_belongs(run_dir: Path, state: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose config is not the run folder's (up to :data:`RESUMABLE_KEYS`): a
    resume rewrites the folder's metrics, summary and weights.

    Raises:
        UserError: the folder's config.yaml is missing, unreadable or another run's.
    """
    from singlestep.config import parse_yaml

    try:
        folder_config = parse_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, UserError, yaml.YAMLError) as exc:
        why = getattr(exc, "problem", None) or exc
        raise UserError(f"--resume: cannot read {run_dir / 'config.yaml'} ({why}); it is the run's own record, "
                        "restore it from the checkpoint's config or start a new run") from None  # fmt: skip
    changed = changed_keys(folder_config if isinstance(folder_config, dict) else {}, state["config"])
    if changed:
        raise UserError(f"--resume: checkpoint {path} and the config.yaml of {run_dir} differ "
                        f"({'; '.join(changed[:3])}): the checkpoint belongs to another run, or config.yaml "
                        "was edited (a resume keeps the checkpoint's config; pass trainer.epochs=N or "
                        "trainer.max_steps=N to train longer); nothing was changed")  # fmt: skip


def _copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree
