"""Peak memory and time of `ulsexport prune` on a multi-GB checkpoint, against `cp -r` of it
and against the naive route (from_pretrained, drop layers, save_pretrained).

    python benchmarks/prune_memory.py --workdir /tmp/prune-mem --out benchmarks/results/prune-memory.md
    python benchmarks/prune_memory.py --tiny --out /tmp/prune-mem.md        # a check of the script, seconds

Builds a random Llama of about 3.8 GB (fp32) from a config; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from ulsexport.testing import SHAPES

# the 1B shape with full multi-head attention (32 kv heads): 3.55 GiB in fp32, the checkpoint of
# prune-memory.md and export-cost.md
SHAPE = dict(SHAPES["1b"], num_key_value_heads=32)

MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
src, out, keep = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
m = AutoModelForCausalLM.from_pretrained(src)
m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
m.config.num_hidden_layers = len(keep)
m.save_pretrained(out)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one command, run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, seconds, maxrss_kb = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"{cmd} failed")
    return float(seconds), int(maxrss_kb) / 1024


def build(src: Path, tiny: bool = False) -> int:
    """The random fp32 checkpoint (SHAPE, or the tiny shape) in 1 GB shards; its size in bytes."""
    from ulsexport.testing import make_random_llama

    make_random_llama(src, SHAPES["tiny"] if tiny else SHAPE, "fp32", tokenizer=False, max_shard_size="1GB")
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def fresh_checkpoint(description: str, workdir: str, out: str):
    """The command line of a cost benchmark (--workdir, --out, --tiny) and its checkpoint, built anew in
    WORKDIR/src: (args, src, bytes, shape)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(workdir))
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to check the script")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "src"
    return args, src, build(src, args.tiny), SHAPES["tiny"] if args.tiny else SHAPE


def main():
    args, src, size, shape = fresh_checkpoint(__doc__, "/tmp/prune-mem", "benchmarks/results/prune-memory.md")
    from ulsexport.prune import plan_for_model

    keep = ",".join(map(str, plan_for_model(src, 2).kept))  # the uls 2x plan, as `ulsexport prune` takes it
    ulsexport = shutil.which("ulsexport")
    rows = {
        "cp -r": measure(["cp", "-r", str(src), str(args.workdir / "copy")]),
        "ulsexport prune --speedup 2": measure([ulsexport, "--quiet", "prune", "--model", str(src),
                                                "--speedup", "2", "--out", str(args.workdir / "pruned")]),
        "naive: from_pretrained + save_pretrained": measure([sys.executable, "-c", NAIVE, str(src),
                                                             str(args.workdir / "naive"), keep]),
    }
    pruned = sum(p.stat().st_size for p in (args.workdir / "pruned").glob("*.safetensors"))
    lines = [
        "# Pruning memory and time",
        "",
        f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores. Checkpoint: random Llama, "
        f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, fp32, {size / 2**30:.2f} GiB in 1 GB "
        f"shards; pruned (uls 2x, {len(keep.split(','))} layers): "
        f"{pruned / 2**30:.2f} GiB. Command: `python benchmarks/prune_memory.py`.",
        "",
        "| command | seconds | peak RSS (MiB) |",
        "|---|---|---|",
        *[f"| {name} | {s:.1f} | {rss:.0f} |" for name, (s, rss) in rows.items()],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"checkpoint_bytes": size, "pruned_bytes": pruned,
         "runs": {k: {"seconds": s, "peak_rss_mib": r} for k, (s, r) in rows.items()}}, indent=2))
    print("\n".join(lines))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
