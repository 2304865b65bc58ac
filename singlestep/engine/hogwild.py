"""Hogwild: per-sample steps in several processes on one machine that share the parameters and
update them without locks, after Niu et al. 2011 and PyTorch's mnist_hogwild example.

The trainer's loop does not change: each call of :meth:`HogwildEngine.run_samples` (the steps up
to the next log, evaluation or checkpoint) is dealt out to the processes in blocks of
``chunk_size`` steps (block b to process b mod workers); each runs its blocks through the same
engine (eager or compiled) with the lrs those steps have in the schedule, and the call returns
when all are done. Logs, evaluations and checkpoints happen in this process, between calls.

How the shared tensors are written (the same for every engine):
- Parameters have one shared copy (in shared memory, made before the workers are forked); each
  process trains its own copy.
- For each block a process copies the shared tensors into its own, runs the block's steps, then
  *adds* what they changed to the shared tensors, without a lock: its updates land every block,
  are added to the others' rather than written over them (two additions at the same instant can
  lose one), and its steps see the others' updates up to one block late. The compiled chunk runs
  K steps in one native call and cannot write the shared weights step by step; blocks make the
  eager engine run the same algorithm.
- The optimizer's state (momentum, Adam's moments, Adagrad's sums, step counts) and the model's
  buffers (BatchNorm's running statistics) are each process's own, as in PyTorch's
  mnist_hogwild: a block's change to a decaying average cannot be added to a shared one (each
  process would subtract the decay once: RMSprop went NaN, Adam with 4 processes reached a loss
  of 1e11). The trainer's process's are the ones evaluated and checkpointed.
- The first steps run in this process alone: they create the optimizer's lazy state, which the
  workers then start from, and, for the compiled engine, build and check the compiled chunk.

Not deterministic: the order in which the processes' updates land changes from run to run.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from singlestep.engine.base import Engine, advance_schedule, lr_only
from singlestep.engine.compiled import CompiledEngine
from singlestep.errors import ConfigError, UserError

__all__ = ["HogwildEngine"]


class HogwildEngine:
    """Runs an engine's per-sample steps in ``workers`` processes that share the model.

    Args:
        inner: the engine each process runs its steps through (this process's own copy is the
            one the trainer reads statistics and checkpoints from).
        workers: processes in all, this one included; each runs on one intra-op thread.
        block: steps a process runs between taking the shared parameters and adding its change
            (``trainer.chunk_size``: one compiled chunk).
    """

    name = "hogwild"

    def __init__(self, inner: Engine, workers: int, block: int = 64):
        self.inner = inner
        self.workers = workers
        self.stats = inner.stats
        # Up to 4096 steps per process per call: a stop request waits for one call at most.
        self.max_chunk = 4096 * workers
        self.block = block
        self._warm_steps = 0
        self._compiled = isinstance(inner, CompiledEngine)
        self._children: list[tuple[Any, Any]] = []
        self._shared: _Shared | None = None
        # One intra-op thread per process: the workers are the parallelism.
        if self._compiled:
            inner.threads = 1
        (inner.eager if self._compiled else inner).eager_threads = 1

    @classmethod
    def around(cls, inner: Engine, workers: int | None, block: int, log: Callable[[str], None]) -> "HogwildEngine":
        """Wrap ``inner`` for ``trainer.parallel: hogwild`` (``workers`` None: one per CPU core)."""
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("trainer.parallel: hogwild forks its workers, which this platform cannot do (Linux and macOS can)")
        if inner.train.device.type != "cpu":
            raise ConfigError(f"trainer.parallel: hogwild runs on the CPU (its workers share memory), this run "
                              f"trains on {inner.train.device}; on GPUs use torchrun with trainer.mode: minibatch")  # fmt: skip
        if inner.scheduler is not None and not lr_only(inner.scheduler):
            raise ConfigError(f"trainer.parallel: hogwild needs a schedule that changes only the lr (every built-in "
                              f"one does); {type(inner.scheduler).__name__} may change more, which workers cannot share")  # fmt: skip
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = workers or cores
        if workers == 1:
            log("hogwild with 1 process: the steps run as in a plain run")
        else:
            log(f"hogwild: {workers} processes, one thread each, sharing the parameters; the result is not deterministic")
        if workers > cores:
            log(f"warning: {workers} hogwild processes on {cores} CPU cores take turns on them: slower than {cores}")
        return cls(inner, workers, block)

    @property
    def label(self) -> str:
        return f"hogwild x{self.workers} ({self.inner.label})"

    # ------------------------------------------------------------------ steps

    def run_samples(self, idx: Tensor) -> None:
        inner = self.inner
        rows = advance_schedule(inner.scheduler, inner.optimizer, len(idx)) if inner.scheduler is not None else None
        pos, n = 0, len(idx)
        while pos < n and not self._ready():  # this process alone, until the workers can start from it
            k = min(6 * self.block, n - pos)  # enough for a compiled shape's warm-up, timing and check
            inner.run_samples_at(idx[pos : pos + k], rows[pos : pos + k] if rows else None)
            self._warm_steps += k
            pos += k
        if pos < n:
            self._parallel(idx[pos:], rows[pos:] if rows else None)

    def _ready(self) -> bool:
        """Whether the optimizer's lazy state exists and the compiled chunk is built and checked
        (or declined): what every worker then starts from, instead of each building its own. Calls
        shorter than a chunk never compile (as in one process): then a few blocks are enough."""
        if not self._warm_steps:
            return False
        return not self._compiled or self.inner.settled() or self._warm_steps >= 12 * self.block

    def _parallel(self, idx: Tensor, rows: list[list[float]] | None) -> None:
        """Deal ``idx`` out in blocks of ``block`` steps (block b to process b mod workers), run
        every share at once, and add the workers' statistics to this process's."""
        if self.workers > 1 and not self._children:
            self._start()
        # Block b (``block`` steps, one compiled chunk) goes to process b mod workers.
        owner = torch.arange(len(idx)).div(self.block, rounding_mode="floor").remainder(self.workers)
        table = np.asarray(rows, dtype=np.float64) if rows else None
        shares = []
        for w in range(self.workers):
            where = (owner == w).nonzero().squeeze(1)
            shares.append((idx[where], table[where.numpy()] if table is not None else None))
        for w, ((process, conn), (part, part_rows)) in enumerate(zip(self._children, shares[1:]), start=1):
            try:
                conn.send((part.cpu().numpy(), part_rows))
            except OSError:  # its end of the pipe is closed: it died (killed, out of memory)
                raise RuntimeError(f"hogwild worker {w} died (exit code {process.exitcode})") from None
        mine, mine_rows = shares[0]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # all of it: an idle OpenMP thread spins on the core a worker needs
        try:
            _run_blocks(self.inner, self._shared, self.block, mine, mine_rows)
        finally:
            torch.set_num_threads(threads)
        self.inner.flush()
        for w, (process, conn) in enumerate(self._children, start=1):
            try:
                reply = conn.recv()
            except EOFError:
                raise RuntimeError(f"hogwild worker {w} died (exit code {process.exitcode})") from None
            if reply[0] == "error":
                _, user, text = reply
                raise (UserError if user else RuntimeError)(f"hogwild worker {w}: {text}")
            self.stats.add(reply[1])
        if self._shared is not None:
            self._shared.pull()  # this process's model: everyone's updates, to evaluate and checkpoint

    def _start(self) -> None:
        """Make the shared copy of the parameters, then fork the workers."""
        if self._compiled and not self.inner.settled():
            # Calls shorter than a chunk until now: each worker would build the chunk on its own.
            self.inner.stay_eager("hogwild started its workers before a compiled chunk was built (the calls until "
                                  "then were shorter than trainer.chunk_size); running eagerly")  # fmt: skip
        self._shared = _Shared(self.inner)
        context = multiprocessing.get_context("fork")  # the workers inherit the built engine
        for w in range(1, self.workers):
            mine, theirs = context.Pipe()
            process = context.Process(target=_work, args=(self.inner, self._shared, self.block, theirs),
                                      name=f"hogwild-{w}", daemon=True)  # fmt: skip
            process.start()
            theirs.close()
            self._children.append((process, mine))

    # ------------------------------------------------------------------ what the trainer reads

    def read(self) -> dict[str, float]:
        return self.inner.read()

    def peek(self) -> dict[str, float]:
        return self.inner.peek()

    def flush(self) -> None:
        self.inner.flush()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers: idle ones end at once; one still running a share (after a second
        Ctrl-C or an error) is killed after a second."""
        for process, conn in self._children:
            try:
                conn.send(None)
            except OSError:  # it died already
                pass
        for process, conn in self._children:
            process.join(timeout=1)
            if process.is_alive():
                process.kill()  # it ignores SIGINT and SIGTERM (the trainer's process decides)
                process.join()
            conn.close()
        self._children = []


