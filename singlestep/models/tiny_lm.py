"""``tiny_lm``: a small GPT-style decoder (the shape of nanoGPT's model) for character-level text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from singlestep.data.base import DataMeta
from singlestep.errors import IncompatibleError
from singlestep.registry import MODELS

__all__ = ["TinyLM", "build_tiny_lm"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t`` only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        # [b, t, c] -> [b, heads, t, c / heads]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The block's feed-forward part: 4x wider, GELU, back."""

    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks, a final norm and a head tied to the embedding.

    ``forward(idx [b, t]) -> logits [b, t, vocab_size]``; the loss is the trainer's business.
    """

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float, bias: bool
    ):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Weight tying: one matrix both embeds tokens and scores them, which saves parameters and
        # helps small models (Press & Wolf 2017). parameters() yields it once.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream, so its
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [b, t, c] + [t, c]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [b, t, vocab]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx [b, t]`` by ``max_new_tokens`` sampled tokens; returns ``[b, t + max_new_tokens]``.

        Args:
            idx: the prompt's token ids (at least one per row).
            max_new_tokens: how many tokens to append.
            temperature: divides the logits; below 1 sharpens, above 1 flattens; 0 picks the most
                likely token every time.
            top_k: sample among the ``top_k`` most likely tokens only.
            generator: random source for sampling (on the model's device), for reproducible text.

        Call ``eval()`` first unless dropout is wanted while sampling.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if idx.shape[1] < 1:
            raise ValueError("generate needs a prompt of at least one token")
        for _ in range(max_new_tokens):
            context = idx[:, -self.block_size :]  # the model sees at most block_size tokens
            logits = self(context)[:, -1, :]  # [b, vocab]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


@MODELS.register("tiny_lm", description="small GPT-style decoder (nanoGPT shape) for character-level text")
def build_tiny_lm(
    meta: DataMeta,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = True,
) -> TinyLM:
    """Build a decoder sized from a text dataset (``vocab_size``, ``block_size``).

    Args:
        meta: the dataset's meta; the task must be ``lm``.
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: on embeddings, attention weights and residual branches (0 for small data is fine).
        bias: biases in the linear and LayerNorm layers.
    """
    if meta.task != "lm" or not meta.vocab_size or not meta.block_size:
        raise IncompatibleError(
            f"model 'tiny_lm' needs a text dataset (task 'lm'), but this data's task is '{meta.task}'; "
            "use 'linear', 'mlp' or 'cnn' for it"
        )
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if n_embd % n_head:
        raise IncompatibleError(f"model 'tiny_lm': n_embd {n_embd} is not divisible by n_head {n_head}")
    return TinyLM(meta.vocab_size, meta.block_size, n_layer, n_head, n_embd, dropout, bias)
