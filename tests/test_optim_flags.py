"""torch's optimizer flags (foreach, fused, capturable, differentiable) in a config, end to end."""

from __future__ import annotations

import pytest
import torch

from singlestep.config import config_to_dict, load_config
from singlestep.errors import ConfigError
from singlestep.optim import Adam
from singlestep.optim.build import build_optimizer
from tests.conftest import ROOT, base_config, run_cli


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_flags_reach_the_classes_that_take_them(write_config):
    cfg = load_config(write_config(base_config(optimizer={"name": "torch.optim.AdamW", "lr": 0.01, "fused": True})))
    assert cfg.optimizer.kwargs == {"lr": 0.01, "fused": True}
    resolved = config_to_dict(cfg)["optimizer"]
    assert resolved["fused"] is True and resolved["foreach"] is None and resolved["capturable"] is False
    opt, _ = build_optimizer(torch.nn.Linear(3, 2), torch.optim.AdamW, cfg.optimizer.kwargs)
    assert opt.defaults["fused"] is True and all(g["fused"] is True for g in opt.param_groups)


def test_flags_are_type_checked_against_the_signature(write_config):
    (problem,) = problems_of(write_config(base_config(optimizer={"name": "torch.optim.SGD", "foreach": "yes please"})))
    assert "optimizer.foreach" in problem and "expected true/false or null" in problem


def test_a_third_party_class_takes_its_own_flags(write_config):
    pytest.importorskip("schedulefree")
    cfg = load_config(write_config(base_config(optimizer={"name": "schedulefree.AdamWScheduleFree", "foreach": False})))
    assert cfg.optimizer.kwargs["foreach"] is False
    name = "schedulefree.AdamWScheduleFree"
    (problem,) = problems_of(write_config(base_config(optimizer={"name": name, "fused": True})))
    says = f"optimizer.fused: 'fused' is one of torch's optimizer flags, but optimizer '{name}' does not take it"
    assert f"{says} (its flags: foreach)" in problem


def test_a_flag_the_torch_class_lacks_names_the_ones_it_has(write_config):
    (problem,) = problems_of(write_config(base_config(optimizer={"name": "torch.optim.SGD", "capturable": True})))
    assert "'torch.optim.SGD' does not take it (its flags: foreach, fused, differentiable)" in problem


@pytest.mark.parametrize(
    "name, key, says",
    [
        ("adam", "fused", "it takes torch's fused CPU kernel by itself where that is safe"),
        ("sgd", "foreach", "it uses `_foreach` ops by itself"),
        ("adamw", "capturable", "keeps all its state as tensors on the parameters' device"),
        ("lion", "fused", "it has no fused path to switch on"),
        ("adagrad", "differentiable", "steps under no_grad"),
    ],
)
def test_our_optimizers_explain_why_they_take_no_flag(write_config, name, key, says):
    (problem,) = problems_of(write_config(base_config(optimizer={"name": name, key: True})))
    assert f"optimizer.{key}: singlestep's '{name}' takes no '{key}' flag: " in problem
    assert says in problem
    torch_name = {"adam": "Adam", "sgd": "SGD", "adamw": "AdamW"}.get(name)
    if torch_name and key != "differentiable":
        assert problem.endswith(f"for torch's flag use name: torch.optim.{torch_name}")
    else:
        assert "torch.optim." not in problem  # lion: torch has none; differentiable: refused there too


def test_differentiable_true_is_refused_before_the_first_step(write_config):
    (problem,) = problems_of(write_config(base_config(optimizer={"name": "torch.optim.AdamW", "differentiable": True})))
    assert "optimizer.differentiable: true" in problem and "leave it false" in problem
    assert load_config(write_config(base_config(optimizer={"name": "torch.optim.AdamW", "differentiable": False})))


def test_build_turns_torch_flag_errors_into_config_errors():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="optimizer: `fused` and `foreach` cannot be `True` together"):
        build_optimizer(model, torch.optim.AdamW, {"fused": True, "foreach": True})
    with pytest.raises(ConfigError, match=r"optimizer.capturable: true needs the parameters on an accelerator"):
        build_optimizer(model, torch.optim.AdamW, {"capturable": True})  # torch asserts only in step()


def test_a_param_groups_rule_says_flags_are_optimizer_wide():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError) as info:
        build_optimizer(model, torch.optim.AdamW, {}, param_groups=[{"match": "*.bias", "fused": True}])
    assert "param_groups[0]: 'fused' is optimizer-wide (a constructor flag), not a per-group key; set it on the " \
           "optimizer: optimizer.fused" in str(info.value)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        build_optimizer(model, Adam, {}, param_groups=[{"match": "*.bias", "foreach": False}])
    assert "'foreach' is optimizer-wide" in str(info.value) and "takes no 'foreach' flag" in str(info.value)


@pytest.mark.slow  # two CLI processes, ~7 s
def test_cli_trains_torch_adamw_fused_and_refuses_it_for_ours(tmp_path):
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    ok = run_cli("--config", quickstart, "optimizer.name=torch.optim.AdamW", "optimizer.fused=true",
                 "trainer.epochs=1", "trainer.engine=eager", f"output.run_dir={tmp_path / 'run'}")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "optimizer torch.optim.AdamW" in ok.stdout and ok.stdout.strip().splitlines()[-1].startswith("done:")
    assert "fused: true" in (tmp_path / "run" / "config.yaml").read_text()
    refused = run_cli("--config", quickstart, "optimizer.name=adam", "optimizer.fused=true")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    assert "optimizer.fused: singlestep's 'adam' takes no 'fused' flag" in refused.stderr
    assert "use name: torch.optim.Adam" in refused.stderr
