"""Ahead-of-time compiling a traced step into a native chunk of K steps, and loading it.

K steps run inside torch's ``scan`` operator, exported and compiled by AOTInductor into a package
file, so a whole chunk is one native call: no Python, dispatch or autograd per sample. Compile
time stays flat in K (the step is compiled once, not unrolled). The learning rate of each step is
an input, filled from the schedule before the call, so a schedule never recompiles.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from singlestep import _compat as compat
from singlestep.engine._cache import cache_dir, vec_isa_record
from singlestep.runlog import write_atomic

__all__ = ["UNFUSED_BIAS", "compile_package", "inductor_configs", "load_chunk"]


class _UnfusedBias:
    """Inductor post-grad pass: ``addmm(bias, a, b)`` -> ``mm(a, b) + bias``.

    ATen's ``addmm_out`` first copies the broadcast bias into its output, a strided copy that
    costs more than the add it saves (tiny LM, batch 12: ~90 us for each 768x512 MLP output,
    ~0.8 ms of a ~24 ms step in 17 such copies). Inductor keeps the add as a pointwise op that
    fuses with its neighbours (the GELU, the residual add) or runs as one vectorised pass. On a
    GPU Inductor unfuses like this by itself; on the CPU it fuses ``mm + bias`` back into
    ``addmm`` earlier in the same stage, so this runs after its patterns. Inductor runs it on scan
    bodies too. Only CPU graphs; bf16/fp16 outputs keep ``addmm`` (as Inductor keeps them):
    ``mm`` would round the product to half precision before the bias is added.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.find_nodes(op="call_function", target=aten.addmm.default)):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            val = node.meta["val"]
            if val.device.type != "cpu" or val.dtype in (torch.bfloat16, torch.float16):
                continue  # a GPU's GEMM adds the bias in its epilogue; Inductor unfuses there itself
            bias, a, b = node.args[:3]
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (a, b))
                add = graph.call_function(aten.add.Tensor, (mm, bias))
            mm.meta.update(node.meta)  # same shape, dtype and strides as the addmm's output
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            graph.erase_node(node)

    def uuid(self) -> str:  # what Inductor's FX-graph cache would key on (AOT compiles skip it)
        return repr(self)

    def __repr__(self) -> str:  # part of both cache keys via inductor_configs: bump on any change
        return "singlestep.UnfusedBias(v3)"


UNFUSED_BIAS = _UnfusedBias()


def inductor_configs(threads: int | None) -> dict[str, Any]:
    """Compiler settings for a chunk run on ``threads`` intra-op threads (part of both cache keys).

    Measured on the 2-core CPU, with tcmalloc:
    - a small expression read by several loops is computed once instead of inside each
      (``realize_opcount_threshold``); otherwise e.g. Adam's float64 bias corrections are
      recomputed per element: per-sample Adam 27.8 -> 18.1 us/step, tiny LM batch-12 step
      26.6 -> 24.9 ms, others unchanged.
    - a per-sample chunk that runs on one thread is compiled for one thread: Inductor then
      writes plain loops instead of OpenMP regions, whose barriers each make a futex system
      call even in a team of one (~15 per step); SGD 8.5 -> 6.7 us/step.
    """
    return {"realize_opcount_threshold": 4, "post_grad_custom_post_pass": UNFUSED_BIAS,
            **({"cpp.threads": threads} if threads else {})}  # fmt: skip


def compile_package(graph: torch.fx.GraphModule, example: tuple, split: Any, shape: tuple[int, int, int],
                    path: Path, configs: dict[str, Any], log: Callable[[str], None]) -> None:  # fmt: skip
    """Export the chunk of ``shape = (K, A, B)`` built on the step ``graph`` and compile it to ``path``."""
    k, micro, rows = shape

    class Chunk(torch.nn.Module):
        """K steps: gather all their samples at once, scan the step over them, fold statistics.

        Parameters and optimizer state are updated in place (the package writes into the
        caller's tensors; nothing is copied back after the call). A single step (K = 1, a
        mini-batch) is not wrapped in a loop, so its update writes straight into them: for the
        tiny LM this cut the compile from ~60 to ~42-48 s and the peak RSS with a cached package
        by 10-60 MB.
        """

        def forward(self, flat: list[Tensor], data: dict[str, Tensor], idx: Tensor, lrs: Tensor, sums: Tensor):
            x, y = split.gather(data, idx.reshape(-1))  # [K*A*B, ...]
            x = x.reshape(k, micro, rows, *x.shape[1:])
            y = y.reshape(k, micro, rows, *y.shape[1:])
            if k == 1:  # one step (a mini-batch): no loop, so the update can write in place
                new_flat, out = graph(flat, (x[0], y[0], lrs[0]))
                out = out.unsqueeze(0)
            else:
                new_flat, out = compat.scan(graph, flat, (x, y, lrs))  # out [K, 3]: loss, norm, finite
            for old, new in zip(flat, new_flat):  # parameters and state are updated in place
                old.copy_(new)
            ok = out[:, 2]
            good = torch.where(ok[:, None] > 0, out[:, :2], 0.0)  # not out * ok: a skipped step's inf * 0 is NaN
            # sums: loss_sum, norm_sum, norm_max, skipped (the engine's window statistics)
            return torch.stack([sums[0] + good[:, 0].sum(), sums[1] + good[:, 1].sum(),
                                torch.maximum(sums[2], good[:, 1].max()), sums[3] + (k - ok.sum())])  # fmt: skip

    what = f"{k} per-sample steps" if (micro, rows) == (1, 1) else f"one step of {micro} x {rows} samples"
    log(f"compiling {what} per call (once; cached in {cache_dir()})")
    started = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(Chunk(), example, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    # Only where the user has not set Inductor's ISA check (TORCHINDUCTOR_VEC_ISA_OK).
    isa_record = vec_isa_record() if split.device.type == "cpu" and compat.vec_isa_check_pending() else None
    known_isas = isa_record is not None and isa_record.exists()
    compat.aoti_compile(exported, str(tmp), configs, known_isas)
    os.replace(tmp, path)  # atomic: a concurrent run sees a whole file or none
    if isa_record is not None and not known_isas and compat.vec_isas_all_passed():
        write_atomic(isa_record, "ok")
    log(f"compiled in {time.perf_counter() - started:.1f}s")


def load_chunk(path: Path, example: tuple, flat: Callable[[], list[Tensor]], stats: Any) -> Callable[[Tensor, Tensor], None]:
    """The package at ``path`` as ``run(idx [K, A, B], lrs [K, groups])``: K steps in place.

    ``flat()`` reads the parameters and state afresh for each call; ``stats`` (the engine's
    :class:`StepStats`) has its window sums updated by the chunk.
    """
    runner = compat.load_package(str(path))
    flat0, data0, *rest0 = example
    call = compat.flat_call(runner, example, [*flat0, *data0.values(), *rest0],
                            lambda inputs: _flat_to_nested(inputs, example))  # fmt: skip
    data_list = list(data0.values())

    def run(idx: Tensor, lrs: Tensor) -> None:
        sums = [stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped]
        (new_sums,) = call([*flat(), *data_list, idx, lrs, torch.stack(sums)])  # updates flat in place
        torch._foreach_copy_(sums, new_sums.unbind())

    return run


def _flat_to_nested(inputs: list[Tensor], example: tuple) -> tuple:
    """Rebuild ``(flat, data, *rest)`` from the flat list (the slow, general path)."""
    flat, data, *rest = example
    n, m = len(flat), len(data)
    return (inputs[:n], dict(zip(data.keys(), inputs[n : n + m])), *inputs[n + m :])
