"""What every command line (train, plot, sweep) shares: the exit codes, argument errors as one
line, the wrapper that turns a user error into ``error: ...`` and exit code 2, and Ctrl-C /
SIGTERM routed to a run's own handler."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, Callable

from singlestep.errors import UserError

__all__ = ["EXIT_INTERRUPTED", "EXIT_STOPPED", "EXIT_USER_ERROR", "ArgumentParser", "run", "signals_to"]

EXIT_USER_ERROR = 2  # one message on stderr, no traceback
EXIT_STOPPED = 3  # a run stopped itself: training went wrong (summary.json says why)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, after a clean stop


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`UserError` (one line, exit 2, as every other mistake)."""

    def error(self, message: str):  # argparse's own exit code is 2 too; keep it one line
        raise UserError(f"{self.prog}: {message}")


def run(body: Callable[[], int]) -> int:
    """Call ``body`` and return its exit code; a user error prints ``error: ...`` (exit 2), Ctrl-C
    outside the run's own handling prints ``interrupted`` (exit 130). Anything else is a bug and
    keeps its traceback."""
    try:
        return body()
    except UserError as exc:
        print(f"{_rank()}error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _rank() -> str:
    """``[rank N] `` for a torchrun rank other than 0 (whose messages may differ from rank 0's)."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" and rank != "0" else ""


@contextlib.contextmanager
def signals_to(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Send Ctrl-C (SIGINT) and SIGTERM to ``handler`` inside the block; the previous handlers are
    back the moment it is left, however it is left (before anything else that may be slow)."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
