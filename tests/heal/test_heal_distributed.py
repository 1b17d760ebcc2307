"""Healing over several processes (FSDP2, gloo on the CPU): the one-process run's windows, losses and output,
checkpoints that resume on another number of processes, teacher samples that do not depend on it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from conftest import run_cli
from ulsexport.testing import free_ports
from test_heal import make_models
from ulsexport.artifact import read_manifest
from ulsexport.errors import UserError
from ulsexport.heal import heal, work_dir
from ulsexport.heal.distributed import World, check_devices, launch_command, local_rows, without_nproc, world_from_env

FAST = dict(steps=4, batch=4, seq_len=32, lr=1e-2, save_every=2, quiet=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One thread per process (conftest's one_thread)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("dist"))


class Interrupt:
    """on_step that stops the run after `step` (every rank at the same step, as Ctrl-C does)."""
    def __init__(self, step):
        self.step = step

    def __call__(self, step, loss):
        if step == self.step:
            raise KeyboardInterrupt


def _rank(rank, size, port, cache, result, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), XDG_CACHE_HOME=str(cache))
    torch.set_num_threads(1)
    try:
        out = heal(**kwargs)
        outcome = {"losses": out.losses}
    except KeyboardInterrupt:
        outcome = {"interrupted": True}
    if rank == 0:
        with open(result, "w") as f:
            json.dump(outcome, f)


def heal_ranks(size, tmp_path, cache, **kwargs) -> dict:
    """heal(**kwargs) in `size` processes of one gloo group; rank 0's outcome."""
    result = tmp_path / f"result-{size}-{os.urandom(4).hex()}.json"
    mp.spawn(_rank, args=(size, free_ports(1)[0], cache, result, kwargs), nprocs=size, join=True)
    return json.loads(result.read_text())


def _weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _same_weights(a, b):
    """Equal up to fp32 summation order (the ranks reduce gradients in another order; AdamW at lr 1e-2 turns
    a 1e-7 gradient difference into about 2e-5 of a weight of 0.9 after four steps)."""
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-4) for k in wa)


def _args(models, out, **extra):
    return dict(teacher=models["teacher"], student=models["student"], data=models["data"], out=out, **FAST, **extra)


def test_two_processes_heal_as_one_does_with_teacher_samples_and_evaluation(models, tmp_path, monkeypatch):
    settings = dict(teacher_samples=8, teacher_weight=0.5, eval_text=models["eval"], eval_samples=4, eval_tokens=512)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-1"))
    one = heal(**_args(models, tmp_path / "one", **settings))
    two = heal_ranks(2, tmp_path, tmp_path / "cache-2", **_args(models, tmp_path / "two", **settings))
    assert two["losses"] == pytest.approx(one.losses, rel=1e-4)
    assert _same_weights(tmp_path / "one", tmp_path / "two")
    # the teacher's samples (training's and evaluation's) do not depend on how many processes made them
    made = {n: sorted((tmp_path / n / "ulsexport" / "teacher-samples").glob("*.npy")) for n in ("cache-1", "cache-2")}
    assert len(made["cache-1"]) == 2 and [p.name for p in made["cache-1"]] == [p.name for p in made["cache-2"]]
    assert all(np.array_equal(np.load(a), np.load(b)) for a, b in zip(made["cache-1"], made["cache-2"]))
    record, single = read_manifest(tmp_path / "two")["healing"], read_manifest(tmp_path / "one")["healing"]
    assert record["processes"] == 2 and "processes" not in single
    assert record["quality_after"]["perplexity"] == pytest.approx(single["quality_after"]["perplexity"], rel=1e-4)
    assert record["quality_after"]["top1_agreement"] == single["quality_after"]["top1_agreement"]


