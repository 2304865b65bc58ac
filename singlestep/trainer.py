"""The training loop, written out in full: per-sample and mini-batch modes.

The loop decides *which* samples form each step and *when* to log, evaluate and stop; the engine
(``singlestep.engine``) decides *how* a step executes. Everything the loop needs to continue
exactly where it left off (step, epoch, the epoch's sample order and the position in it, the
shuffle RNG) lives in :class:`LoopState`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

import torch

from singlestep import malloc
from singlestep.config import COMPONENTS, Component, Config, config_to_dict
from singlestep.data.base import DataBundle
from singlestep.engine import build_engine
from singlestep.errors import ConfigError, UserError
from singlestep.losses import loss_for
from singlestep.metrics import evaluate
from singlestep.optim.build import build_optimizer
from singlestep.runlog import Progress, RunDir, make_run_dir

__all__ = ["LoopState", "Trainer", "resolve_device", "steps_per_epoch"]


@dataclass
class LoopState:
    """Where the loop is: enough to capture in a checkpoint and resume exactly.

    Attributes:
        step: optimizer steps taken so far.
        epoch: completed epochs.
        pos: position within ``order`` of the next sample.
        order: this epoch's shuffled sample order (CPU int64), or None between epochs.
        generator: the shuffle RNG; each epoch's order is ``randperm`` drawn from it.
    """

    seed: int
    step: int = 0
    epoch: int = 0
    pos: int = 0
    order: torch.Tensor | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.generator.manual_seed(self.seed)

    def new_epoch(self, n: int) -> torch.Tensor:
        """Draw the next epoch's order. Drawn on the CPU so the order is the same on any device."""
        self.order = torch.randperm(n, generator=self.generator)
        self.pos = 0
        return self.order

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "epoch": self.epoch, "pos": self.pos,
                "order": self.order, "rng": self.generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step, self.epoch, self.pos = state["seed"], state["step"], state["epoch"], state["pos"]
        self.order = state["order"]
        self.generator.set_state(state["rng"])


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for absent CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' requested but CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def steps_per_epoch(n: int, mode: str, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one pass over ``n`` samples (a short last step is kept)."""
    return n if mode == "per_sample" else math.ceil(n / (batch_size * grad_accum_steps))


def _build(key: str, component: Component, *runtime: Any) -> Any:
    """Call a registered builder; a ValueError/TypeError from it is a config error at ``key``."""
    registry, _ = COMPONENTS[key]
    builder = registry.get(component.name)
    try:
        return builder(*runtime, **component.kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key} ({component.name}): {exc}") from None


