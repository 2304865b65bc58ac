"""Config strictness: unknown keys, types, all errors at once, sources and key paths, overrides."""

from __future__ import annotations

import sys
import typing

import pytest
import yaml

from singlestep.config import config_to_dict, load_config, parse_overrides, parse_yaml
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


# ----------------------------------------------------------------------------- through the CLI
# Each user mistake gives exit code 2 and one message on stderr (all its problems listed), no
# traceback, and no run folder. In-process `main` is the CLI less the allocator re-exec.


def cli_error(capsys, tmp_path, path, *overrides) -> str:
    """Run the CLI on a config; assert exit 2, one error message and no run folder; return the message."""
    from singlestep.train import main

    runs = tmp_path / "runs"
    code = main(["--config", str(path), f"output.dir={runs}", *overrides])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "\nerror" not in err and "Traceback" not in err and not out, (out, err)
    assert not runs.exists()
    return err.removeprefix("error: ").rstrip("\n")


def test_cli_malformed_yaml_names_line_and_column(capsys, tmp_path, write_config):
    path = write_config("name: x\nmodel: {name: linear\n")
    assert cli_error(capsys, tmp_path, path) == (
        f"config error: {path}:3:1: invalid YAML: expected ',' or '}}', but got '<stream end>' "
        "(while parsing a flow mapping on line 2, column 8)"
    )


def test_cli_duplicate_keys_all_listed_with_both_lines(capsys, tmp_path, write_config):
    text = "name: t\nseed: 0\nseed: 1\nmodel: linear\ndata: {name: synthetic_regression, in_features: 4}\n" \
           "optimizer: {name: torch.optim.SGD, lr: 0.1, lr: 0.2}\ntrainer:\n  epochs: 1\n  epochs: 2\n"  # fmt: skip
    path = write_config(text)
    assert cli_error(capsys, tmp_path, path) == (
        "3 config errors:\n"
        f"  - {path}:3:1: invalid YAML: key 'seed' given twice, on lines 2 and 3 (a mapping takes each key once)\n"
        f"  - {path}:6:45: invalid YAML: key 'lr' given twice, at columns 36 and 45 (a mapping takes each key once)\n"
        f"  - {path}:9:3: invalid YAML: key 'epochs' given twice, on lines 8 and 9 (a mapping takes each key once)"
    )


def test_duplicate_key_in_an_override_value():
    with pytest.raises(ConfigError, match=r"key 'a' given twice, at columns 2 and 8"):
        parse_overrides(["trainer={a: 1, a: 2}"])


def test_merge_keys_may_override_without_a_duplicate_error(write_config):
    text = "defaults: &sgd {name: torch.optim.SGD, lr: 0.1, momentum: 0.9}\n"
    cfg = parse_yaml(text + "optimizer:\n  <<: *sgd\n  lr: 0.5\nother:\n  <<: *sgd\n  momentum: 0.0\n")
    assert cfg["optimizer"] == {"name": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}
    assert cfg["other"] == {"name": "torch.optim.SGD", "lr": 0.1, "momentum": 0.0}


def test_cli_unknown_keys_and_wrong_types_listed_together(capsys, tmp_path, write_config):
    path = write_config(base_config())
    assert cli_error(capsys, tmp_path, path, "trainr.epochs=2", "optimizer.lr=abc") == (
        "2 config errors:\n"
        "  - override 'trainr.epochs=2': trainr: unknown key 'trainr' (did you mean 'trainer'?)\n"
        "  - override 'optimizer.lr=abc': optimizer.lr: expected a number, got the string 'abc'"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.batch_size=0", "trainer.batch_size: must be >= 1, got 0"),
        ("trainer.epochs=0", "trainer.epochs: must be >= 1, got 0"),
        ("trainer.clip_grad_norm=.nan", "trainer.clip_grad_norm: must be > 0 or null (off), got nan"),
        ("seed=18446744073709551616",
         "seed: must fit in 64 bits (torch.manual_seed takes -2**63 to 2**64 - 1), got 18446744073709551616"),
        ("device=cuda:200", "device: expected auto, cpu, cuda or cuda:N (N up to 127), got 'cuda:200'"),
    ],
    ids=["batch-size-0", "epochs-0", "clip-nan", "seed-65-bits", "cuda-index"],
)  # fmt: skip
def test_cli_out_of_range_config_values(capsys, tmp_path, write_config, override, message):
    got = cli_error(capsys, tmp_path, write_config(base_config()), override)
    assert got == f"config error: override '{override}': {message}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lr=-1"], "Invalid learning rate: -1"),
        (["optimizer=torch.optim.Adadelta", "optimizer.rho=1.5"], "Invalid rho value: 1.5"),
        (["optimizer.nesterov=true"], "Nesterov momentum requires a momentum and zero dampening"),
    ],
    ids=["lr-negative", "rho-above-1", "nesterov-without-momentum"],
)
def test_cli_out_of_range_optimizer_values_at_build(capsys, tmp_path, write_config, overrides, message):
    # torch.optim's own checks, raised while the trainer builds the optimizer (before any run folder).
    assert cli_error(capsys, tmp_path, write_config(base_config()), *overrides) == f"config error: optimizer: {message}"


