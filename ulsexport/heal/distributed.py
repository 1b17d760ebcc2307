"""Healing over several processes: the GPUs of a host (NCCL), or CPU processes (gloo), with PyTorch FSDP2.

`ulsexport heal --nproc N ...` starts N processes through torchrun (`launch_command`); on several hosts, or
with your own launcher, run `torchrun --nnodes ... --nproc-per-node N -m ulsexport.cli heal ...` yourself:
heal() reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and runs as one of the processes.

What differs from the one-device run, and nothing else does:
- the student and the teacher are sharded with `fully_shard` (each decoder layer its own unit, then the
  root); the leader (rank 0) reads each checkpoint on the CPU, the others build it on the meta device, and
  the weights reach every rank's shard from the leader (`load_sharded`), so no rank holds a whole model on
  its device;
- every step's `--batch` windows are the one-device run's windows, split evenly over the ranks (`local_rows`);
  FSDP averages the gradients, so the update is the one-device update up to summation order;
- teacher samples are made by every rank, a share each, and gathered (`gather_rows`);
- checkpoints hold full (unsharded) state dicts, keyed by parameter name, written by the leader: a run
  resumes on any number of processes, one included;
- the leader gathers the trained weights and writes the output, the same ordinary checkpoint as the
  one-device run's.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the healing processes (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun (or any launcher setting its variables) started this process in."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {size}")
    return World(rank, size, local)


def launch_command(nproc: int, cli_args: list[str]) -> list[str]:
    """torchrun over `nproc` processes of this host, each running `ulsexport` with `cli_args` (the command
    line the user gave, less --nproc)."""
    if not 2 <= nproc <= 1024:
        raise UserError(f"--nproc {nproc} must be at least 2 (leave it out for one process)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ulsexport.cli", *cli_args]


def without_nproc(args: list[str]) -> list[str]:
    """`args` less --nproc N (or --nproc=N)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def check_devices(nproc: int, device: str | None) -> None:
    """Refuse, before any rank starts, more ranks than this host has GPUs (one GPU per rank on CUDA)."""
    import torch

    from ..precision import resolve_device

    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda:"):
        raise UserError(f"--nproc with --device {device}: each rank takes its own GPU; give --device cuda")
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; this host shows {torch.cuda.device_count()}")


def launch(nproc: int, cli_args: list[str], device: str | None = None) -> int:
    """Run the healing ranks under torchrun and wait; they stop with this process, however it stops."""
    import signal
    import subprocess

    from ..processes import die_with_parent

    if world_from_env().distributed:
        raise UserError("--nproc: this process is already one rank of a launched run; leave --nproc out")
    command = launch_command(nproc, without_nproc(cli_args))   # refuses a count below 2
    check_devices(nproc, device)
    print(f"starting {nproc} processes: {shlex.join(['torchrun', *command[3:]])}", file=sys.stderr)
    child = subprocess.Popen(command, preexec_fn=die_with_parent(os.getpid()))
    try:
        return child.wait()
    except BaseException:   # Ctrl-C reaches the ranks too (one process group); a checkpoint stays for --resume
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def init(world: World, device: str) -> str:
    """Join the process group; the device this rank trains on (cuda:LOCAL_RANK on CUDA)."""
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise UserError(f"rank {world.rank} wants cuda:{world.local_rank}, but this host shows "
                            f"{torch.cuda.device_count()} GPUs; start at most that many processes per host")
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(model) -> None:
    """FSDP2 over the model: each decoder layer one unit, then the rest (embeddings, norm, head) at the root."""
    from torch.distributed.fsdp import fully_shard

    from ..models import decoder_layers

    for layer in decoder_layers(_base(model)):
        fully_shard(layer)
    # the root too reshards after every forward: evaluation and the teacher run forward without a backward,
    # which would leave its parameters unsharded (and the optimizer holding tensors the model no longer has)
    fully_shard(model, reshard_after_forward=True)


def _base(model):
    """The transformers model inside a peft wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_sharded(world: World, load, config_path, dtype: str, device: str, wrap=None):
    """A model sharded over the ranks with the weights the leader read: `load()` gives the leader's CPU
    model; the others build the same architecture on the meta device from `config_path`. `wrap(model)`
    (LoRA) is applied on every rank before sharding; its fresh weights come from the leader too."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..precision import torch_dtype

    if world.leader:
        model = load()
    else:
        with torch.device("meta"):
            config = AutoConfig.from_pretrained(config_path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    if wrap:
        model = wrap(model)
    state = model.state_dict() if world.leader else {}
    buffers = {n: b.clone() for n, b in model.named_buffers() if n not in state} if world.leader else None
    shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    buffers = broadcast_object(world, buffers)   # non-persistent buffers (rotary frequencies): not in the state
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value.to(device))
    return model


def broadcast_object(world: World, value):
    """The leader's `value` on every rank."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(world: World, rows: list) -> list:
    """Every rank's `rows` (lists of tokens), in rank order, on every rank."""
    if not world.distributed:
        return rows
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def local_rows(world: World, batch: int) -> slice:
    """This rank's windows of a step's `batch` (the one-device run's windows, split evenly)."""
    if batch % world.size:
        raise UserError(f"--batch {batch} must be a multiple of the {world.size} processes")
    share = batch // world.size
    return slice(world.rank * share, (world.rank + 1) * share)


def mean(world: World, value):
    """The mean of a scalar tensor over the ranks (itself for one process)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def maximum(world: World, value: float) -> float:
    if not world.distributed:
        return value
    import torch
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.float64)
    box = box.to(_comm_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def full_state(world: World, model, optimizer=None, trainable_only: bool = True):
    """(weights, optimizer state): full, on the CPU, keyed by parameter name; on the leader only (the other
    ranks get empty dicts). One process: the same format, so checkpoints move between world sizes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: v for n, v in weights.items() if n in names}
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return weights, optim


def load_full_state(world: World, model, optimizer, weights: dict, optim: dict | None) -> None:
    """The leader's full state (`full_state`'s format) into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=world.distributed)
    set_model_state_dict(model, weights if world.leader or not world.distributed else {}, options=options)
    if optim is not None or world.distributed:
        set_optimizer_state_dict(model, optimizer, optim if world.leader or not world.distributed else {},
                                 options=options)


@contextlib.contextmanager
def only_leader_prints(world: World):
    """The other ranks' stdout goes nowhere (their stderr stays: errors are seen)."""
    if world.leader:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