class Trainer:
    """Builds everything a config names, then trains and evaluates.

    Args:
        cfg: a validated config.
        out: where progress lines go (stdout).
    """

    def __init__(self, cfg: Config, out: TextIO | None = None):
        self.started = time.perf_counter()  # wall time includes loading data and building
        self.cfg = cfg
        self.out = out or sys.stdout
        self.stop_requested = False
        self._setup()

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.device = resolve_device(cfg.device)
        # Per-sample optimizer state (Adam's second moment, Adagrad's sum) decays into denormal
        # floats on weights whose inputs are often zero; the CPU handles those up to 20x slower.
        torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        self.data: DataBundle = _build("data", cfg.data, self.device)
        meta = self.data.meta
        if len(self.data.train) == 0:
            raise ConfigError(f"data ({cfg.data.name}): the training split is empty")
        self.model = _build("model", cfg.model, meta).to(self.device)
        self.loss_fn = loss_for(meta.task)
        self._check_fit()
        optimizer_cls = COMPONENTS["optimizer"][0].get(cfg.optimizer.name)
        self.optimizer, self.decay_counts = build_optimizer(
            self.model, optimizer_cls, cfg.optimizer.kwargs, param_groups=cfg.param_groups, no_decay=cfg.no_decay
        )
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), t.mode, t.batch_size, t.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.scheduler = None
        if cfg.scheduler is not None:
            self.scheduler = _build("scheduler", cfg.scheduler, self.optimizer, self.total_steps)
        self.engine = build_engine(
            t.engine, model=self.model, loss_fn=self.loss_fn, optimizer=self.optimizer, scheduler=self.scheduler,
            train=self.data.train, clip_grad_norm=t.clip_grad_norm, clip_grad_value=t.clip_grad_value,
            check_finite=t.check_finite, chunk_size=t.chunk_size,
            batch_shape=(t.grad_accum_steps, t.batch_size) if t.mode == "minibatch" else None,
            total_steps=self.total_steps, log=self._print,
        )  # fmt: skip
        self.state = LoopState(seed=cfg.seed)

    def _check_fit(self) -> None:
        """Run one sample through model and loss, so a mismatch is a config error, not a mid-run crash."""
        x, y = self.data.train.get(torch.zeros(1, dtype=torch.long, device=self.device))
        try:
            with torch.no_grad():
                self.loss_fn(self.model(x), y)
        except (RuntimeError, ValueError, IndexError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(
                f"model '{self.cfg.model.name}' does not fit data '{self.cfg.data.name}' "
                f"(input {tuple(x.shape[1:])}, task {self.data.meta.task}): {first}"
            ) from None

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def fit(self) -> dict[str, Any]:
        """Train to the end (or until interrupted), evaluate, write the run folder.

        Returns:
            The summary also written to ``summary.json``.
        """
        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir = make_run_dir(cfg.output.dir, cfg.name, cfg.output.run_dir)
        run = RunDir(self.run_dir)
        resolved = config_to_dict(cfg)
        run.write_config(resolved)
        meta = self.data.meta
        if meta.task == "lm":
            run.write_json("vocab.json", {**meta.extras, "vocab_size": meta.vocab_size, "block_size": meta.block_size})
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._print(
            f"run {self.run_dir} | model {cfg.model.name} ({n_params:,} params) | data {cfg.data.name} "
            f"({len(self.data.train):,} train) | optimizer {cfg.optimizer.name}: {self.decay_counts['decay']} tensors "
            f"decay, {self.decay_counts['no_decay']} do not | {t.mode}, {self.total_steps:,} steps, "
            f"engine {t.engine}, device {self.device}"
        )
        # Schedule-free optimizers start in eval mode and refuse to step in it.
        self._optimizer_mode("train")
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        progress = Progress(self.total_steps, t.progress)
        start = time.perf_counter()
        try:
            self._loop(run, progress)
        finally:
            progress.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        train_seconds = time.perf_counter() - start

        with self._evaluating():  # the weights evaluated and saved are the optimizer's eval-mode ones
            final = {split: evaluate(self.model, s, meta.task, num_classes=meta.num_classes,
                                     batch_size=t.eval_batch_size)
                     for split, s in self.data.splits().items()}  # fmt: skip
            for split, metrics in final.items():
                run.log({"event": "eval", "step": self.state.step, "epoch": self._epoch_float(), "split": split,
                         **{k: v for k, v in metrics.items() if k != "confusion"}})  # fmt: skip
            if cfg.output.save_model:
                torch.save(self.model.state_dict(), self.run_dir / "model.pt")
        final["train"] = {"loss": self.last_train_loss}
        summary = {
            "name": cfg.name,
            "run_dir": str(self.run_dir),
            "final": final,
            "steps": self.state.step,
            "epochs": round(self._epoch_float(), 6),
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "train_seconds": round(train_seconds, 3),
            "samples_per_second": round(self.samples_seen / train_seconds, 1) if train_seconds > 0 else None,
            "skipped_steps": self.skipped_steps,
            "interrupted": self.stop_requested,
            "engine": self.engine.label,
            "device": str(self.device),
            "allocator": malloc.in_use(),
            "torch_version": torch.__version__,
            "decay_tensors": self.decay_counts,
        }
        run.write_json("summary.json", summary)
        run.close()
        self._print(self._summary_line(summary))
        return summary

    def _loop(self, run: RunDir, progress: Progress) -> None:
        t, state, engine = self.cfg.trainer, self.state, self.engine
        n = len(self.data.train)
        micro = t.batch_size
        per_step = 1 if t.mode == "per_sample" else t.batch_size * t.grad_accum_steps
        chunk_cap = engine.max_chunk
        self.last_train_loss = float("nan")
        self.samples_seen = 0
        self.skipped_steps = 0
        window_start, window_samples = time.perf_counter(), 0
        order_dev = None
        while state.step < self.total_steps and not self.stop_requested:
            if state.order is None:
                order_dev = state.new_epoch(n).to(self.device)
            elif order_dev is None:
                order_dev = state.order.to(self.device)
            to_log = t.log_every - state.step % t.log_every
            to_eval = t.eval_every - state.step % t.eval_every if t.eval_every else to_log
            budget = min(self.total_steps - state.step, to_log, to_eval)
            if t.mode == "per_sample":
                k = min(budget, n - state.pos, chunk_cap)
                engine.run_samples(order_dev[state.pos : state.pos + k])
                taken, samples = k, k
            else:
                take = order_dev[state.pos : state.pos + per_step]
                engine.run_batch(list(take.split(micro)))
                taken, samples = 1, int(take.shape[0])
            state.pos += samples
            state.step += taken
            self.samples_seen += samples
            window_samples += samples
            progress.update(taken)
            if state.pos >= n:  # epoch finished
                state.epoch += 1
                state.order = None
                if t.eval_every is None and state.step < self.total_steps:
                    self._evaluate_val(run)
            if state.step % t.log_every == 0 or state.step == self.total_steps or self.stop_requested:
                self._log_window(run, progress, window_start, window_samples)
                window_start, window_samples = time.perf_counter(), 0
            if t.eval_every and state.step % t.eval_every == 0 and state.step < self.total_steps:
                self._evaluate_val(run)
        if window_samples:
            self._log_window(run, progress, window_start, window_samples)

    # ------------------------------------------------------------------ logging and evaluation

    def _epoch_float(self) -> float:
        n = len(self.data.train)
        return self.state.epoch + (self.state.pos / n if self.state.order is not None else 0.0)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_window(self, run: RunDir, progress: Progress, start: float, samples: int) -> None:
        stats = self.engine.read()  # syncs the device: once per log window
        elapsed = time.perf_counter() - start
        self.skipped_steps += stats["skipped_steps"]
        self.last_train_loss = stats["loss"]
        event = {"event": "train", "step": self.state.step, "epoch": round(self._epoch_float(), 6), "split": "train",
                 "loss": stats["loss"], "lr": self._lr(), "grad_norm": stats["grad_norm"],
                 "grad_norm_max": stats["grad_norm_max"], "skipped_steps": stats["skipped_steps"],
                 "samples_per_second": samples / elapsed if elapsed > 0 else None}  # fmt: skip
        run.log(event)
        text = f"loss {stats['loss']:.4g} | grad_norm {stats['grad_norm']:.3g} | lr {event['lr']:.3g}"
        if progress.active:
            progress.postfix(text)
        else:
            sps = event["samples_per_second"] or 0.0
            self._print(f"step {self.state.step:>8,} | epoch {event['epoch']:.2f} | {text} | {sps:,.0f} samples/s")

    def _optimizer_mode(self, mode: str) -> None:
        """Call the optimizer's ``train()`` or ``eval()``, when it has one.

        Schedule-free optimizers hold the gradient point in the parameters while training and
        the averaged point, the one to evaluate and save, in eval mode; ``schedulefree``'s own
        classes start in eval mode and raise in ``step()`` unless put in train mode first.
        Optimizers without these methods (torch.optim's) are left alone.

        Args:
            mode: ``"train"`` or ``"eval"``.
        """
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
        meta = self.data.meta
        with self._evaluating():
            metrics = evaluate(self.model, split, meta.task, num_classes=meta.num_classes,
                               batch_size=self.cfg.trainer.eval_batch_size)  # fmt: skip
        metrics.pop("confusion", None)
        run.log({"event": "eval", "step": self.state.step, "epoch": round(self._epoch_float(), 6), "split": "val", **metrics})
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._print(f"eval  step {self.state.step:,} | val {shown}")

    def _summary_line(self, s: dict[str, Any]) -> str:
        parts = [f"{'interrupted' if s['interrupted'] else 'done'}: {s['name']}", f"{s['steps']:,} steps",
                 f"{s['epochs']:.2f} epochs", f"{s['train_seconds']:.1f}s train"]  # fmt: skip
        for split in ("val", "test"):
            m = s["final"].get(split)
            if m:
                key = "accuracy" if "accuracy" in m else "loss"
                parts.append(f"{split} {key} {m[key]:.4f}")
        parts.append(f"-> {s['run_dir']}")
        return " | ".join(parts)

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

