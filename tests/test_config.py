"""Config strictness: unknown keys, types, all errors at once, sources and key paths, overrides."""

from __future__ import annotations

import pytest

from singlestep.config import config_to_dict, load_config, parse_overrides
from singlestep.errors import ConfigError
from tests.conftest import base_config


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_valid_config_loads_with_defaults(write_config):
    cfg = load_config(write_config(base_config()))
    assert cfg.trainer.mode == "per_sample"
    assert cfg.trainer.clip_grad_norm is None
    assert cfg.output.run_dir is None
    assert cfg.optimizer.kwargs == {"lr": 0.05}


def test_unknown_key_gets_suggestion_file_and_key_path(write_config):
    path = write_config(base_config(optimizer={"name": "torch.optim.SGD", "lr": 0.1, "momentun": 0.9}))
    (problem,) = problems_of(path)
    assert str(path) in problem
    assert "optimizer.momentun" in problem
    assert "did you mean 'momentum'" in problem


def test_unknown_top_level_and_trainer_keys(write_config):
    cfg = base_config()
    cfg["trainr"] = {}
    cfg["trainer"]["epoch"] = 2
    problems = problems_of(write_config(cfg))
    assert any("trainr" in p and "did you mean 'trainer'" in p for p in problems)
    assert any("trainer.epoch" in p and "did you mean 'epochs'" in p for p in problems)


def test_int_accepted_for_float_but_string_rejected(write_config):
    cfg = load_config(write_config(base_config(optimizer={"name": "torch.optim.SGD", "lr": 1})))
    assert cfg.optimizer.kwargs["lr"] == 1
    (problem,) = problems_of(write_config(base_config(optimizer={"name": "torch.optim.SGD", "lr": "abc"})))
    assert "optimizer.lr" in problem and "'abc'" in problem and "number" in problem


def test_several_errors_reported_at_once(write_config):
    cfg = base_config(seed="x", device="gpu")
    cfg["trainer"] = {"mode": "online", "batch_size": 0, "clip_grad_norm": -1}
    cfg["model"] = {"name": "linear", "bias": "yes"}
    problems = problems_of(write_config(cfg))
    keys = ["seed", "device", "trainer.mode", "trainer.batch_size", "trainer.clip_grad_norm", "model.bias"]
    for key in keys:
        assert any(f": {key}:" in p for p in problems), (key, problems)
    assert len(problems) == len(keys)
    text = str(ConfigError(problems))
    assert text.startswith(f"{len(keys)} config errors")


def test_unknown_component_name_suggests(write_config):
    (problem,) = problems_of(write_config(base_config(model={"name": "linaer"})))
    assert "model.name" in problem and "did you mean 'linear'" in problem


def test_missing_required_component(write_config):
    cfg = base_config()
    del cfg["optimizer"]
    (problem,) = problems_of(write_config(cfg))
    assert "optimizer" in problem and "missing" in problem


def test_bad_yaml_names_line(write_config):
    path = write_config("name: x\nmodel: {name: linear\n")
    (problem,) = problems_of(path)
    assert str(path) in problem and "invalid YAML" in problem


def test_missing_file():
    (problem,) = problems_of("/nonexistent/run.yaml")
    assert "not found" in problem


def test_overrides_parse_yaml_values():
    parsed = parse_overrides(["optimizer.lr=1e-3", "trainer.clip_grad_norm=null", "optimizer.betas=[0.9,0.99]", "name=a=b"])
    assert [(k, v) for k, v, _ in parsed] == [
        ("optimizer.lr", 1e-3),
        ("trainer.clip_grad_norm", None),
        ("optimizer.betas", [0.9, 0.99]),
        ("name", "a=b"),
    ]
    with pytest.raises(ConfigError):
        parse_overrides(["optimizer.lr"])


def test_overrides_apply_and_blame_the_override(write_config):
    path = write_config(base_config(trainer={"mode": "per_sample", "clip_grad_norm": 1.0}))
    cfg = load_config(path, ["trainer.clip_grad_norm=null", "optimizer.lr=0.5", "trainer.epochs=3"])
    assert cfg.trainer.clip_grad_norm is None
    assert cfg.optimizer.kwargs["lr"] == 0.5
    assert cfg.trainer.epochs == 3
    (problem,) = problems_of(path, ["trainer.epochs=three"])
    assert problem.startswith("override 'trainer.epochs=three': trainer.epochs")


def test_optimizer_shorthand_override(write_config):
    path = write_config(base_config(optimizer={"name": "torch.optim.SGD", "lr": 0.1}))
    cfg = load_config(path, ["optimizer=torch.optim.Adagrad"])
    assert cfg.optimizer.name == "torch.optim.Adagrad"
    assert cfg.optimizer.kwargs == {"lr": 0.1}


def test_resolved_config_fills_defaults(write_config):
    cfg = load_config(write_config(base_config()))
    resolved = config_to_dict(cfg)
    assert resolved["optimizer"]["momentum"] == 0
    assert resolved["data"]["noise"] == 0.1
    assert resolved["trainer"]["log_every"] == 16
    # Round trip: the resolved config is itself a valid config.
    again = config_to_dict(load_config(write_config(resolved, "resolved.yaml")))
    assert again == resolved


def test_per_sample_rejects_accumulation(write_config):
    (problem,) = problems_of(write_config(base_config(trainer={"mode": "per_sample", "grad_accum_steps": 4})))
    assert "trainer.grad_accum_steps" in problem
