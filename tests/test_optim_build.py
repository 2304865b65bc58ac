"""build_optimizer: the no-decay rule, param-groups rules, and how they reach every optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singlestep.errors import ConfigError
from singlestep.optim.build import build_optimizer, group_keys, is_no_decay, no_decay_names
from singlestep.registry import OPTIMIZERS, load_builtins

load_builtins()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.hidden(self.embed(idx)))))


def _group_of(opt: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]
    return group


def test_no_decay_puts_biases_and_norms_in_a_zero_decay_group():
    net = _Net()
    opt, counts = build_optimizer(net, OPTIMIZERS.get("adamw"), {"lr": 1e-3, "weight_decay": 0.1})
    for p in (net.hidden.bias, net.head.bias, net.norm.weight, net.norm.bias):
        assert _group_of(opt, p)["weight_decay"] == 0.0
    for p in (net.hidden.weight, net.head.weight, net.embed.weight):
        assert _group_of(opt, p)["weight_decay"] == 0.1
    assert counts == {"decay": 3, "no_decay": 4}
    assert not any(p is net.frozen.weight for g in opt.param_groups for p in g["params"])


class _Scaled(nn.Module):
    """A module with a norm-like gain the model-wide rules cannot know: it lists it itself."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(2, 4))
        self.proj = nn.Linear(4, 4)

    def no_weight_decay(self) -> set[str]:
        return {"gain"}


class _Tricky(nn.Module):
    """Names the old substring hints misread, a 2-D LayerNorm weight, and timm's no_weight_decay()."""

    def __init__(self) -> None:
        super().__init__()
        self.subnet = nn.Sequential(nn.Linear(4, 4))  # subnet.0.weight: contains "bn"
        self.abnormal = nn.Linear(4, 4, bias=False)  # abnormal.weight: contains "norm"
        self.norm = nn.LayerNorm([2, 4], bias=False)  # norm.weight is 2-D: only its type says "norm"
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))  # listed by no_weight_decay()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # "blocks.1": a module prefix
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})  # "heads.*": a pattern
        self.inner = _Scaled()  # its own no_weight_decay(), relative to it

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "blocks.1", "heads.*"}


def test_no_decay_rule_goes_by_shape_bias_module_type_and_no_weight_decay():
    net = _Tricky()
    assert no_decay_names(net) == {
        "norm.weight", "pos_embed", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias", "heads.a.weight",
        "heads.a.bias", "heads.b.weight", "heads.b.bias", "subnet.0.bias", "inner.gain", "inner.proj.bias",
    }  # fmt: skip
    params = dict(net.named_parameters())
    for name in ("subnet.0.weight", "abnormal.weight", "blocks.0.weight", "inner.proj.weight"):
        assert params[name].ndim == 2 and not is_no_decay(net, name, params[name]), name
    for name in ("norm.weight", "pos_embed", "blocks.1.weight", "heads.b.weight", "inner.gain"):
        assert params[name].ndim == 2 and is_no_decay(net, name, params[name]), name
    opt, counts = build_optimizer(net, OPTIMIZERS.get("adamw"), {"weight_decay": 0.1})
    assert _group_of(opt, net.subnet[0].weight)["weight_decay"] == 0.1
    assert _group_of(opt, net.abnormal.weight)["weight_decay"] == 0.1
    assert _group_of(opt, net.norm.weight)["weight_decay"] == 0.0
    assert _group_of(opt, net.pos_embed)["weight_decay"] == 0.0
    assert counts == {"decay": 4, "no_decay": 12}


_NORMS = [nn.BatchNorm2d(3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3, affine=True)]
_NORMS += [nn.RMSNorm([2, 3])] if hasattr(nn, "RMSNorm") else []  # 2-D weight; torch>=2.4


@pytest.mark.parametrize("norm", _NORMS, ids=lambda m: type(m).__name__)
def test_every_norm_layer_type_is_exempt(norm):
    net = nn.Sequential(nn.Linear(3, 3), norm)
    assert no_decay_names(net) == {"0.bias"} | {f"1.{n}" for n, _ in norm.named_parameters()}


def test_no_weight_decay_must_return_names():
    net = _Scaled()
    net.no_weight_decay = lambda: "gain"  # a bare string would exempt "g", "a", ...
    with pytest.raises(ConfigError, match=r"_Scaled.no_weight_decay\(\) must return parameter names"):
        no_decay_names(net)


def test_no_decay_off():
    net = _Net()
    opt, counts = build_optimizer(net, OPTIMIZERS.get("adamw"), {"weight_decay": 0.1}, no_decay=False)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    assert counts == {"decay": 7, "no_decay": 0}


