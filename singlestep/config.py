"""The run config: a strict schema, YAML loading, ``key=value`` overrides and validation.

Every problem in a config is collected and reported at once, each naming its source (the file,
or the override that set it) and its key path, with a did-you-mean suggestion for unknown keys.
Component nodes (``model``, ``data``, ``optimizer``, ``scheduler``) are ``name:`` plus keyword
arguments, checked against the builder's signature (``singlestep.signature``) before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from singlestep.errors import ConfigError, UserError
from singlestep.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, Registry, load_builtins
from singlestep.signature import builder_kwargs, builder_params, check_type, describe
from singlestep.yaml_io import _shown, _yaml_problems, dump_yaml, parse_yaml

# parse_yaml and dump_yaml are the project's YAML (yaml_io.py), re-exported for the loaders here.

__all__ = [
    "Component",
    "Config",
    "OutputConfig",
    "TrainerConfig",
    "apply_overrides",
    "builder_kwargs",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "parse_yaml",
]

ENGINES = ("auto", "eager", "compiled", "cuda_graph")


@dataclass
class Component:
    """A registry key (or import path) plus the keyword arguments for its builder."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """How the loop runs. Every field is a YAML key under ``trainer:``."""

    # per_sample: one optimizer step per training sample (online SGD); minibatch: one per batch.
    mode: Literal["per_sample", "minibatch"] = "per_sample"
    epochs: int = 1
    # Stop after this many optimizer steps even mid-epoch; null = run all epochs.
    max_steps: int | None = None
    # Samples per micro-batch in minibatch mode (per_sample mode is batch 1 by definition).
    batch_size: int = 32
    # Micro-batches summed into one optimizer step (minibatch mode only).
    grad_accum_steps: int = 1
    # Clip the global L2 norm of all grads to this; null = off. Pre-clip norm is always logged.
    clip_grad_norm: float | None = None
    # Clamp each grad element to [-v, v] before the norm clip; null = off.
    clip_grad_value: float | None = None
    # Skip (and count) steps whose loss or grads are not finite, so the optimizer never sees them.
    # Costs one host read of a flag per step (a device sync on CUDA); false drops the check.
    check_finite: bool = True
    # What a non-finite loss or gradient does, seen at the next metrics read (every log_every steps):
    # stop = end the run there (exit 3; the skipped steps never reached the parameters);
    # skip = train on, counting the skipped steps, and stop (exit 3) once more than max_nonfinite
    # were skipped. A run that trains on NaN wastes hours and reports nothing useful.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # With on_nonfinite: skip, stop once more steps than this were skipped; null = never.
    max_nonfinite: int | None = 100
    # Stop (exit 3) when a window's mean training loss exceeds this; null = off.
    divergence_threshold: float | None = None
    # Evaluate every N optimizer steps; null = at the end of each epoch (and always at the end).
    eval_every: int | None = None
    # Read device-side accumulators (one sync) and write a metrics line every N steps.
    log_every: int = 1000
    # tqdm progress bar; forced off when stdout is not a terminal.
    progress: bool = True
    # How steps execute: eager, compiled (K per-sample steps per native call), cuda_graph, or
    # auto (compiled where it pays for itself over the run's length); see docs/performance.md.
    engine: Literal["auto", "eager", "compiled", "cuda_graph"] = "auto"
    # Per-sample steps run per compiled call by the compiled / cuda_graph engines.
    chunk_size: int = 64
    # Samples per forward pass during evaluation (memory vs speed; results are exact either way).
    eval_batch_size: int = 1000
    # hogwild: per-sample steps in `workers` processes on this machine, sharing the parameters (and
    # the optimizer's state) without locks (Niu et al. 2011); not deterministic. Across machines,
    # mini-batch steps scale with torchrun instead (docs/distributed.md).
    parallel: Literal["none", "hogwild"] = "none"
    # Processes for parallel: hogwild, each on one intra-op thread; null = one per CPU core.
    workers: int | None = None


@dataclass
class OutputConfig:
    """Where a run writes. Every field is a YAML key under ``output:``."""

    # Parent folder; each run gets a sub-folder named <name>-<timestamp>.
    dir: str = "runs"
    # Exact run folder instead (must be new or empty: an existing run is never overwritten).
    run_dir: str | None = None
    # Save the trained weights as model.pt.
    save_model: bool = True
    # Write a checkpoint (checkpoints/step-N.pt) every N optimizer steps; null = only at the end
    # and on Ctrl-C / SIGTERM. Each costs a save of model and optimizer state (an fsync).
    checkpoint_every: int | None = 10_000
    # Keep the newest N checkpoints; older ones are deleted once a newer one is safely written.
    keep_checkpoints: int = 3
    # Draw curves.png (loss, metric, lr, grad norm) at the end, when matplotlib is installed (~1 s).
    curves: bool = True
    # Also write TensorBoard event files (needs the tensorboard package); metrics.jsonl is always written.
    tensorboard: bool = False


@dataclass
class Config:
    """One training run, as resolved from YAML and overrides."""

    model: Component
    data: Component
    optimizer: Component
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    scheduler: Component | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Optimizer node keys that the framework consumes (not passed to the optimizer class).
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    no_decay: bool = True
    source: str = "<config>"


TOP_LEVEL = ("name", "seed", "device", "model", "data", "optimizer", "scheduler", "trainer", "output")
COMPONENTS: dict[str, tuple[Registry, int]] = {
    # key -> (registry, number of leading runtime arguments that are not config keys)
    "model": (MODELS, 1),  # meta
    "data": (DATASETS, 1),  # device
    "optimizer": (OPTIMIZERS, 1),  # params
    "scheduler": (SCHEDULERS, 2),  # optimizer, total_steps
}
OPTIMIZER_RESERVED = {"param_groups": list, "no_decay": bool}
_DEVICE_RE = re.compile(r"(auto|cpu|cuda(:(?:0|[1-9]\d*))?)")


# ----------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str]) -> list[tuple[str, Any, str]]:
    """Parse ``key.path=value`` strings: split on the first ``=``, value parsed as YAML.

    Returns:
        ``(dotted_key, value, original_text)`` triples.
    """
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected key.path=value, e.g. optimizer.lr=1e-3")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems = "; ".join(problem for _, _, problem in _yaml_problems(exc))
            raise ConfigError(f"override '{item}': value is not valid YAML ({problems})") from None
        out.append((key, value, item))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any, str]], origins: dict[str, str]) -> None:
    """Set each override into the raw config mapping in place, recording where each key came from.

    ``optimizer=adagrad`` (a scalar onto a component node) is short for ``optimizer.name=adagrad``.
    """
    if not isinstance(raw, dict) and overrides:
        text = overrides[0][2]
        raise ConfigError(f"override '{text}': the config must be a mapping of keys, got {type(raw).__name__}")
    for key, value, text in overrides:
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in COMPONENTS and not isinstance(value, dict) and value is not None:
            parts = [parts[0], "name"]
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part in COMPONENTS and i == 0:
                child = node[part] = {"name": child}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(parts[: i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
        origins[".".join(parts)] = f"override '{text}'"


# ----------------------------------------------------------------------------- validation


class _Problems:
    def __init__(self, source: str, origins: dict[str, str]):
        self.source, self.origins, self.items = source, origins, []

    def add(self, key: str, message: str) -> None:
        # The override that set this key, or a key above it (`trainer=...`), or one below it
        # (`trainr.epochs=2` made the unknown key 'trainr'); else the file.
        where = (
            self.origins.get(key)
            or next((o for k, o in self.origins.items() if key.startswith(k + ".")), None)
            or next((o for k, o in self.origins.items() if k.startswith(key + ".")), self.source)
        )
        self.items.append(f"{where}: {key}: {message}")


_NULL_WORDS = frozenset({"none", "null", "nil", "nul", "~", "nothing", "undefined"})


def _mismatch(value: Any, tp: Any) -> str:
    """The "expected <what the annotation takes>, got <value>" message, with a hint for 'None' meant as null."""
    if isinstance(value, str) and not check_type(value, tp):
        got = f"the string {_shown(value)}"
        if value.strip().lower() in _NULL_WORDS:
            also = "" if check_type(None, tp) else ", and this key does not take null"
            got += f" (YAML's null is written null or ~{also})"
    else:
        got = _shown(value)
    return f"expected {describe(tp)}, got {got}"


def _is_import_path(name: str) -> bool:
    """``pkg.mod.Name`` or ``pkg.mod:Name``: identifiers only, so importlib gets no relative or odd names."""
    module, colon, attr = name.partition(":")
    parts = module.split(".")
    if colon:
        parts += attr.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(options)})"


def _check_section(raw: Any, cls: type, key: str, problems: _Problems) -> Any:
    """Validate a plain dataclass section (trainer / output) and build it."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.add(key, f"expected a mapping, got {_shown(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    ok: dict[str, Any] = {}
    for k, v in raw.items():
        path = f"{key}.{k}"
        if k not in hints:
            problems.add(path, f"unknown key '{k}'{_suggest(str(k), names)}")
        elif not check_type(v, hints[k]):
            problems.add(path, _mismatch(v, hints[k]))
        elif hints[k] in (float, float | None) and isinstance(v, int):
            try:
                ok[k] = float(v)
            except OverflowError:
                problems.add(path, f"expected {describe(hints[k])}, got an integer too large for a float ({_shown(v)})")
        else:
            ok[k] = v
    return cls(**ok)


def _check_component(raw: Any, key: str, problems: _Problems, required: bool) -> Component | None:
    registry, n_runtime = COMPONENTS[key]
    if raw is None:
        if required:
            problems.add(key, f"missing; give a {registry.kind}, e.g. '{key}: {{name: {registry.names()[0] if registry.names() else '...'}}}'")
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        problems.add(key, f"expected a mapping with 'name:', got {_shown(raw)}")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problems.add(f"{key}.name", f"missing or not a string; registered {registry.kind}s: {', '.join(registry.names())}")
        return None
    if name not in registry and ("." in name or ":" in name) and not _is_import_path(name):
        kind, names = registry.kind, ", ".join(registry.names())
        problems.add(f"{key}.name", f"{_shown(name)} is neither a registered {kind} nor an import path like "
                                    f"'mypkg.module:Name'; registered {kind}s: {names}")  # fmt: skip
        return None
    try:
        builder = registry.get(name)
    except UserError as exc:
        problems.add(f"{key}.name", str(exc))
        return None
    except ImportError as exc:  # the module exists but an import inside it fails
        problems.add(f"{key}.name", f"cannot import '{name}': {exc.__class__.__name__}: {exc}")
        return None
    kwargs = {k: v for k, v in raw.items() if k != "name"}
    if key == "optimizer":
        for reserved, tp in OPTIMIZER_RESERVED.items():
            if reserved in kwargs and not isinstance(kwargs[reserved], tp):
                problems.add(f"{key}.{reserved}", _mismatch(kwargs[reserved], tp))
    # Loaded with the built-in optimizers already; importing it at the top would load torch
    # before a missing config file could be reported.
    from singlestep.optim.flags import TORCH_FLAGS, flag_value_problem, missing_flag_problem

    try:
        settable = builder_params(builder, n_runtime)
    except (ValueError, TypeError) as exc:  # a builtin or C callable without a signature to check against
        problems.add(f"{key}.name", f"cannot read the signature of {registry.kind} '{name}' ({exc}); "
                                    "a component needs a Python signature, which is its config schema")  # fmt: skip
        return None
    by_name = {p.name: (p, tp) for p, tp in settable}
    for k, v in kwargs.items():
        path = f"{key}.{k}"
        if key == "optimizer" and k in OPTIMIZER_RESERVED:
            continue
        flag = key == "optimizer" and k in TORCH_FLAGS
        if k not in by_name:
            options = list(by_name) + (list(OPTIMIZER_RESERVED) if key == "optimizer" else [])
            unknown = f"unknown key '{k}' for {registry.kind} '{name}'{_suggest(str(k), options)}"
            problems.add(path, missing_flag_problem(builder, name, k) if flag else unknown)
            continue
        tp = by_name[k][1]
        if not check_type(v, tp):
            problems.add(path, _mismatch(v, tp))
        elif flag and flag_value_problem(k, v):
            problems.add(path, flag_value_problem(k, v))
    for p, _ in settable:
        if p.default is inspect.Parameter.empty and p.name not in kwargs:
            problems.add(f"{key}.{p.name}", f"required by {registry.kind} '{name}' but not given")
    return Component(name=name, kwargs=kwargs)


def validate(raw: Any, source: str, origins: dict[str, str] | None = None) -> Config:
    """Turn a raw mapping into a :class:`Config`, raising one ConfigError listing every problem."""
    load_builtins()
    problems = _Problems(source, origins or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_LEVEL:
            problems.add(str(k), f"unknown key '{k}'{_suggest(str(k), list(TOP_LEVEL))}")
    name = raw.get("name", "run")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
        problems.add("name", f"expected a run name of letters, digits, '.', '_', '+' or '-', got {_shown(name)}")
    seed = raw.get("seed", 0)
    if not check_type(seed, int):
        problems.add("seed", _mismatch(seed, int))
    elif not -(2**63) <= seed < 2**64:
        problems.add("seed", f"must fit in 64 bits (torch.manual_seed takes -2**63 to 2**64 - 1), got {seed}")
    device = raw.get("device", "auto")
    match = _DEVICE_RE.fullmatch(device) if isinstance(device, str) else None
    # torch keeps a device index in 8 bits: 'cuda:200' would silently become cuda:-56.
    if match is None or (match.group(2) and int(match.group(2)[1:]) > 127):
        problems.add("device", f"expected auto, cpu, cuda or cuda:N (N up to 127), got {_shown(device)}")
    model = _check_component(raw.get("model"), "model", problems, required=True)
    data = _check_component(raw.get("data"), "data", problems, required=True)
    optimizer = _check_component(raw.get("optimizer"), "optimizer", problems, required=True)
    scheduler = _check_component(raw.get("scheduler"), "scheduler", problems, required=False)
    trainer = _check_section(raw.get("trainer"), TrainerConfig, "trainer", problems)
    output = _check_section(raw.get("output"), OutputConfig, "output", problems)
    _check_trainer_values(trainer, problems)
    _check_output_values(output, problems)
    if problems.items:
        raise ConfigError(problems.items)
    opt_kwargs = dict(optimizer.kwargs)
    param_groups = opt_kwargs.pop("param_groups", None) or []
    no_decay = opt_kwargs.pop("no_decay", True)
    optimizer = Component(optimizer.name, opt_kwargs)
    return Config(
        model=model, data=data, optimizer=optimizer, name=name, seed=seed, device=device,
        scheduler=scheduler, trainer=trainer, output=output, param_groups=param_groups,
        no_decay=no_decay, source=source,
    )  # fmt: skip


def _check_trainer_values(t: TrainerConfig, problems: _Problems) -> None:
    positive = {"epochs": t.epochs, "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
                "log_every": t.log_every, "chunk_size": t.chunk_size, "eval_batch_size": t.eval_batch_size}  # fmt: skip
    for key, value in positive.items():
        if isinstance(value, int) and value < 1:
            problems.add(f"trainer.{key}", f"must be >= 1, got {value}")
    for key in ("max_steps", "eval_every"):
        value = getattr(t, key)
        if isinstance(value, int) and value < 1:
            problems.add(f"trainer.{key}", f"must be >= 1 or null, got {value}")
    if isinstance(t.max_nonfinite, int) and t.max_nonfinite < 0:
        problems.add("trainer.max_nonfinite", f"must be >= 0 or null (never stop), got {t.max_nonfinite}")
    if isinstance(t.divergence_threshold, float) and not math.isfinite(t.divergence_threshold):
        problems.add("trainer.divergence_threshold", f"must be a finite number or null (off), got {t.divergence_threshold}")
    for key in ("clip_grad_norm", "clip_grad_value"):
        value = getattr(t, key)
        if isinstance(value, (int, float)) and not value > 0:  # `not >` so that .nan fails too
            problems.add(f"trainer.{key}", f"must be > 0 or null (off), got {value}")
    if t.mode == "per_sample" and t.grad_accum_steps != 1:
        problems.add("trainer.grad_accum_steps", "per_sample mode takes one step per sample; accumulation needs mode: minibatch")
    if isinstance(t.workers, int) and t.workers < 1:
        problems.add("trainer.workers", f"must be >= 1 or null (one per CPU core), got {t.workers}")
    if t.workers is not None and t.parallel == "none":
        problems.add("trainer.workers", "is for trainer.parallel: hogwild (set it too, or drop workers)")
    if t.parallel == "hogwild" and t.mode != "per_sample":
        problems.add("trainer.parallel", "hogwild runs per-sample steps (trainer.mode: per_sample); mini-batch "
                     "steps run in parallel under torchrun (docs/distributed.md)")  # fmt: skip


def _check_output_values(o: OutputConfig, problems: _Problems) -> None:
    if isinstance(o.checkpoint_every, int) and o.checkpoint_every < 1:
        problems.add("output.checkpoint_every", f"must be >= 1 or null (only at the end), got {o.checkpoint_every}")
    if isinstance(o.keep_checkpoints, int) and o.keep_checkpoints < 1:
        problems.add("output.keep_checkpoints", f"must be >= 1 (the newest is needed to resume), got {o.keep_checkpoints}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply ``key=value`` overrides and validate.

    Raises:
        ConfigError: a missing or unparsable file, or any schema problem (all listed together).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # a folder, no permission, not UTF-8, a NUL in the path
        raise ConfigError(f"{source}: cannot read config ({exc.__class__.__name__}: {exc})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        problems = []
        for line, column, problem in _yaml_problems(exc):
            where = f"{source}:{line}:{column}" if line is not None else source
            problems.append(f"{where}: invalid YAML: {problem}")
        raise ConfigError(problems) from None
    return config_from_dict({} if raw is None else raw, source, overrides)


def config_from_dict(raw: Any, source: str, overrides: list[str] | None = None) -> Config:
    """Apply ``key=value`` overrides to a raw mapping (a parsed file, a checkpoint's config) and validate."""
    origins: dict[str, str] = {}
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the config must be a mapping of keys")
        apply_overrides(raw, parse_overrides(overrides), origins)
    return validate(raw, source, origins)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The fully resolved config (defaults filled in) as plain YAML-ready data."""

    def component(c: Component | None, key: str, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        if c is None:
            return None
        registry, n_runtime = COMPONENTS[key]
        return {"name": c.name, **builder_kwargs(registry.get(c.name), n_runtime, c.kwargs), **(extra or {})}

    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "device": cfg.device,
        "model": component(cfg.model, "model"),
        "data": component(cfg.data, "data"),
        "optimizer": component(cfg.optimizer, "optimizer", {"param_groups": cfg.param_groups, "no_decay": cfg.no_decay}),
        "scheduler": component(cfg.scheduler, "scheduler"),
        "trainer": dataclasses.asdict(cfg.trainer),
        "output": dataclasses.asdict(cfg.output),
    }
