"""Build an optimizer from its config node: parameter groups, the no-decay rule, the class.

Groups are formed by name pattern (``fnmatch`` on ``model.named_parameters()`` names); the first
matching rule wins, unmatched parameters fall into the default group. With ``no_decay`` on, the
parameters no rule matched get ``weight_decay = 0`` when they are biases or normalisation
weights, by timm's rule: any parameter with ``ndim <= 1``, any name ending in ``.bias``, every
parameter of a normalisation layer (by module type: :data:`NORM_TYPES`), and the names a module's
``no_weight_decay()`` returns (timm's convention: parameter names, module-prefix names, or
``fnmatch`` patterns, relative to that module). Names are never guessed from substrings
(``bn`` would match ``subnet.0.weight``).

A rule's keys other than ``match`` must be hyper-parameters of the optimizer's signature, or keys
the class lists in an ``extra_group_keys`` attribute (Muon's ``use_muon``); anything else is a
config error, so a typo in a group never passes silently. torch's constructor flags (``fused``
and the others in ``singlestep.optim.flags``) are optimizer-wide: they belong on the optimizer
node, not in a rule.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn

from singlestep import _compat as compat
from singlestep.errors import ConfigError
from singlestep.optim.flags import TORCH_FLAGS, missing_flag_problem, takes

__all__ = ["NORM_TYPES", "build_optimizer", "group_keys", "group_parameters", "is_no_decay", "no_decay_names"]

# Normalisation layers whose parameters never decay, whatever their shape (LayerNorm over
# [C, H, W] has a 3-D weight). The project's own models use torch's LayerNorm and BatchNorm2d;
# a model with a norm of its own lists it in ``no_weight_decay()``.
_NORM_NAMES = (
    "LayerNorm", "GroupNorm", "RMSNorm", "SyncBatchNorm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
)  # fmt: skip
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(getattr(nn, n) for n in _NORM_NAMES)


def _model_no_decay_patterns(model: nn.Module) -> list[str]:
    """Every module's ``no_weight_decay()`` names, prefixed with that module's path."""
    patterns = []
    for prefix, module in model.named_modules():
        method = getattr(module, "no_weight_decay", None)
        if not callable(method):
            continue
        what = f"{type(module).__name__}.no_weight_decay()" + (f" (module '{prefix}')" if prefix else "")
        try:
            returned = method()
        except Exception as exc:  # the user's method: its failure is a config problem, not ours
            raise ConfigError(f"optimizer.no_decay: {what} raised {type(exc).__name__}: {exc}") from None
        names = list(returned) if isinstance(returned, Iterable) and not isinstance(returned, str) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"optimizer.no_decay: {what} must return parameter names (a set of strings), got {returned!r}")
        patterns += [f"{prefix}.{n}" if prefix else n for n in names]
    return patterns


def _no_decay_rule(model: nn.Module) -> Callable[[str, torch.Tensor], bool]:
    """The no-decay predicate for this model's parameters, with the model-wide parts worked out once."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    patterns = _model_no_decay_patterns(model)
    exact = set(patterns)
    prefixes = tuple(p + "." for p in patterns)
    wildcards = [p for p in patterns if any(c in p for c in "*?[")]

    def rule(name: str, param: torch.Tensor) -> bool:
        return (
            param.ndim <= 1
            or name.endswith(".bias")
            or id(param) in norm_params
            or name in exact
            or name.startswith(prefixes)
            or any(fnmatch.fnmatchcase(name, w) for w in wildcards)
        )

    return rule


def is_no_decay(model: nn.Module, name: str, param: torch.Tensor) -> bool:
    """True for the model's biases and normalisation weights: weight decay would only hurt them.

    That is: ``ndim <= 1``, a name ending in ``.bias``, a parameter of a normalisation layer
    (:data:`NORM_TYPES`), or a name the model's ``no_weight_decay()`` lists. For many parameters,
    :func:`no_decay_names` works the model out once.

    Args:
        model: the model that holds ``param``.
        name: its name in ``model.named_parameters()``.
        param: the parameter.
    """
    return _no_decay_rule(model)(name, param)


def no_decay_names(model: nn.Module) -> set[str]:
    """The names in ``model.named_parameters()`` that :func:`is_no_decay` exempts."""
    rule = _no_decay_rule(model)
    return {name for name, p in model.named_parameters() if rule(name, p)}


