"""python -m singlestep.sample on a run directory fabricated the way the trainer writes one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from singlestep.data.base import DataMeta
from singlestep.models.tiny_lm import build_tiny_lm
from singlestep.sample import load_lm, main

VOCAB = ["\n", " ", ":", "A", "B", "a", "b", "c"]
MODEL_CFG = {"name": "tiny_lm", "n_layer": 1, "n_head": 2, "n_embd": 8, "dropout": 0.0, "bias": True}


def make_run(path, *, state_transform=lambda s: s):
    path.mkdir()
    extras = {"vocab": VOCAB, "level": "char", "vocab_size": len(VOCAB), "block_size": 6, "source": "test"}
    meta = DataMeta(task="lm", input_shape=(6,), vocab_size=len(VOCAB), block_size=6, extras=extras)
    torch.manual_seed(0)
    model = build_tiny_lm(meta, **{k: v for k, v in MODEL_CFG.items() if k != "name"})
    torch.save(state_transform(model.state_dict()), path / "model.pt")
    config = {
        "name": "t",
        "seed": 0,
        "device": "cpu",
        "model": MODEL_CFG,
        "data": {"name": "text", "path": "x.txt", "block_size": 6},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "vocab.json").write_text(json.dumps(extras))
    return model


def test_samples_continue_the_prompt_reproducibly(tmp_path, capsys):
    make_run(tmp_path / "run")
    args = ["--run", str(tmp_path / "run"), "--prompt", "Ab", "--tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("Ab") and first.endswith("\n")
    text = first[:-1]
    assert len(text) == 22 and set(text) <= set(VOCAB)
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main([*args[:-1], "4"]) == 0
    assert capsys.readouterr().out != first


def test_loaded_model_carries_the_trained_weights(tmp_path):
    trained = make_run(tmp_path / "run")
    model, extras = load_lm(tmp_path / "run")
    assert not model.training and extras["vocab"] == VOCAB
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_checkpoint_wrapped_and_compiled_state_dicts_load(tmp_path):
    trained = make_run(
        tmp_path / "run", state_transform=lambda s: {"model": {"_orig_mod." + k: v for k, v in s.items()}}
    )
    model, _ = load_lm(tmp_path / "run")
    assert torch.equal(model.wte.weight, trained.wte.weight)


def test_default_prompt_starts_at_a_new_line(tmp_path, capsys):
    make_run(tmp_path / "run")
    assert main(["--run", str(tmp_path / "run"), "--tokens", "5", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out) == 5 + 1


@pytest.mark.parametrize(
    "setup, extra_args, message",
    [
        ("none", [], "does not exist"),
        ("no_vocab", [], "not a language-model run"),
        ("no_model", [], "no model.pt"),
        ("ok", ["--prompt", "Hello"], "'H', 'e', 'l', 'o'"),
        ("ok", ["--tokens", "-1"], "--tokens"),
    ],
)
def test_user_errors_exit_2_with_one_message(tmp_path, capsys, setup, extra_args, message):
    run = tmp_path / "run"
    if setup != "none":
        make_run(run)
    if setup == "no_vocab":
        (run / "vocab.json").unlink()
    if setup == "no_model":
        (run / "model.pt").unlink()
    assert main(["--run", str(run), *extra_args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.startswith("error: ")


def test_command_line_entry_point_exits_2_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "singlestep.sample", "--run", str(tmp_path / "missing")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
