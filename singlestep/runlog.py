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

__all__ = ["RunDir", "make_run_dir", "Progress", "tensorboard_available", "write_atomic"]


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
    """Writers for the files of one run.

    Args:
        path: the run folder.
        elapsed: seconds the run had already trained before this process (a resumed run); each
            metrics line's ``time`` counts from the run's start.
        metrics_bytes: a resumed run's metrics.jsonl is cut back to this length (where its
            checkpoint was taken), so the file continues without a repeated or missing step.
        tensorboard: also write TensorBoard event files into the folder (from ``step`` on).
        step: the step the run continues from (TensorBoard drops its events after it).
    """

    def __init__(self, path: Path, *, elapsed: float = 0.0, metrics_bytes: int | None = None,
                 tensorboard: bool = False, step: int = 0):  # fmt: skip
        self.path = path
        self._start = time.perf_counter() - elapsed
        metrics = path / "metrics.jsonl"
        if metrics_bytes is not None and metrics.exists() and metrics.stat().st_size > metrics_bytes:
            os.truncate(metrics, metrics_bytes)
        self._metrics = open(metrics, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(path, step) if tensorboard else None

    def write_config(self, resolved: dict[str, Any]) -> None:
        write_atomic(self.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None))

    def elapsed(self) -> float:
        """Seconds since the run started, across resumes."""
        return time.perf_counter() - self._start

    def log(self, event: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (flushed, so a crash keeps what was logged),
        with ``time``, the seconds since the run started."""
        event = {**event, "time": round(self.elapsed(), 3)}
        self._metrics.write(json.dumps(_clean(event)) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            split = event.get("split", event.get("event"))
            for key, value in event.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, global_step=event["step"], walltime=None)

    def metrics_bytes(self) -> int:
        """metrics.jsonl's length now (a checkpoint records it)."""
        return self._metrics.tell()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.path / name, json.dumps(_clean(data), indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


_NOT_SCALARS = {"event", "split", "step", "epoch", "time"}


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - lazy: an optional extra
    except ImportError:
        return False
    return True


def _tensorboard_writer(path: Path, step: int) -> Any:
    if not tensorboard_available():
        raise UserError("output.tensorboard: true needs the tensorboard package: pip install 'singlestep[tensorboard]'")
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: a resumed run's events from after its checkpoint are dropped, as in metrics.jsonl.
    return SummaryWriter(log_dir=str(path), purge_step=step or None)


class Progress:
    """A tqdm bar over optimizer steps, shown only when asked for and stdout is a terminal."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm  # lazy: only interactive runs pay for it

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

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