def group_parameters(
    model: nn.Module,
    rules: list[dict[str, Any]] | None,
    *,
    no_decay: bool,
    decays: bool,
    default_decays: bool = True,
    where: str = "optimizer.param_groups",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Split the trainable parameters into torch.optim param groups.

    Args:
        model: the model whose ``named_parameters`` are grouped; frozen ones are left out.
        rules: ``[{"match": "*.bias", "weight_decay": 0, ...}]``; other keys override hyper-parameters.
        no_decay: apply the no-decay rule (:func:`is_no_decay`) to parameters no explicit rule matched.
        decays: whether the optimizer has a ``weight_decay`` hyper-parameter at all.
        default_decays: whether the default group's ``weight_decay`` is non-zero. When it is zero
            the no-decay split changes nothing but costs a second group (per-sample steps pay for
            every group), so unmatched parameters stay in one group, counted as not decaying.
        where: key path for error messages.

    Returns:
        The groups (empty groups dropped) and counts ``{"decay": n, "no_decay": m}`` of tensors.
    """
    rules = rules or []
    problems = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            problems.append(f"{where}[{i}]: each group needs a 'match' pattern string, got {rule!r}")
    if problems:
        raise ConfigError(problems)

    explicit: list[list[torch.nn.Parameter]] = [[] for _ in rules]
    default: list[torch.nn.Parameter] = []
    default_no_decay: list[torch.nn.Parameter] = []
    matched = [0] * len(rules)
    split = no_decay and decays and default_decays
    exempt = _no_decay_rule(model) if split else None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for i, rule in enumerate(rules):
            if fnmatch.fnmatchcase(name, rule["match"]):
                explicit[i].append(p)
                matched[i] += 1
                break
        else:
            (default_no_decay if exempt is not None and exempt(name, p) else default).append(p)
    unmatched = [f"{where}[{i}]: pattern {r['match']!r} matches no trainable parameter" for i, (r, m) in enumerate(zip(rules, matched)) if m == 0]
    if unmatched:
        names = ", ".join(n for n, _ in list(model.named_parameters())[:8])
        raise ConfigError([f"{u} (parameter names look like: {names})" for u in unmatched])

    groups: list[dict[str, Any]] = []
    counts = {"decay": 0, "no_decay": 0}
    if default:
        groups.append({"params": default})
    if default_no_decay:
        groups.append({"params": default_no_decay, "weight_decay": 0.0})
        counts["no_decay"] += len(default_no_decay)
    counts["decay" if default_decays else "no_decay"] += len(default)
    for rule, params in zip(rules, explicit):
        group = {k: v for k, v in rule.items() if k != "match"}
        group["params"] = params
        groups.append(group)
        if decays and group.get("weight_decay", 1) == 0:
            counts["no_decay"] += len(params)
        else:
            counts["decay"] += len(params)
    if not decays:
        counts = {"decay": 0, "no_decay": counts["decay"] + counts["no_decay"]}
    return groups, counts


def group_keys(cls: type[torch.optim.Optimizer]) -> list[str] | None:
    """Keys a param-groups rule may set for ``cls``; None when the signature takes ``**kwargs``."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    skip = {"self", "params", *TORCH_FLAGS}  # optimizer-wide flags, not per-group values
    keys = [p.name for p in params if p.kind is not p.VAR_POSITIONAL and p.name not in skip]
    return keys + [k for k in getattr(cls, "extra_group_keys", ()) if k not in keys]


def _check_rule_keys(
    cls: type[torch.optim.Optimizer], rules: list[dict[str, Any]] | None, where: str = "optimizer.param_groups"
) -> None:
    allowed = group_keys(cls)
    if allowed is None or not rules:
        return
    problems = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue  # group_parameters reports the shape problem
        for key in rule:
            if key in TORCH_FLAGS:
                wide = f"{where}[{i}]: '{key}' is optimizer-wide (a constructor flag), not a per-group key"
                if takes(cls, key):
                    fix = f"set it on the optimizer: optimizer.{key}"
                else:
                    fix = missing_flag_problem(cls, cls.__name__, key)
                problems.append(f"{wide}; {fix}")
            elif key != "match" and key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: match, {', '.join(allowed)}"
                problems.append(f"{where}[{i}]: unknown key '{key}' for optimizer {cls.__name__} ({hint})")
    if problems:
        raise ConfigError(problems)


def build_optimizer(
    model: nn.Module,
    cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    *,
    param_groups: list[dict[str, Any]] | None = None,
    no_decay: bool = True,
) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """Instantiate ``cls`` over the model's trainable parameters, grouped.

    Returns:
        The optimizer and the decay / no-decay tensor counts (for the start-up report).
    """
    _check_rule_keys(cls, param_groups)
    signature = inspect.signature(cls).parameters
    decays = "weight_decay" in signature
    default_wd = kwargs.get("weight_decay", signature["weight_decay"].default if decays else 0)
    default_decays = not (isinstance(default_wd, (int, float)) and default_wd == 0)
    groups, counts = group_parameters(model, param_groups, no_decay=no_decay, decays=decays, default_decays=default_decays)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if kwargs.get("capturable") is True and any(p.device.type == "cpu" for g in groups for p in g["params"]):
        # torch only asserts this inside the first step().
        raise ConfigError("optimizer.capturable: true needs the parameters on an accelerator (CUDA); this run's are on "
                          "the cpu, where the default (false) is the only choice")  # fmt: skip
    try:
        with compat.dynamo_import_deferred():
            optimizer = cls(groups, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        # torch.optim validates hyper-parameters in __init__ ("Invalid learning rate: -1") and
        # its flags with RuntimeError ("`fused` and `foreach` cannot be `True` together.").
        raise ConfigError(f"optimizer: {exc}") from None
    return optimizer, counts
