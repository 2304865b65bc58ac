"""The run directory: resolved config, metrics.jsonl, summary.json, weights, and the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from singlestep.errors import UserError

__all__ = ["RunDir", "make_run_dir", "Progress"]


def make_run_dir(base: str, name: str, exact: str | None) -> Path:
    """Create the run folder: ``exact`` when given (new or empty), else ``base/<name>-<timestamp>``.

    An existing non-empty folder is never written into, so no earlier run is overwritten.
    """
    if exact is not None:
        path = Path(exact)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"output.run_dir '{path}' already exists and is not empty; choose a new folder")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(base) / f"{name}-{stamp}"
        n = 2
        while path.exists():
            path = Path(base) / f"{name}-{stamp}-{n}"
            n += 1
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run folder '{path}': {exc.strerror}") from None
    return path


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file and a concurrent
    reader (another run sharing the compiled-package cache) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """Writers for the files of one run."""

    def __init__(self, path: Path):
        self.path = path
        self._metrics = open(path / "metrics.jsonl", "a", encoding="utf-8")

    def write_config(self, resolved: dict[str, Any]) -> None:
        write_atomic(self.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None))

    def log(self, event: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (flushed, so a crash keeps what was logged)."""
        self._metrics.write(json.dumps(_clean(event)) + "\n")
        self._metrics.flush()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.path / name, json.dumps(_clean(data), indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()


class Progress:
    """A tqdm bar over optimizer steps, shown only when asked for and stdout is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm  # lazy: only interactive runs pay for it

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    @property
    def active(self) -> bool:
        return self.bar is not None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