@pytest.mark.parametrize("first,second", [(1, 2), (2, 1)])
def test_a_checkpoint_resumes_on_another_number_of_processes(models, tmp_path, monkeypatch, first, second):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reference = heal(**_args(models, tmp_path / "reference"))
    out = tmp_path / "healed"

    def run(size, **extra):
        if size == 1:
            try:
                return {"losses": heal(**_args(models, out, **extra)).losses}
            except KeyboardInterrupt:
                return {"interrupted": True}
        return heal_ranks(size, tmp_path, tmp_path / "cache", **_args(models, out, **extra))

    assert run(first, on_step=Interrupt(2)) == {"interrupted": True}
    assert [p.name for p in (work_dir(out) / "checkpoints").iterdir()] == ["step-00000002.pt"]
    assert torch.load(work_dir(out) / "checkpoints" / "step-00000002.pt", weights_only=True)["world_size"] == first
    resumed = run(second, resume=True)
    assert resumed["losses"] == pytest.approx(reference.losses, rel=1e-4)
    assert _same_weights(out, tmp_path / "reference")
    assert not work_dir(out).exists()


def test_lora_over_two_processes_is_merged_and_matches_one(models, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    one = heal(**_args(models, tmp_path / "one", lora_rank=4))
    two = heal_ranks(2, tmp_path, tmp_path / "cache", **_args(models, tmp_path / "two", lora_rank=4))
    assert two["losses"] == pytest.approx(one.losses, rel=1e-4)
    assert _same_weights(tmp_path / "one", tmp_path / "two")


def test_the_batch_must_split_evenly_over_the_processes():
    assert local_rows(World(1, 2, 1), 8) == slice(4, 8)
    with pytest.raises(UserError, match="multiple of the 3 processes"):
        local_rows(World(0, 3, 0), 8)


def test_launcher_arguments(monkeypatch):
    args = ["--quiet", "heal", "--nproc", "4", "--teacher", "t", "--nproc=4", "--out", "o"]
    assert without_nproc(args) == ["--quiet", "heal", "--teacher", "t", "--out", "o"]
    command = launch_command(4, without_nproc(args))
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert command[6:] == ["ulsexport.cli", "--quiet", "heal", "--teacher", "t", "--out", "o"]
    with pytest.raises(UserError, match="at least 2"):
        launch_command(1, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a host with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--nproc 2 on CUDA needs 2 GPUs; this host shows 1"):
        check_devices(2, None)   # the default device there is cuda
    with pytest.raises(UserError, match="each rank takes its own GPU"):
        check_devices(2, "cuda:0")
    check_devices(4, "cpu")      # gloo ranks: any number
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UserError, match="does not fit"):
        world_from_env()


def test_cli_nproc_runs_torchrun_and_refuses_inside_a_launched_run(models, tmp_path, monkeypatch):
    out = tmp_path / "healed"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    common = ["--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", str(models["data"]),
              "--steps", "2", "--batch", "2", "--seq-len", "32", "--device", "cpu", "--teacher-samples", "0"]
    done = subprocess.run([sys.executable, "-m", "ulsexport.cli", "--quiet", "heal", "--nproc", "2", *common,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes: torchrun" in done.stderr
    assert read_manifest(out)["healing"]["processes"] == 2
    no_gpu = run_cli("heal", "--nproc", "2", *[a for a in common if a not in ("--device", "cpu")], "--device", "cuda",
                     "--out", tmp_path / "other")   # refused by this process, before any rank starts
    assert no_gpu.exit_code == 2 and "CUDA device" in no_gpu.stderr and not (tmp_path / "other").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    inside = run_cli("heal", "--nproc", "2", *common, "--out", tmp_path / "other")
    assert inside.exit_code == 2 and "already one rank" in inside.stderr


def test_joint_healing_over_two_processes_matches_one(models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = dict(teacher=models["teacher"], student=None, data=models["data"], speedups=[1, 2], **FAST)
    one = heal(out=tmp_path / "one", **args)
    two = heal_ranks(2, tmp_path, tmp_path / "cache", out=tmp_path / "two", **args)
    assert two["losses"] == pytest.approx(one.losses, rel=1e-4)
    assert _same_weights(tmp_path / "one", tmp_path / "two")
    assert read_manifest(tmp_path / "two")["trained_depths"] == read_manifest(tmp_path / "one")["trained_depths"]
