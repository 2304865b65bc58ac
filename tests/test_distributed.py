"""Data-parallel training under torchrun: the same parameters as one process over the same order,
one run folder, exact evaluation, resume, and the refusals (per-sample steps, an indivisible batch,
another world size)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from singlestep.data.base import TensorSplit, TokenSplit
from singlestep.metrics import evaluate
from tests.conftest import ROOT, base_config, run_main


def _config(tmp_path: Path, **trainer) -> Path:
    """Mini-batch linear regression, global batch 32, a short last batch (100 = 3 x 32 + 4), dropout-free."""
    cfg = base_config()
    cfg["data"] = {"name": "synthetic_regression", "in_features": 5, "train_size": 100, "val_size": 37, "test_size": 23}
    cfg["optimizer"] = {"name": "adam", "lr": 0.05}
    cfg["scheduler"] = {"name": "cosine"}
    cfg["trainer"] = {"mode": "minibatch", "batch_size": 32, "epochs": 2, "log_every": 3, "progress": False,
                      "clip_grad_norm": 0.5, "engine": "auto", **trainer}  # fmt: skip
    cfg["output"] = {"dir": str(tmp_path / "runs"), "curves": False, "checkpoint_every": 2}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, cwd: Path, timeout: float = 180) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def _single(config: Path, run_dir: Path, *overrides: str) -> Path:
    assert run_main("--config", str(config), f"output.run_dir={run_dir}", "output.dir=elsewhere", *overrides).returncode == 0
    return run_dir


def _assert_same_run(ddp: Path, single: Path) -> None:
    for name, p in _params(single).items():
        torch.testing.assert_close(_params(ddp)[name], p, rtol=1e-5, atol=1e-7)
    ours, theirs = _events(ddp, "eval"), _events(single, "eval")
    assert [(e["step"], e["split"]) for e in ours] == [(e["step"], e["split"]) for e in theirs]
    for a, b in zip(ours, theirs):  # evaluation over the whole split, each rank a part of it
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["r2"] == pytest.approx(b["r2"], rel=1e-5, abs=1e-7)
    ours, theirs = _events(ddp, "train"), _events(single, "train")
    assert [e["step"] for e in ours] == [e["step"] for e in theirs]
    for a, b in zip(ours, theirs):  # the logged loss and norm are the global batch's
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_and_resume(tmp_path, monkeypatch):
    """2 gloo processes, global batch 32: the parameters of one process with batch 32 over the same
    order (rtol 1e-5), one run folder (rank 0's); then a resume under torchrun trains on to the end."""
    config = _config(tmp_path)
    single = _single(config, tmp_path / "single")
    half = _finish(_torchrun("--nproc_per_node=2", "-m", "singlestep.train", "--config", str(config),
                             "trainer.epochs=1", cwd=tmp_path))  # fmt: skip
    assert "engine auto runs eagerly under torchrun" in half
    assert half.count("done:") == 1  # rank 0 alone prints
    (run_dir,) = (tmp_path / "runs").iterdir()  # exactly one run folder
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000002.pt", "step-000000004.pt"]
    out = _finish(_torchrun("--nproc_per_node=2", "-m", "singlestep.train", "--resume", str(run_dir), "trainer.epochs=2",
                            cwd=tmp_path))  # fmt: skip
    assert "resumed at step 4" in out
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    # The schedule was built for the 1-epoch run, so the reference is trained the same way.
    reference = _single(config, tmp_path / "reference", "trainer.epochs=1")
    assert run_main("--resume", str(reference), "trainer.epochs=2").returncode == 0
    _assert_same_run(run_dir, reference)
    assert not torch.equal(_params(run_dir)["fc.weight"], _params(single)["fc.weight"])  # the schedule differs
    # Another world size cannot resume it: each rank's slice of a batch would change.
    done = run_main("--resume", str(run_dir), "trainer.epochs=3")
    assert done.returncode == 2
    assert "written by 2 process(es), this run has 1" in done.stderr and "torchrun --nproc_per_node=2" in done.stderr
    _launched(monkeypatch, world=3)  # said before the global batch's (32 does not divide by 3)
    done = run_main("--resume", str(run_dir), "trainer.epochs=3")
    assert done.returncode == 2 and "written by 2 process(es), this run has 3" in done.stderr, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_match_one_process(tmp_path):
    """Two torchrun agents, --nnodes=2, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    config = _config(tmp_path)
    single = _single(config, tmp_path / "single")
    port = _free_port()
    args = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=singlestep-test", "-m", "singlestep.train", "--config", str(config)]  # fmt: skip
    nodes = [_torchrun(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [_finish(node) for node in nodes]
    assert sum(out.count("done:") for out in outputs) == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    _assert_same_run(run_dir, single)


def _launched(monkeypatch, world: int = 2) -> None:
    """torchrun's variables, as rank 0 of ``world`` sees them (no process group is started: the
    checks come first)."""
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_per_sample_steps_under_torchrun_are_refused(tmp_path, write_config, monkeypatch):
    _launched(monkeypatch)
    done = run_main("--config", str(write_config(base_config())))
    assert done.returncode == 2
    assert "per_sample under torchrun is ambiguous" in done.stderr and "batch of 2" in done.stderr
    assert "trainer.mode=minibatch" in done.stderr and "trainer.parallel=hogwild" in done.stderr


def test_hogwild_under_torchrun_is_refused_with_one_message(write_config, monkeypatch):
    _launched(monkeypatch)
    cfg = base_config()
    cfg["trainer"].update(parallel="hogwild", workers=2)
    done = run_main("--config", str(write_config(cfg)))
    assert done.returncode == 2 and "does not combine with torchrun" in done.stderr
    assert "per_sample under torchrun" not in done.stderr  # which would suggest hogwild


def test_a_global_batch_that_does_not_divide_by_the_world_is_refused(tmp_path, write_config, monkeypatch):
    _launched(monkeypatch, world=3)
    cfg = base_config(trainer={"mode": "minibatch", "batch_size": 32, "progress": False})
    done = run_main("--config", str(write_config(cfg)))
    assert done.returncode == 2 and "trainer.batch_size (32) is the global batch" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_world_size_without_torchrun_s_other_variables_is_a_user_error(write_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = base_config(trainer={"mode": "minibatch", "batch_size": 8, "progress": False})
    done = run_main("--config", str(write_config(cfg)))
    assert done.returncode == 2 and "start the run with torchrun" in done.stderr


@pytest.mark.parametrize("task", ["classification", "regression", "lm"])
@pytest.mark.parametrize("parts", [2, 3])
def test_evaluation_in_parts_combined_equals_one_pass(task, parts):
    """Each rank evaluates its part of the split; the combined sums give the whole split's metrics."""
    g = torch.Generator().manual_seed(0)
    if task == "lm":
        split = TokenSplit(torch.randint(0, 7, (301,), generator=g), block_size=8)
        model = torch.nn.Sequential(torch.nn.Embedding(7, 7))
        num_classes = None
    else:
        x = torch.randn(103, 4, generator=g) + 1e4 * (task == "regression")
        y = torch.randint(0, 3, (103,), generator=g) if task == "classification" else x[:, :2] * 3 + 1
        split = TensorSplit(x, y)
        model = torch.nn.Linear(4, 3 if task == "classification" else 2)
        num_classes = 3 if task == "classification" else None
    whole = evaluate(model, split, task, num_classes=num_classes, batch_size=10)
    states = []
    for rank in range(parts):
        span = lambda n, r=rank: (n * r // parts, n * (r + 1) // parts)  # noqa: E731 - Dist.span's rule
        evaluate(model, split, task, num_classes=num_classes, batch_size=10, part=span,
                 combine=lambda state: states.append(state) or [state])  # fmt: skip
    combined = evaluate(model, split, task, num_classes=num_classes, batch_size=10, part=lambda n: (0, 0),
                        combine=lambda state: states)  # fmt: skip
    assert combined.keys() == whole.keys()
    for key, value in whole.items():
        if key == "confusion":
            assert combined[key] == value
        else:  # the chunks' float32 losses are summed over other boundaries; the rest is exact
            assert combined[key] == pytest.approx(value, rel=1e-6 if key in ("loss", "mse", "perplexity", "bits_per_char", "mae") else 1e-9), key


def bn_dropout_net(meta):
    """A model with BatchNorm and dropout: what makes ranks differ unless the trainer handles it."""
    width = 16
    return torch.nn.Sequential(torch.nn.Linear(meta.input_shape[0], width), torch.nn.BatchNorm1d(width),
                               torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(width, meta.out_features))  # fmt: skip


def _rank(rank: int, store: str, cfg: dict, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from singlestep.config import validate
    from singlestep.distributed import Dist
    from singlestep.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        trainer = Trainer(validate(cfg, "test.yaml"), out=open(os.devnull, "w"), dist=Dist(rank, 2, rank))
        draw = torch.rand(4)  # the training RNG, after set-up
        trainer.fit()
        # numpy: a tensor sent through a queue is a shared-memory handle that dies with this process
        results.put((rank, draw.numpy(), {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}))
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path, cfg: dict) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Train ``cfg`` as two forked gloo ranks (a file store): each rank's first training draw and
    final state."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    store = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
    ranks = [context.Process(target=_rank, args=(r, str(store), cfg, results), daemon=True) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        got = {}
        for _ in ranks:
            rank, draw, state = results.get(timeout=120)
            got[rank] = torch.from_numpy(draw), {k: torch.from_numpy(v) for k, v in state.items()}
        for p in ranks:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
    return got


def test_ranks_draw_their_own_dropout_and_share_rank_0_s_batchnorm_statistics(tmp_path):
    """Forked ranks of a BatchNorm + dropout model: the same initial weights and always the same
    parameters, different dropout masks, and after the run one set of running statistics (rank
    0's), which model.pt holds."""
    cfg = base_config(model={"name": "tests.test_distributed.bn_dropout_net"})
    cfg["trainer"] = {"mode": "minibatch", "batch_size": 16, "epochs": 2, "log_every": 2, "progress": False, "engine": "eager"}
    cfg["output"] = {"run_dir": str(tmp_path / "run"), "curves": False}
    got = _two_ranks(tmp_path, cfg)
    (draw0, state0), (draw1, state1) = got[0], got[1]
    assert not torch.equal(draw0, draw1)  # each rank its own masks
    assert state0.keys() == state1.keys() and any("running_mean" in k for k in state0)
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key  # parameters by the all-reduce, buffers by the broadcast
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], state0[k]) for k in state0)


def test_a_rank_with_no_share_of_a_short_last_step_matches_one_process(tmp_path):
    """97 samples, global batch 32: the last step of each epoch has 1 sample, so rank 1 has none
    (a zeroed gradient list like rank 0's); the result is one process's with batch 32."""
    cfg = base_config()
    cfg["data"].update(train_size=97)
    cfg["optimizer"] = {"name": "adam", "lr": 0.05}
    cfg["trainer"] = {"mode": "minibatch", "batch_size": 32, "epochs": 2, "log_every": 2, "progress": False,
                      "engine": "eager", "clip_grad_norm": 0.5}  # fmt: skip
    cfg["output"] = {"run_dir": str(tmp_path / "run"), "curves": False}
    got = _two_ranks(tmp_path, cfg)
    single = tmp_path / "single"
    assert run_main("--config", str(_write(tmp_path, cfg)), f"output.run_dir={single}").returncode == 0
    for name, p in _params(single).items():
        torch.testing.assert_close(got[0][1][name], p, rtol=1e-5, atol=1e-7)
        assert torch.equal(got[0][1][name], got[1][1][name])


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "single.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