@pytest.mark.parametrize("text", ["None", "none", "NONE", "'null'", "nil"])
def test_cli_string_none_gets_the_yaml_null_hint(capsys, tmp_path, write_config, text):
    message = cli_error(capsys, tmp_path, write_config(base_config()), f"trainer.clip_grad_norm={text}")
    string = text.strip("'")
    assert message == (
        f"config error: override 'trainer.clip_grad_norm={text}': trainer.clip_grad_norm: expected a number or null, "
        f"got the string '{string}' (YAML's null is written null or ~)"
    )


def test_string_none_in_a_file_and_for_a_key_without_null(write_config):
    cfg = base_config(optimizer={"name": "torch.optim.SGD", "lr": "None"})
    cfg["trainer"]["max_steps"] = "None"
    path = write_config(cfg)
    assert problems_of(path) == [
        (f"{path}: optimizer.lr: expected a number, got the string 'None' "
         "(YAML's null is written null or ~, and this key does not take null)"),
        (f"{path}: trainer.max_steps: expected an integer or null, got the string 'None' "
         "(YAML's null is written null or ~)"),
    ]  # fmt: skip
    assert load_config(path, ["trainer.max_steps=~", "optimizer.lr=0.1"]).trainer.max_steps is None


@pytest.mark.parametrize(
    "name, message",
    [
        ("nosuchmod.Foo", "cannot import module 'nosuchmod' for 'nosuchmod.Foo': No module named 'nosuchmod'"),
        ("torch.nn.Linear", ("'torch.nn.Linear' cannot be used as optimizer: "
                             "<class 'torch.nn.modules.linear.Linear'> is not a torch.optim.Optimizer subclass")),
        ("torch.optim.NoSuch", "module 'torch.optim' has no attribute 'NoSuch'"),
        (".relative.Name", ("'.relative.Name' is neither a registered optimizer nor an import path "
                            "like 'mypkg.module:Name'; registered optimizers: adadelta, ")),
    ],
    ids=["missing-module", "wrong-kind", "missing-attribute", "not-a-path"],
)  # fmt: skip
def test_cli_bad_import_paths(capsys, tmp_path, write_config, name, message):
    got = cli_error(capsys, tmp_path, write_config(base_config()), f"optimizer.name={name}")
    assert got.startswith(f"config error: override 'optimizer.name={name}': optimizer.name: {message}"), got


@pytest.mark.parametrize(
    "betas, got", [("[0.9]", "[0.9]"), ("[0.9,0.99,0.999]", "[0.9, 0.99, 0.999]"), ("0.9", "0.9")],
    ids=["one", "three", "scalar"],
)
def test_cli_tuple_of_the_wrong_length(capsys, tmp_path, write_config, betas, got):
    path = write_config(base_config())
    message = cli_error(capsys, tmp_path, path, "optimizer=torch.optim.Adam", f"optimizer.betas={betas}")
    assert message == (
        f"config error: override 'optimizer.betas={betas}': optimizer.betas: expected a list of 2 numbers, got {got}"
    )


def test_describe_and_check_fixed_and_variable_tuples():
    import torch

    from singlestep.signature import check_type, describe

    assert describe(tuple[float, float]) == "a list of 2 numbers"
    assert describe(tuple[float | torch.Tensor, float | torch.Tensor]) == "a list of 2 numbers"
    assert describe(typing.Tuple[float, ...]) == "a list of numbers"  # noqa: UP006 - the old spelling, still written
    assert describe(tuple[float, str]) == "a list of 2 items: a number, a string"
    assert describe(list[tuple[int, int]] | None) == "a list of lists of 2 integers or null"
    assert check_type([0.9, 1], tuple[float, float]) and not check_type([0.9], tuple[float, float])
    assert check_type([], tuple[float, ...]) and check_type([1, 2.5, 3], tuple[float, ...])
    assert not check_type([1, "x"], tuple[float, ...])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda(capsys, tmp_path, write_config):
    import torch

    message = cli_error(capsys, tmp_path, write_config(base_config(device="cuda")))
    assert message == f"config error: device: 'cuda' requested but CUDA is not available (torch {torch.__version__})"


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: 2020-13-45\n", ":1:7: invalid YAML: cannot read '2020-13-45' as a timestamp: month must be in 1..12"),
        ("seed: !!float abc\n",
         ":1:7: invalid YAML: cannot read 'abc' as a float: could not convert string to float: 'abc'"),
        ("seed: ._\n", ":1:7: invalid YAML: cannot read '._' as a float: could not convert string to float: '.'"),
        ("name: t\nseed: \x07\n",
         ":2:7: invalid YAML: character '\\x07' is not allowed in YAML (special characters are not allowed)"),
        ("seed: " + "[" * sys.getrecursionlimit() + "\n", ": invalid YAML: nested too deeply to parse"),
    ],
    ids=["bad-date", "bad-float-tag", "underscore-float", "control-character", "deep-nesting"],
)  # fmt: skip
def test_yaml_values_python_cannot_build_are_yaml_errors(write_config, text, message):
    path = write_config(text)
    assert problems_of(path) == [f"{path}{message}"]


def test_print_config_output_loads_back_with_number_like_strings(capsys, write_config):
    from singlestep.train import main

    cfg = base_config()
    del cfg["name"]
    path = write_config("name: '1e3'\n" + yaml.safe_dump(cfg))  # quoted: a string, which PyYAML would write bare
    assert load_config(path).name == "1e3"
    assert main(["--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: '1e3'" in printed
    assert load_config(write_config(printed, "printed.yaml")).name == "1e3"
