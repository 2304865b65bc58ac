"""Build an optimizer from its config node: parameter groups, the no-decay rule, the class.

Groups are formed by name pattern (``fnmatch`` on ``model.named_parameters()`` names); the first
matching rule wins, unmatched parameters fall into the default group. With ``no_decay`` on,
biases and normalisation weights (any 1-D parameter, plus names containing ``norm``/``ln``/``bn``)
get ``weight_decay = 0`` unless an explicit rule says otherwise.

A rule's keys other than ``match`` must be hyper-parameters of the optimizer's signature, or keys
the class lists in an ``extra_group_keys`` attribute (Muon's ``use_muon``); anything else is a
config error, so a typo in a group never passes silently.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any

import torch
from torch import nn

from singlestep import _compat as compat
from singlestep.errors import ConfigError

__all__ = ["build_optimizer", "group_keys", "group_parameters", "is_no_decay"]

_NORM_HINTS = ("norm", "ln_", ".ln", "bn")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases and normalisation weights: weight decay would only hurt them."""
    lowered = name.lower()
    return param.dim() <= 1 or name.endswith(".bias") or any(h in lowered for h in _NORM_HINTS)


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
        no_decay: apply the bias/norm no-decay rule to parameters no explicit rule matched.
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
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for i, rule in enumerate(rules):
            if fnmatch.fnmatchcase(name, rule["match"]):
                explicit[i].append(p)
                matched[i] += 1
                break
        else:
            split = no_decay and decays and default_decays
            (default_no_decay if split and is_no_decay(name, p) else default).append(p)
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
    skip = {"self", "params", "foreach", "differentiable", "fused", "capturable"}
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
            if key != "match" and key not in allowed:
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
    try:
        with compat.dynamo_import_deferred():
            optimizer = cls(groups, **kwargs)
    except (ValueError, TypeError) as exc:
        # torch.optim validates hyper-parameters in __init__ ("Invalid learning rate: -1").
        raise ConfigError(f"optimizer: {exc}") from None
    return optimizer, counts
