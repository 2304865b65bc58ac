"""The training loop, written out in full: per-sample and mini-batch modes.

The loop decides *which* samples form each step and *when* to log, evaluate and stop; the engine
(``singlestep.engine``) decides *how* a step executes. Everything the loop needs to continue
exactly where it left off (step, epoch, the epoch's sample order and the position in it, the
shuffle RNG) lives in :class:`~singlestep.loop_state.LoopState`; what a checkpoint holds besides,
and how a run resumes, in ``checkpoint.py``; when a run stops itself, in ``health.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import torch

from singlestep import _compat as compat
from singlestep import checkpoint, cli, malloc, runlog
from singlestep.build import build
from singlestep.checkpoint import Resume
from singlestep.config import Config, config_to_dict
from singlestep.data.base import DataBundle, Split
from singlestep.device import resolve_device
from singlestep.distributed import SINGLE, Dist, world_mismatch
from singlestep.engine.hogwild import HogwildEngine
from singlestep.errors import ConfigError, UserError, first_line
from singlestep.health import window_problem
from singlestep.loop_state import LoopState, steps_per_epoch
from singlestep.metrics import evaluate
from singlestep.runlog import Progress, RunDir, SilentRun

__all__ = ["LoopState", "Resume", "Trainer", "resolve_device", "steps_per_epoch"]


class Trainer:
    """Builds everything a config names, then trains and evaluates.

    Args:
        cfg: a validated config.
        out: where progress lines go (stdout).
        resume: continue the run a checkpoint was taken from (its config must be ``cfg``, up to
            the keys ``checkpoint.RESUMABLE_KEYS`` names: see ``checkpoint.resume_config``).
        dist: this process's place in a torchrun launch (``distributed.session``); rank 0 alone
            writes the run folder and prints.
    """

    def __init__(self, cfg: Config, out: TextIO | None = None, resume: Resume | None = None, dist: Dist = SINGLE):
        self.started = time.perf_counter()  # wall time includes loading data and building
        self.cfg = cfg
        self.out = out or sys.stdout
        self.dist = dist
        self.stop_requested = False
        self.failure: str | None = None  # why the run stopped itself (health.window_problem)
        self.resume = resume
        self._setup()
        if resume is not None:
            self.load_state_dict(resume.state)

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.device = self.dist.device or resolve_device(cfg.device)
        # Per-sample optimizer state (Adam's second moment, Adagrad's sum) decays into denormal
        # floats on weights whose inputs are often zero; the CPU handles those up to 20x slower.
        torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        engine = t.engine
        if self.dist.active and engine != "eager":
            self._print(f"engine {engine} runs eagerly under torchrun: the all-reduce between processes is a "
                        "collective inside the step, which a compiled chunk does not hold (docs/distributed.md)")  # fmt: skip
            engine = "eager"
        self.engine_kind = engine  # the start line's
        built = build(cfg, self.device, engine=engine, log=self._print, grad_transforms=self.dist.grad_transforms())
        self.data: DataBundle = built.data
        self.model, self.loss_fn, self.optimizer, self.scheduler = built.model, built.loss_fn, built.optimizer, built.scheduler
        self.decay_counts, self.steps_per_epoch, self.total_steps = built.decay_counts, built.steps_per_epoch, built.total_steps
        self.engine = built.engine
        self.dist.seed(cfg.seed)
        if t.parallel == "hogwild":
            self.engine = HogwildEngine.around(built.engine, t.workers, t.chunk_size, log=self._print)
        self.state = LoopState(seed=cfg.seed)
        # Counters that span the whole run (and a resume): a checkpoint carries them.
        self.samples_seen = 0
        self.skipped_steps = 0
        self.last_train_loss = float("nan")
        self.train_seconds = 0.0
        self.wall_before = 0.0  # wall seconds of the run before this process (a resume)
        # The log window open at a checkpoint goes on after a resume: its line's rate counts all its samples.
        self.window_before: tuple[int, float] = (0, 0.0)
        self.checkpoints_ok = True
        self.phase = "train"  # then "final" (evaluation, weights, summary.json), then "done"
        if cfg.output.tensorboard and not runlog.tensorboard_available():
            raise ConfigError("output.tensorboard: true needs the tensorboard package: pip install 'singlestep[tensorboard]'")

    # ------------------------------------------------------------------ run state

    def state_dict(self, run: RunDir) -> dict[str, Any]:
        """Everything a checkpoint holds (see ``checkpoint.py``); taken between engine calls. Under
        torchrun every rank calls it (each rank's RNG states are gathered); rank 0 saves it."""
        rngs = self.dist.gather(checkpoint.rng_state())
        self.dist.sync_buffers(self.model)
        return {
            "format": checkpoint.FORMAT,
            "versions": checkpoint.versions(),
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            # boundary_done: the evaluations and log due at this step were done (not at the run's
            # end, where they wait for the final ones; a longer resumed run does them first).
            "loop": {**self.state.state_dict(), "boundary_done": self.state.step < self.total_steps,
                     "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                     "last_train_loss": self.last_train_loss, "train_seconds": self._train_seconds(),
                     "run_seconds": run.elapsed(), "window": self._window(),
                     "wall_seconds": self.wall_before + time.perf_counter() - self.started},
            "rng": rngs[0],
            "rank_rng": rngs if self.dist.active else None,
            "world_size": self.dist.world_size,
            "engine": self.engine.state_dict(),
            "metrics_bytes": run.metrics_bytes(),
        }

    def _optimizer_state(self) -> dict[str, Any]:
        with compat.dynamo_import_deferred(torch.optim.Optimizer.state_dict):  # eager runs never load the compiler
            return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: parameters, optimizer and schedule, loop position, RNGs,
        and the engine's choices, so that the steps ahead give the numbers they would have."""
        loop = state["loop"]
        mismatch = world_mismatch(state.get("world_size", 1), self.dist.world_size)
        if mismatch:
            raise UserError(mismatch)
        if loop["order"] is not None and len(loop["order"]) != len(self.data.train):
            raise UserError(f"the checkpoint's epoch order covers {len(loop['order']):,} training samples, the data now "
                            f"has {len(self.data.train):,}: the dataset's files changed since; start a new run")  # fmt: skip
        if loop["step"] > self.total_steps:
            raise ConfigError(f"the checkpoint is at step {loop['step']:,}, past this run's end ({self.total_steps:,} "
                              "steps): give a larger trainer.epochs or trainer.max_steps")  # fmt: skip
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.state.load_state_dict(loop)
            self.samples_seen, self.skipped_steps = loop["samples_seen"], loop["skipped_steps"]
            self.last_train_loss, self.train_seconds = loop["last_train_loss"], loop["train_seconds"]
            self.wall_before = loop["wall_seconds"]
            samples, seconds = loop.get("window", (0, 0.0))  # older checkpoints: a fresh window
            self.window_before = (int(samples), float(seconds))
            self.engine.load_state_dict(state["engine"])
            checkpoint.set_rng_state(state["rank_rng"][self.dist.rank] if self.dist.active else state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            where = self.resume.path if self.resume is not None else "the checkpoint"
            raise UserError(f"checkpoint {where} does not fit this run (its model, optimizer or engine differ: "
                            f"{type(exc).__name__}: {first_line(exc)})") from None  # fmt: skip

    def _checkpoint(self, run: RunDir, progress: Progress) -> None:
        """Save a checkpoint now (atomically), and keep the newest ``output.keep_checkpoints``.

        The window's unread statistics are looked at first (one sync per checkpoint): a checkpoint
        taken after trouble that the next metrics line would report would be named the last good
        one; the run stops here instead, logging that line."""
        stats = self.engine.peek() if self.engine.stats.steps else None
        if stats and window_problem(stats, self.cfg.trainer, self.skipped_steps + stats["skipped_steps"], self.state.step):
            self._log_window(run, progress)  # reads the window again and sets self.failure
            return
        if not self.checkpoints_ok:
            return
        state = self.state_dict(run)  # under torchrun, on every rank (it gathers their RNGs)
        found = checkpoint.not_plain(state)
        if found:  # a weights-only load would refuse it: say so once and train on
            self.checkpoints_ok = False
            self._print(f"warning: no checkpoints for this run: its state holds a Python object at {found}, and "
                        "checkpoints hold only tensors and plain values (loaded with weights_only=True)")  # fmt: skip
            return
        if self.dist.main:
            folder = self.run_dir / "checkpoints"
            checkpoint.save_checkpoint(folder, self.state.step, state)
            checkpoint.prune(folder, self.cfg.output.keep_checkpoints)
        self.last_checkpoint = self.state.step

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.phase == "done":
            return
        if self.stop_requested or self.phase == "final":  # a second Ctrl-C, or one in the final evaluation: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def fit(self) -> dict[str, Any]:
        """Train to the end (or until interrupted or stopped), evaluate, write the run folder.

        Any failure once the folder exists leaves ``summary.json`` with status ``failed`` (or
        ``interrupted``) and the error, then goes on up: a user error to the CLI's exit 2, an
        internal one with its traceback.

        Returns:
            The summary also written to ``summary.json``; its ``status`` is ``ok``,
            ``interrupted`` (Ctrl-C / SIGTERM) or ``diverged`` (``health.window_problem``).
        """
        run = self._open_run()
        try:
            self._prepare(run)
            with cli.signals_to(self._on_signal):
                self._train(run)
                summary = self._finish(run)
        except BaseException as exc:
            self._write_failure(run, exc)
            raise
        finally:
            run.close()
        if self.cfg.output.curves and self.dist.main:
            from singlestep.plot import write_run_curves  # lazy: matplotlib only where it is used

            write_run_curves(self.run_dir)  # never fails a run for a picture, nor is a Ctrl-C there a failure
        self._print(runlog.summary_line(summary))
        return summary

    def _open_run(self) -> RunDir:
        """Create (or, resuming, reopen and lock) the run folder. Under torchrun rank 0 does, and
        tells the other ranks its name (or its error, so they stop with it instead of waiting)."""
        cfg, resume = self.cfg, self.resume
        self.last_checkpoint = self.state.step if resume is not None else None
        if not self.dist.main:
            made = self.dist.from_main(None)
            if isinstance(made, str):
                raise UserError(made)
            self.run_dir = made
            return SilentRun(made)
        try:
            if resume is None:
                self.run_dir = runlog.make_run_dir(cfg.output.dir, cfg.name, cfg.output.run_dir)
                run = RunDir(self.run_dir, tensorboard=cfg.output.tensorboard)
            else:
                self.run_dir = resume.run_dir
                run = RunDir(self.run_dir, elapsed=resume.state["loop"]["run_seconds"], step=self.state.step,
                             metrics_bytes=resume.state["metrics_bytes"], tensorboard=cfg.output.tensorboard)  # fmt: skip
        except UserError as exc:
            self.dist.from_main(str(exc))
            raise
        self.dist.from_main(self.run_dir)
        return run

    def _prepare(self, run: RunDir) -> None:
        """The folder's config (and vocabulary); a resume from an older checkpoint sets the newer aside."""
        cfg, resume = self.cfg, self.resume
        if resume is not None and self.dist.main:
            aside = checkpoint.set_aside_newer(self.run_dir / "checkpoints", resume.path)
            if aside is not None:
                self._print(f"resuming from an older checkpoint: the newer ones moved to {aside}")
        run.write_config(config_to_dict(cfg))
        meta = self.data.meta
        if meta.task == "lm":
            run.write_json("vocab.json", {**meta.extras, "vocab_size": meta.vocab_size, "block_size": meta.block_size})

    def _train(self, run: RunDir) -> None:
        cfg, t, resume = self.cfg, self.cfg.trainer, self.resume
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        resumed = f" | resumed at step {self.state.step:,} from {resume.path.name}" if resume is not None else ""
        if resume is not None and self.state.step == self.total_steps:
            self._print(f"nothing to train: the run is at step {self.total_steps:,}, where trainer.epochs ({t.epochs}) and "
                        f"trainer.max_steps ({t.max_steps}) end it (raise them to train on); evaluating it")  # fmt: skip
        self._print(
            f"run {self.run_dir} | model {cfg.model.name} ({n_params:,} params) | data {cfg.data.name} "
            f"({len(self.data.train):,} train) | optimizer {cfg.optimizer.name}: {self.decay_counts['decay']} tensors "
            f"decay, {self.decay_counts['no_decay']} do not | {t.mode}, {self.total_steps:,} steps, "
            f"engine {self.engine_kind}, device {self.device}{resumed}"
        )
        # Schedule-free optimizers start in eval mode and refuse to step in it.
        self._optimizer_mode("train")
        progress = Progress(self.total_steps, t.progress and self.dist.main, initial=self.state.step)
        self._loop_started = time.perf_counter()
        samples, seconds = self.window_before
        self._window_start, self._window_samples = time.perf_counter() - seconds, samples
        try:
            if resume is not None and not resume.state["loop"]["boundary_done"] and self.state.step < self.total_steps:
                self._boundary(run, progress)  # a finished run trained further: what its end deferred
            self._loop(run, progress)
        finally:
            progress.close()
            self.engine.close()
            self.train_seconds, self._loop_started = self._train_seconds(), None  # the final evaluation is not training

    def _finish(self, run: RunDir) -> dict[str, Any]:
        """The final evaluation, the weights and ``summary.json``."""
        cfg, self.phase = self.cfg, "final"
        with self._evaluating():  # the weights evaluated and saved are the optimizer's eval-mode ones
            final = {split: self._evaluate(s) for split, s in self.data.splits().items()}
            for split, metrics in final.items():
                run.log({"event": "eval", "step": self.state.step, "epoch": self._epoch_float(), "split": split,
                         **{k: v for k, v in metrics.items() if k != "confusion"}})  # fmt: skip
            if cfg.output.save_model and self.dist.main:
                torch.save(self.model.state_dict(), self.run_dir / "model.pt")
        final["train"] = {"loss": self.last_train_loss}
        interrupted = self.stop_requested and self.state.step < self.total_steps
        status = "diverged" if self.failure is not None else "interrupted" if interrupted else "ok"
        summary = self._summary(status, self.failure, final)
        run.write_json("summary.json", summary)
        self.phase = "done"  # summary.json is written: nothing is left to interrupt
        if self.failure is not None:
            last = self._checkpoint_name()
            self._print(f"stopped at step {self.state.step:,}: {self.failure}; "
                        f"{f'the last checkpoint before it: {last}' if last else 'no checkpoint was written before it'}")  # fmt: skip
        return summary

    def _summary(self, status: str, error: str | None, final: dict[str, Any] | None) -> dict[str, Any]:
        train_seconds = self._train_seconds() if getattr(self, "_loop_started", None) else self.train_seconds
        return {
            "name": self.cfg.name,
            "run_dir": str(self.run_dir),
            "status": status,
            "error": error,
            "final": final,
            "steps": self.state.step,
            "epochs": round(self._epoch_float(), 6),
            "wall_seconds": round(self.wall_before + time.perf_counter() - self.started, 3),
            "train_seconds": round(train_seconds, 3),
            "samples_per_second": round(self.samples_seen / train_seconds, 1) if train_seconds > 0 else None,
            "skipped_steps": self.skipped_steps,
            "interrupted": status == "interrupted",
            "resumed_from": self.resume.state["loop"]["step"] if self.resume is not None else None,
            "checkpoint": self._checkpoint_name(),
            "engine": self.engine.label,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "allocator": malloc.in_use(),
            "torch_version": torch.__version__,
            "decay_tensors": self.decay_counts,
        }

    def _write_failure(self, run: RunDir, exc: BaseException) -> None:
        """``summary.json`` for a run that failed (or was killed by a second Ctrl-C) part-way:
        what it reached and why it ended; never raises (the original error goes on up)."""
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if status == "interrupted" and self.phase == "final":  # the loop's end was checkpointed: say how to finish
            saved = self._checkpoint_name() is not None and self.last_checkpoint == self.state.step
            error = runlog.interrupted_line(self.state.step, self.total_steps, self.run_dir, saved, self.failure)
            self._print(error)
        try:
            run.write_json("summary.json", self._summary(status, error.strip() or type(exc).__name__, None))
        except Exception:  # noqa: BLE001 - a full disk must not hide the error that ended the run
            pass

    def _loop(self, run: RunDir, progress: Progress) -> None:
        """Steps until the end, a stop request or a failure. Every engine call ends at the next
        log, eval or checkpoint step, so a checkpoint (periodic, or on a signal) is always taken
        where an uninterrupted run also has a call boundary: resuming from it gives the same numbers."""
        t, state, engine = self.cfg.trainer, self.state, self.engine
        every = self.cfg.output.checkpoint_every
        n = len(self.data.train)
        micro = t.batch_size
        per_step = 1 if t.mode == "per_sample" else t.batch_size * t.grad_accum_steps
        chunk_cap = engine.max_chunk
        order_dev = None
        while state.step < self.total_steps and not self._stopping() and self.failure is None:
            if state.order is None:
                order_dev = state.new_epoch(n).to(self.device)
            elif order_dev is None:
                order_dev = state.order.to(self.device)
            to_log = t.log_every - state.step % t.log_every
            to_eval = t.eval_every - state.step % t.eval_every if t.eval_every else to_log
            to_save = every - state.step % every if every else to_log
            budget = min(self.total_steps - state.step, to_log, to_eval, to_save)
            if t.mode == "per_sample":
                k = min(budget, n - state.pos, chunk_cap)
                engine.run_samples(order_dev[state.pos : state.pos + k])
                taken, samples = k, k
            else:
                take = order_dev[state.pos : state.pos + per_step]
                # Under torchrun each rank takes its slice of every micro-batch (an empty one is
                # dropped), weighted by its share of the whole step's samples.
                shards = [mb for mb in map(self.dist.shard, take.split(micro)) if mb.numel()]
                engine.run_batch(shards, total=int(take.shape[0]))
                taken, samples = 1, int(take.shape[0])
            state.pos += samples
            state.step += taken
            self.samples_seen += samples
            self._window_samples += samples
            progress.update(taken)
            if state.pos >= n:  # epoch finished
                state.epoch += 1
                state.order = None
            if state.step < self.total_steps:  # the end's evaluations and log come with the final ones
                self._boundary(run, progress)
        if self.stop_requested and state.step < self.total_steps:
            self._print(f"stopping at step {state.step:,}: a checkpoint, the final evaluation (Ctrl-C again: now)")
        if self.failure is None and state.step != self.last_checkpoint:
            # At the end, or on Ctrl-C / SIGTERM: the window's unread statistics go into it, so
            # the line logged next (and cut from metrics.jsonl on a resume) is not lost. Not after
            # a failure: the checkpoints from before it are the ones worth resuming.
            self._checkpoint(run, progress)
        if self.engine.stats.steps:  # unread steps (a resumed run's too, though it took none)
            self._log_window(run, progress)

    def _stopping(self) -> bool:
        """Whether a stop was asked for; under torchrun, of any rank (one all-reduce per step), so
        every rank leaves the loop at the same step."""
        if self.dist.active:
            self.stop_requested = self.dist.any(self.stop_requested)
        return self.stop_requested

    def _boundary(self, run: RunDir, progress: Progress) -> None:
        """What is due after the call that reached this step, in order: the epoch's evaluation,
        the metrics line, the periodic evaluation, the checkpoint."""
        t, state, every = self.cfg.trainer, self.state, self.cfg.output.checkpoint_every
        if t.eval_every is None and state.order is None:  # an epoch just ended
            self._evaluate_val(run)
        if state.step % t.log_every == 0:
            self._log_window(run, progress)
        if t.eval_every and state.step % t.eval_every == 0:
            self._evaluate_val(run)
        if every and state.step % every == 0 and self.failure is None:
            self._checkpoint(run, progress)

    def _train_seconds(self) -> float:
        """Seconds in the training loop so far, across resumes."""
        return self.train_seconds + time.perf_counter() - self._loop_started

    def _checkpoint_name(self) -> str | None:
        if not self.checkpoints_ok or self.last_checkpoint is None:
            return None
        return str(self.run_dir / "checkpoints" / f"step-{self.last_checkpoint:09d}.pt")

    # ------------------------------------------------------------------ logging and evaluation

    def _epoch_float(self) -> float:
        n = len(self.data.train)
        return self.state.epoch + (self.state.pos / n if self.state.order is not None else 0.0)

    def _window(self) -> tuple[int, float]:
        """The open log window's samples and seconds (a checkpoint carries them)."""
        started = getattr(self, "_window_start", None)  # None: before the loop
        return self.window_before if started is None else (self._window_samples, time.perf_counter() - started)

    def _log_window(self, run: RunDir, progress: Progress) -> None:
        stats = self.engine.read()  # syncs the device: once per log window
        elapsed, samples = time.perf_counter() - self._window_start, self._window_samples
        self._window_start, self._window_samples = time.perf_counter(), 0
        self.skipped_steps += stats["skipped_steps"]
        self.last_train_loss = stats["loss"]
        event = {"event": "train", "step": self.state.step, "epoch": round(self._epoch_float(), 6), "split": "train",
                 "loss": stats["loss"], "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": stats["grad_norm"],
                 "grad_norm_max": stats["grad_norm_max"], "skipped_steps": stats["skipped_steps"],
                 "samples_per_second": samples / elapsed if elapsed > 0 and samples else None}  # fmt: skip
        run.log(event)
        if self.failure is None:
            self.failure = window_problem(stats, self.cfg.trainer, self.skipped_steps, self.state.step)
        if progress.active:
            progress.postfix(runlog.window_text(stats, event["lr"]))
        else:
            self._print(runlog.window_line(event, stats))

    def _optimizer_mode(self, mode: str) -> None:
        """Call the optimizer's ``train()`` or ``eval()`` (``mode``), when it has one: schedule-free
        optimizers hold the gradient point while training and the averaged one, to evaluate and
        save, in eval mode (``schedulefree``'s start in eval mode and refuse to step in it)."""
        method = getattr(self.optimizer, mode, None)
        if callable(method):
            method()

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The optimizer in eval mode for the block, back in train mode after it (even on an error)."""
        self._optimizer_mode("eval")
        try:
            yield
        finally:
            self._optimizer_mode("train")

    def _evaluate_val(self, run: RunDir) -> None:
        split = self.data.val
        if split is None:
            return
        with self._evaluating():
            metrics = self._evaluate(split)
        metrics.pop("confusion", None)
        run.log({"event": "eval", "step": self.state.step, "epoch": round(self._epoch_float(), 6), "split": "val", **metrics})
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._print(f"eval  step {self.state.step:,} | val {shown}")

    def _evaluate(self, split: Split) -> dict[str, Any]:
        """Exact metrics over the whole split; under torchrun each rank evaluates its part and the
        parts' sums are combined (the same figures on every rank)."""
        meta = self.data.meta
        self.dist.sync_buffers(self.model)
        return evaluate(self.model, split, meta.task, num_classes=meta.num_classes,
                        batch_size=self.cfg.trainer.eval_batch_size, part=self.dist.span,
                        combine=self.dist.gather if self.dist.active else None)  # fmt: skip

    def _print(self, text: str) -> None:
        if self.dist.main:  # under torchrun, rank 0 speaks for all
            print(text, file=self.out, flush=True)

