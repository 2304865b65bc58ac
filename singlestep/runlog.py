"""The run directory: resolved config, metrics.jsonl, summary.json, weights, and the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from singlestep.errors import UserError

__all__ = ["Progress", "RunDir", "SilentRun", "interrupted_line", "make_run_dir", "summary_line", "tensorboard_available",
           "window_line", "window_text", "write_atomic"]


def make_run_dir(base: str, name: str, exact: str | None) -> Path:
    """Create the run folder: ``exact`` when given (new or empty), else ``base/<name>-<timestamp>``.

    An existing non-empty folder is never written into, so no earlier run is overwritten.
    """
    if exact is not None:
        path = Path(exact)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"output.run_dir '{path}' already exists and is not empty{_what_is_there(path)}; "
                            "choose a new folder (a run folder is never overwritten)")  # fmt: skip
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run folder '{path}': {exc.strerror}") from None
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = Path(base) / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            path.mkdir(parents=True)  # not exist_ok: two runs started in the same second get two folders
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create run folder '{path}': {exc.strerror}") from None
    raise UserError(f"cannot create a run folder under '{base}': too many runs named {name}-{stamp}")


def _what_is_there(path: Path) -> str:
    """A hint about an existing run folder: its status, and whether it can be resumed."""
    if not path.is_dir():
        return ""
    status = ""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        status = f" (a run that ended with status {summary.get('status', 'ok')!r})"
    except (OSError, ValueError):
        status = " (a run that has not finished)" if (path / "metrics.jsonl").exists() else ""
    if any((path / "checkpoints").glob("step-*.pt")):
        status += f"; to continue it: python -m singlestep.train --resume {path}"
    return status


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
        self._lock = _lock(path)  # before anything is written: one process per run folder
        self._start = time.perf_counter() - elapsed
        metrics = path / "metrics.jsonl"
        if metrics_bytes is not None:
            _cut_back(metrics, metrics_bytes)
        self._metrics = open(metrics, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            self._tb = _tensorboard_writer(path, step)
            if step:  # purge_step dropped the events at this step too: those kept in metrics.jsonl go back
                for line in metrics.read_text(encoding="utf-8").splitlines():
                    event = json.loads(line)
                    if event.get("step") == step:
                        self._tensorboard(event)

    def write_config(self, resolved: dict[str, Any]) -> None:
        from singlestep.config import dump_yaml  # quotes strings that would reload as numbers

        write_atomic(self.path / "config.yaml", dump_yaml(resolved))

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
            self._tensorboard(event)

    def _tensorboard(self, event: dict[str, Any]) -> None:
        split = event.get("split", event.get("event"))
        for key, value in event.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{split}/{key}", value, global_step=event["step"])

    def metrics_bytes(self) -> int:
        """metrics.jsonl's length now, synced to disk (a checkpoint, itself synced, records it)."""
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.path / name, json.dumps(_clean(data), indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._lock is not None:
            self._lock.close()  # releases the lock


class SilentRun:
    """The run folder as a torchrun rank other than 0 sees it: the same calls, nothing written
    (rank 0 writes the folder for all ranks)."""

    def __init__(self, path: Path):
        self.path = path
        self._start = time.perf_counter()

    def write_config(self, resolved: dict[str, Any]) -> None:
        pass

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def log(self, event: dict[str, Any]) -> None:
        pass

    def metrics_bytes(self) -> int:
        return 0

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _lock(path: Path) -> Any:
    """An exclusive lock on ``path/.lock`` for this process's lifetime (None where ``fcntl`` is
    missing): a second process resuming or writing the same folder gets a clear error instead of
    interleaving its lines with the first's."""
    try:
        import fcntl
    except ImportError:  # not on Windows: no lock
        return None
    try:
        handle = open(path / ".lock", "a")  # noqa: SIM115 - held open for the run's lifetime
    except OSError as exc:
        raise UserError(f"cannot write to run folder {path}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"run folder {path} is in use by another process (a run still going?); "
                        "wait for it to end or stop it first") from None  # fmt: skip
    return handle


def _cut_back(metrics: Path, length: int) -> None:
    """Cut ``metrics.jsonl`` back to ``length`` bytes, where a checkpoint was taken; refuse when that
    is not a line's end (the file is not the one the checkpoint saw)."""
    size = metrics.stat().st_size if metrics.exists() else 0
    if size < length:
        warnings.warn(f"{metrics} is shorter ({size} bytes) than when the checkpoint was taken ({length}): "
                      "some lines before the resume are missing", stacklevel=3)  # fmt: skip
        return
    if length:
        with open(metrics, "rb") as f:
            f.seek(length - 1)
            if f.read(1) != b"\n":
                raise UserError(f"{metrics} does not match the checkpoint (byte {length} is not the end of a "
                                "line): the folder was written after it by another run; nothing was changed")  # fmt: skip
    if size > length:
        os.truncate(metrics, length)


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


def window_text(stats: dict[str, Any], lr: float) -> str:
    """A log window's statistics, as its line (or the progress bar) shows them."""
    if stats["steps"] and stats["skipped_steps"] == stats["steps"]:
        return f"all {stats['steps']:,} steps skipped (non-finite loss or gradients) | lr {lr:.3g}"
    skipped = f" | {stats['skipped_steps']:,} skipped" if stats["skipped_steps"] else ""
    return f"loss {stats['loss']:.4g} | grad_norm {stats['grad_norm']:.3g} | lr {lr:.3g}{skipped}"


def window_line(event: dict[str, Any], stats: dict[str, Any]) -> str:
    """The line a log window prints without a progress bar, from its ``metrics.jsonl`` event."""
    sps = event["samples_per_second"]  # None: not measured (a window from before a resume, of an older checkpoint)
    rate = f" | {sps:,.0f} samples/s" if sps is not None else ""
    return f"step {event['step']:>8,} | epoch {event['epoch']:.2f} | {window_text(stats, event['lr'])}{rate}"


def interrupted_line(step: int, total: int, run_dir: Path, saved: bool, failure: str | None = None) -> str:
    """What a run interrupted in its final evaluation says (``saved``: its last step is
    checkpointed; ``failure``: why it had stopped itself, then nothing is worth resuming)."""
    text = f"interrupted in the final evaluation, at step {step:,} of {total:,}"
    if failure is not None:
        return f"stopped at step {step:,}: {failure}; then {text}"
    if not saved:
        return text
    left = total - step
    rest = "evaluates it" if not left else f"trains the {left:,} step{'s' * (left > 1)} left and evaluates"
    return f"{text}; python -m singlestep.train --resume {run_dir} {rest}"


def summary_line(s: dict[str, Any]) -> str:
    """The one line a finished run prints from its ``summary.json``."""
    word = {"ok": "done", "interrupted": "interrupted", "diverged": "stopped"}[s["status"]]
    parts = [f"{word}: {s['name']}", f"{s['steps']:,} steps", f"{s['epochs']:.2f} epochs", f"{s['train_seconds']:.1f}s train"]
    for split in ("val", "test"):
        m = s["final"].get(split)
        if m:
            key = "accuracy" if "accuracy" in m else "loss"
            value = m[key]
            parts.append(f"{split} {key} {value:.4f}" if abs(value) < 1e4 else f"{split} {key} {value:.4g}")
    parts.append(f"-> {s['run_dir']}")
    return " | ".join(parts)


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
