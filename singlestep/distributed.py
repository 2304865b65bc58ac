"""Data-parallel training under ``torchrun``: the process group from torchrun's environment, the
step's all-reduce, each rank's share of a batch and of an evaluation, and the checks that refuse
what would be ambiguous.

``torchrun --nproc_per_node=N -m singlestep.train --config X.yaml`` starts N copies of the same
run. Every rank draws the same seeded epoch order and walks the same loop; at each step a rank
computes the gradients of its slice of the global batch, weighted by the slice's share of it, and
the step's first stage (``engine/step.py``) sums gradients and loss over the ranks: every rank then
holds the global batch's mean gradient, the same pre-clip norm and the same finite check, so every
rank takes the same step. Rank 0 alone writes the run folder. docs/distributed.md is the guide.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from singlestep.config import Config
from singlestep.device import resolve_device
from singlestep.engine.step import GradTransform
from singlestep.errors import ConfigError, UserError

__all__ = ["SINGLE", "Dist", "launched", "session"]


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (``SINGLE`` when not launched by torchrun).

    Attributes:
        rank: this process's rank, 0 .. world_size - 1 (rank 0 writes the run folder).
        world_size: how many processes train together.
        local_rank: the rank on this machine (picks the GPU).
        device: the device this rank trains on (None: the config's ``device``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ what each rank takes

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's contiguous slice of ``idx`` (the first ranks get one more when it does not divide)."""
        return idx.tensor_split(self.world_size)[self.rank] if self.active else idx

    def span(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``n`` items (an evaluation split's samples)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def seed(self, seed: int) -> None:
        """Seed the global RNG for training: every rank built the same model from ``seed``, but
        each draws its own dropout masks for its own slice. Rank 0 goes on with the stream one
        process would; rank r > 0 restarts from ``seed + r``."""
        if self.active and self.rank > 0:
            torch.manual_seed((seed + self.rank) % 2**64)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank, as torch's
        DistributedDataParallel does: each rank normalises its own slice, so they drift apart.
        Called before an evaluation and a checkpoint, which then see one model."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def grad_transforms(self) -> tuple[GradTransform, ...]:
        """The step's first stage under torchrun: gradients and loss summed over the ranks."""
        return (_sum_across_ranks,) if self.active else ()

    # ------------------------------------------------------------------ collectives (every rank calls them)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: a stop asked of one rank (a signal) stops all at
        the same step, so none waits in a collective for a rank that left."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order, on every rank (plain values and CPU tensors)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


SINGLE = Dist()

# torchrun's variables (torch.distributed.run): every worker gets them.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when torchrun (or the like) started this process with a
    world of more than one; None otherwise (a world of one trains as a plain run)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [name for name in _ENV if name not in os.environ]
    try:
        world, rank, local = (int(os.environ.get(k, "0")) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (start the run with torchrun)") from None
    if world <= 1:
        return None
    if missing:
        raise UserError(f"WORLD_SIZE={world} is set but {', '.join(missing)} are not: start the run with "
                        "torchrun --nproc_per_node=N -m singlestep.train ...")  # fmt: skip
    return rank, world, local


def check(cfg: Config, world_size: int) -> list[str]:
    """What a config cannot do under torchrun with ``world_size`` processes (empty when it can)."""
    t = cfg.trainer
    problems = []
    if t.parallel != "none":
        return [f"trainer.parallel: {t.parallel} runs worker processes on one machine; it does not "
                "combine with torchrun (start it with python -m singlestep.train)"]  # fmt: skip
    if t.mode == "per_sample":
        problems.append(
            f"trainer.mode: per_sample under torchrun is ambiguous: one sample per process per step is a batch "
            f"of {world_size}. Use trainer.mode=minibatch (trainer.batch_size is then the global batch), or, on "
            f"one machine, per-sample steps in parallel without torchrun: trainer.parallel=hogwild "
            f"trainer.workers={world_size}"
        )  # fmt: skip
    elif t.batch_size % world_size:
        problems.append(f"trainer.batch_size ({t.batch_size}) is the global batch: it must divide by the "
                        f"{world_size} processes torchrun started (each takes batch_size / {world_size})")  # fmt: skip
    if cfg.device.startswith("cuda:"):
        problems.append(f"device: {cfg.device} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                        "write device: cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")  # fmt: skip
    return problems


def world_mismatch(saved: int, now: int) -> str | None:
    """Why a checkpoint written by ``saved`` processes cannot resume with ``now`` (None: it can)."""
    if saved == now:
        return None
    launch = f"torchrun --nproc_per_node={saved} (in all)" if saved > 1 else "python -m singlestep.train (no torchrun)"
    return (f"the checkpoint was written by {saved} process(es), this run has {now}: each process's slice of "
            f"a batch would change; resume it with {launch}")  # fmt: skip


@contextlib.contextmanager
def session(cfg: Config, resumed_world: int | None = None) -> Iterator[Dist]:
    """The process group for a run launched by torchrun (gloo on the CPU, NCCL on GPUs), torn
    down after it; ``SINGLE`` and nothing to set up otherwise. ``resumed_world``: the world size
    of the checkpoint a resume starts from (another is refused first)."""
    where = launched()
    world = where[1] if where else 1
    mismatch = world_mismatch(resumed_world, world) if resumed_world is not None else None
    if mismatch:
        raise UserError(mismatch)
    if where is None:
        yield SINGLE
        return
    rank, world, local = where
    problems = check(cfg, world)
    if problems:
        raise ConfigError([f"{cfg.source}: {p}" for p in problems])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if device.index is None:  # one GPU per process, by its rank on this machine
            device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A rank that fails makes torchrun stop the others; the timeout only bounds a rank that hangs.
    dist.init_process_group(backend, timeout=timedelta(minutes=30), device_id=device if backend == "nccl" else None)
    try:
        yield Dist(rank, world, local, device)
    finally:
        dist.destroy_process_group()


def _sum_across_ranks(grads: list[Tensor], loss: Tensor) -> tuple[list[Tensor], Tensor]:
    """Gradients and loss summed over the ranks, one all-reduce per dtype. Each rank's loss was
    weighted by its slice's share of the global batch, so the sums are the global batch's mean."""
    tensors = [*grads, loss.reshape(1)]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[Tensor] = list(tensors)
    for members in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        dist.all_reduce(flat)  # SUM
        for i, part in zip(members, flat.split([tensors[i].numel() for i in members])):
            out[i] = part.view_as(tensors[i])
    return out[:-1], out[-1].reshape(loss.shape)
