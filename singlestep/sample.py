"""Print text sampled from a trained language model run.

    python -m singlestep.sample --run runs/shakespeare-tiny-lm --prompt "ROMEO:" --tokens 300

The run directory holds what the trainer saved: ``config.yaml`` (the resolved config),
``model.pt`` (the final state dict) and ``vocab.json`` (the dataset's ``meta.extras``: ``vocab``,
``level``, ``vocab_size``, ``block_size``). The model is rebuilt from those and sampled on the CPU
unless ``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from singlestep.errors import UserError

__all__ = ["load_lm", "main", "sample_text"]


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the run's config ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "name" not in cfg["model"]:
        raise UserError(f"{path}: not a run config (no model.name)")
    return cfg


def _state_dict(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means an unusable file
        raise UserError(f"{path}: cannot load the model weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint that wraps the state dict
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, expected a model state dict")
    # torch.compile wraps the module; its state dict keys carry the wrapper's prefix.
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_lm(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a run's language model with its trained weights, in eval mode, and its vocabulary.

    Raises:
        UserError: the folder is missing, is not a finished language-model run, or its files do
            not fit together.
    """
    from singlestep.data.base import DataMeta
    from singlestep.registry import MODELS, load_builtins

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    vocab_path = run / "vocab.json"
    if not vocab_path.is_file():
        raise UserError(f"{run} has no vocab.json: not a language-model run (sampling needs a text dataset)")
    try:
        extras = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{vocab_path}: cannot read ({exc})") from None
    if not isinstance(extras, dict) or not isinstance(extras.get("vocab"), list):
        raise UserError(f"{vocab_path}: no 'vocab' list in it; not a language-model run")
    cfg = _read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if cfg is None:
        raise UserError(f"{run} has no config.yaml; is it a run directory?")
    block_size = extras.get("block_size") or (cfg.get("data") or {}).get("block_size")
    if not isinstance(block_size, int):
        raise UserError(f"{vocab_path}: no block_size recorded")
    weights = run / "model.pt"
    if not weights.is_file():
        raise UserError(f"{run} has no model.pt (did the training finish?)")

    load_builtins()
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    vocab_size = int(extras.get("vocab_size") or len(extras["vocab"]))
    meta = DataMeta(task="lm", input_shape=(block_size,), vocab_size=vocab_size, block_size=block_size, extras=extras)
    try:
        model = MODELS.get(name)(meta, **model_cfg)
    except TypeError as exc:
        raise UserError(f"{run / 'config.yaml'}: model settings do not fit model '{name}' ({exc})") from None
    if not hasattr(model, "generate"):
        raise UserError(f"model '{name}' of run {run} cannot generate text")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device '{device}' is not a device name (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    model.to(device)
    try:
        model.load_state_dict(_state_dict(weights, device))
    except RuntimeError as exc:
        raise UserError(f"{weights}: weights do not fit the model in config.yaml ({exc})") from None
    return model.eval(), extras


def sample_text(
    model: torch.nn.Module,
    extras: dict[str, Any],
    *,
    prompt: str | None = None,
    tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by ``tokens`` sampled tokens, decoded.

    Raises:
        UserError: the prompt holds characters outside the run's vocabulary.
    """
    from singlestep.data.text import decode, encode

    if prompt is None or prompt == "":
        # Start where a speech starts when the corpus has newlines; else at the first token.
        vocab = extras["vocab"]
        newline = "\n" if extras.get("level", "char") == "char" else 10
        ids = [vocab.index(newline) if newline in vocab else 0]
        shown = ""
    else:
        try:
            ids = encode(prompt, extras)
        except ValueError as exc:
            raise UserError(f"--prompt: {exc}") from None
        shown = prompt
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator)
    return shown + decode(out[0, len(ids) :].tolist(), extras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singlestep.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (config.yaml, model.pt, vocab.json)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: start of a line)")
    parser.add_argument("--tokens", type=int, default=500, help="tokens to generate (default 500)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 wilder (default 0.8)"
    )
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens only")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    args = parser.parse_args(argv)
    try:
        if args.tokens < 0:
            raise UserError(f"--tokens must be >= 0, got {args.tokens}")
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_k is not None and args.top_k < 1:
            raise UserError(f"--top_k must be >= 1, got {args.top_k}")
        model, extras = load_lm(args.run, args.device)
        text = sample_text(
            model, extras, prompt=args.prompt, tokens=args.tokens, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed,
        )  # fmt: skip
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
