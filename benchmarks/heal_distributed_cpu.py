"""Healing over 2 processes against 1, on a trained model, on the CPU (issue 34's loss-curve check, CPU part).

kjv16 pruned to 2x (uls plan), healed by distillation against kjv16 on kjv-train.txt: once in this process
(torch threads = --threads), once as 2 ranks of a gloo group (FSDP2, `ulsexport.heal.distributed`, each rank
--threads / 2 threads), the same settings and windows. Reports the two loss curves, their largest relative
difference, the seconds per step of each, and whether the healed weights agree; writes NAME.json and NAME.md.

    python benchmarks/heal_distributed_cpu.py --steps 30 --out benchmarks/results/heal-distributed-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ulsexport.testing import cpu_machine, free_ports, write_results

ROOT = Path(__file__).resolve().parent.parent


def _rank(rank, size, port, threads, result, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from ulsexport.heal import heal

    started = time.perf_counter()
    out = heal(**kwargs)
    if rank == 0:
        Path(result).write_text(json.dumps({"losses": out.losses, "seconds": time.perf_counter() - started,
                                            "train_seconds": out.manifest["healing"]["train_seconds"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "tests/fixtures/models/kjv16")
    ap.add_argument("--data", type=Path, default=ROOT / "tests/fixtures/data/kjv-train.txt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="threads of the one process (each rank: half)")
    ap.add_argument("--out", type=Path, required=True, help="NAME: writes NAME.json and NAME.md")
    args = ap.parse_args()

    from ulsexport.heal import heal
    from ulsexport.prune import plan_for_model, prune_checkpoint

    with tempfile.TemporaryDirectory(prefix="heal-dist-") as tmp:
        tmp = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
        student = tmp / "student"
        prune_checkpoint(args.model, student, plan_for_model(args.model, 2, "uls"), quiet=True)
        common = dict(teacher=args.model, student=student, data=args.data, steps=args.steps, batch=args.batch,
                      seq_len=args.seq_len, lr=5e-4, save_every=args.steps, teacher_samples=0, quiet=True,
                      device="cpu")
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        one = heal(out=tmp / "one", **common)
        one_seconds = time.perf_counter() - started
        result = tmp / "two.json"
        mp.spawn(_rank, args=(2, free_ports(1)[0], max(1, args.threads // 2), str(result),
                              dict(out=tmp / "two", **common)), nprocs=2, join=True)
        two = json.loads(result.read_text())
        from transformers import AutoModelForCausalLM

        a, b = (AutoModelForCausalLM.from_pretrained(tmp / n).state_dict() for n in ("one", "two"))
        weight_diff = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)

    rel = [abs(x - y) / abs(x) for x, y in zip(one.losses, two["losses"])]
    results = {
        "command": "python " + " ".join(sys.argv), "machine": cpu_machine(), "model": str(args.model.name),
        "data": args.data.name, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "threads": args.threads,
        "one_process": {"losses": one.losses, "train_seconds": one.manifest["healing"]["train_seconds"],
                        "seconds": round(one_seconds, 2)},
        "two_processes": two, "max_relative_loss_difference": max(rel),
        "max_relative_weight_difference": weight_diff,
    }
    steps = [0, 1, 2, args.steps // 2, args.steps - 1]
    lines = [
        "# Healing over 2 processes against 1, on the CPU (kjv16, 2x)", "",
        f"Produced by `{results['command']}` on this machine: {results['machine']}. kjv16 pruned to 2x (uls), "
        f"healed by distillation on {results['data']}, {args.steps} steps of {args.batch} x {args.seq_len} tokens, "
        f"lr 5e-4, no teacher samples; one process with {args.threads} threads, then 2 gloo ranks (FSDP2) with "
        f"{max(1, args.threads // 2)} each, the same windows.", "",
        "| step | loss, 1 process | loss, 2 processes | relative difference |", "|---|---|---|---|",
        *[f"| {s + 1} | {one.losses[s]:.6f} | {two['losses'][s]:.6f} | {rel[s]:.1e} |" for s in steps], "",
        f"- largest relative loss difference over the {args.steps} steps: {max(rel):.1e}",
        f"- largest relative weight difference of the healed checkpoints (max |a - b| / max |a| per tensor): "
        f"{weight_diff:.1e}",
        f"- training seconds: 1 process {results['one_process']['train_seconds']:.1f}, 2 processes "
        f"{two['train_seconds']:.1f} (on {os.cpu_count()} cores the ranks share the same cores: this says the "
        "path works, not how it scales; GPU scaling is issue 34's GPU part, not measured yet)",
        "- no memory figures: ranks started from this process inherit its peak RSS through fork and exec, so "
        "theirs would say nothing", ""]
    write_results(args.out.with_suffix(".json"), results, "\n".join(lines))


if __name__ == "__main__":
    main()