def test_rules_override_hyper_parameters_first_match_wins():
    net = _Net()
    rules = [
        {"match": "head.*", "lr": 0.5},
        {"match": "*.bias", "weight_decay": 0.2},
        {"match": "head.bias", "lr": 9.0},
    ]
    with pytest.raises(ConfigError, match=r"param_groups\[2\]: pattern 'head.bias' matches no trainable parameter"):
        build_optimizer(net, OPTIMIZERS.get("sgd"), {"lr": 0.1}, param_groups=rules)
    opt, _ = build_optimizer(net, OPTIMIZERS.get("sgd"), {"lr": 0.1, "weight_decay": 0.01}, param_groups=rules[:2])
    assert _group_of(opt, net.head.weight)["lr"] == 0.5
    assert _group_of(opt, net.head.bias)["lr"] == 0.5  # the first rule matched it
    assert _group_of(opt, net.hidden.bias)["weight_decay"] == 0.2
    assert _group_of(opt, net.hidden.weight)["lr"] == 0.1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_bias_rule_reaches_every_optimizer(name):
    net = _Net()
    opt, _ = build_optimizer(
        net,
        OPTIMIZERS.get(name),
        {"weight_decay": 0.05},
        param_groups=[{"match": "*.bias", "weight_decay": 0}],
        no_decay=False,
    )
    for module in (net.hidden, net.head, net.norm):
        assert _group_of(opt, module.bias)["weight_decay"] == 0
    assert _group_of(opt, net.hidden.weight)["weight_decay"] == 0.05
    # One step with real gradients must work with the split groups.
    loss = net(torch.tensor([1, 2, 3])).square().mean()
    loss.backward()
    opt.step()


def test_muon_groups_from_rules():
    net = _Net()
    rules = [{"match": "embed.*", "use_muon": False}, {"match": "head.weight", "use_muon": False, "fallback_lr": 0.003}]
    opt, _ = build_optimizer(net, OPTIMIZERS.get("muon"), {"lr": 0.02, "fallback_lr": 1e-3}, param_groups=rules)
    assert _group_of(opt, net.hidden.weight)["use_muon"] is True
    assert _group_of(opt, net.embed.weight)["use_muon"] is False and _group_of(opt, net.embed.weight)["lr"] == 1e-3
    assert _group_of(opt, net.head.weight)["lr"] == 0.003
    assert _group_of(opt, net.hidden.bias)["use_muon"] is False
    assert _group_of(opt, net.hidden.bias)["weight_decay"] == 0.0  # the no-decay rule
    assert "use_muon" in group_keys(OPTIMIZERS.get("muon"))


def test_unknown_rule_key_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_optimizer(_Net(), OPTIMIZERS.get("adam"), {}, param_groups=[{"match": "*.bias", "weight_deacy": 0}])
    assert "param_groups[0]: unknown key 'weight_deacy' for optimizer Adam (did you mean 'weight_decay'?)" in str(
        info.value
    )


def test_invalid_hyper_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer: Invalid rho value: 1.5"):
        build_optimizer(_Net(), OPTIMIZERS.get("adadelta"), {"rho": 1.5})


def test_building_an_optimizer_does_not_import_the_compiler():
    """``Optimizer.add_param_group`` would import torch._dynamo (~1 s of every run's start-up)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from singlestep.optim.build import build_optimizer\n"
        "from singlestep.optim import Adam\n"
        "opt, _ = build_optimizer(torch.nn.Linear(3, 2), Adam, {'lr': 0.1, 'weight_decay': 0.01})\n"
        "raw = torch.optim.Optimizer.add_param_group.__wrapped__\n"
        "print('torch._dynamo' in sys.modules, hasattr(raw, '__dynamo_disable'), len(opt.param_groups))\n"
        "import torch._dynamo\n"
        "opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(2))]})\n"  # torch's own path again
        "print(hasattr(raw, '__dynamo_disable'), len(opt.param_groups))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False False 2"  # two groups (decay / no decay), no compiler, nothing left behind
    assert out[1] == "True 3"


def test_zero_weight_decay_keeps_one_default_group():
    """With weight_decay 0 the no-decay split would only add a group (a cost per step)."""
    net = _Net()
    opt, counts = build_optimizer(net, OPTIMIZERS.get("sgd"), {"lr": 0.1})  # sgd's default: 0
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0
    assert counts == {"decay": 0, "no_decay": 7}
    rules = [{"match": "head.*", "weight_decay": 0.1}]
    opt, counts = build_optimizer(net, OPTIMIZERS.get("sgd"), {"lr": 0.1, "weight_decay": 0.0}, param_groups=rules)
    assert len(opt.param_groups) == 2 and counts == {"decay": 2, "no_decay": 5}


def test_a_failing_no_weight_decay_is_a_config_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def no_weight_decay(self, strict):  # needs an argument the rule cannot give
            return {"fc.bias"}

    with pytest.raises(ConfigError, match=r"optimizer\.no_decay: Broken\.no_weight_decay\(\) raised TypeError"):
        build_optimizer(Broken(), OPTIMIZERS.get("adamw"), {"weight_decay": 0.01})
