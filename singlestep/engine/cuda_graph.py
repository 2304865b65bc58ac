"""The CUDA-graph engine: the compiled chunk, captured once and replayed on the GPU.

The compiled engine already runs K steps per call; on a GPU what remains per call is the launch
of each kernel from the host. Capturing the whole chunk (the compiled step kernels, the in-place
update of parameters and state, the statistics) into a ``torch.cuda.CUDAGraph`` turns a chunk
into one replay. Shapes are static: each chunk reads its sample indices and per-step learning
rates from fixed device buffers that are filled before the replay, so neither a new order nor a
schedule needs a new capture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from singlestep.engine import _trace
from singlestep.engine.compiled import CompiledEngine
from singlestep.errors import ConfigError

__all__ = ["CudaGraphEngine"]


class CudaGraphEngine(CompiledEngine):
    """:class:`CompiledEngine` with each compiled chunk replayed from a captured CUDA graph.

    Raises:
        ConfigError: the training data is not on a CUDA device.
    """

    name = "cuda_graph"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.train.device.type != "cuda":
            raise ConfigError(
                f"trainer.engine: 'cuda_graph' needs a CUDA device, but this run trains on '{self.train.device}'; "
                "use engine 'compiled' (or 'auto') on the CPU"
            )
        self.threads = None  # intra-op threads are a CPU matter

    def _build(self, shape: tuple[int, int, int]) -> Any:
        run = super()._build(shape)
        if run is None:
            return None
        k, micro, rows = shape
        device = self.train.device
        n_groups = len(self.optimizer.param_groups)
        static_idx = torch.zeros(k, micro, rows, dtype=torch.long, device=device)
        static_lrs = torch.zeros(k, n_groups, device=device)
        stats = self.stats
        state = [*_trace.flat_tensors(self.optimizer, self.params, self._state_keys), stats.loss_sum, stats.norm_sum, stats.norm_max, stats.skipped]
        backup = [t.clone() for t in state]
        # Warm up on a side stream (allocator and lazy initialisation must not happen during
        # capture), then capture; both run real steps, so everything they touch is restored.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                run(static_idx, static_lrs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            run(static_idx, static_lrs)
        with torch.no_grad():
            torch._foreach_copy_(state, backup)

        def replay(idx: Tensor, lrs: Tensor) -> None:
            static_idx.copy_(idx, non_blocking=True)
            static_lrs.copy_(lrs, non_blocking=True)
            graph.replay()

        return replay