class _Shared:
    """The tensors the processes share (the trainable parameters): one shared copy of each, and
    this process's own."""

    def __init__(self, engine: Engine):
        self.own = [p.detach() for p in engine.params]
        self.shared = [t.clone().share_memory_() for t in self.own]
        self.start: list[Tensor] = []

    def pull(self) -> None:
        """This process's copy := the shared one (and remembered, to see what the steps change)."""
        torch._foreach_copy_(self.own, self.shared)

    def push(self) -> None:
        """Add what this process's steps changed since :meth:`pull` to the shared copy (no lock)."""
        torch._foreach_add_(self.shared, torch._foreach_sub(self.own, self.start))

    @contextlib.contextmanager
    def block(self):
        self.pull()
        self.start = [t.clone() for t in self.own]
        yield
        self.push()


def _run_blocks(engine: Engine, shared: _Shared | None, block: int, idx: Tensor, rows: np.ndarray | None) -> None:
    """Run ``idx`` (with ``rows``, each step's lrs) in blocks of ``block`` steps, each on a fresh
    copy of the shared tensors, adding its changes back."""
    for start in range(0, len(idx), block):
        part = rows[start : start + block].tolist() if rows is not None else None
        if shared is None:  # one process: nothing is shared
            engine.run_samples_at(idx[start : start + block], part)
            continue
        with shared.block():
            engine.run_samples_at(idx[start : start + block], part)


def _work(engine: Engine, shared: _Shared, block: int, conn: Any) -> None:
    """A worker: run each share it is sent, reply with its statistics, until told to stop."""
    # Ctrl-C and SIGTERM reach the whole process group: the trainer's process decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    engine.flush()
    engine.stats.reset()  # the statistics inherited are the parent's, already counted there
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the trainer's process is gone
            return
        if message is None:
            return
        idx, rows = message
        try:
            _run_blocks(engine, shared, block, torch.from_numpy(idx), rows)
            engine.flush()
            sums = engine.stats.sums()
            engine.stats.reset()
        except Exception as exc:  # noqa: BLE001 - reported to the trainer's process, which raises it
            _reply(conn, ("error", isinstance(exc, UserError), str(exc) if isinstance(exc, UserError) else traceback.format_exc()))
            return
        if not _reply(conn, ("ok", sums)):
            return


def _reply(conn: Any, message: Any) -> bool:
    """Send to the trainer's process; False when it is gone (the worker then ends quietly)."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError included
        return False
    return True
