"""Peak memory and time of `ulsexport prune` on a multi-GB checkpoint, against `cp -r` of it
and against the naive route (from_pretrained, drop layers, save_pretrained).

    python benchmarks/prune_memory.py --workdir /tmp/prune-mem --out benchmarks/results/prune-memory.md

Builds a random Llama of about 3.8 GB (fp32) from a config; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
src, out = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(src)
keep = [0, 2, 4, 6, 8, 10, 12, 15]
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


def build(src: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(src, max_shard_size="1GB")
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prune-mem"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prune-memory.md"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "src"
    size = build(src)
    ulsexport = shutil.which("ulsexport")
    rows = {
        "cp -r": measure(["cp", "-r", str(src), str(args.workdir / "copy")]),
        "ulsexport prune --speedup 2": measure([ulsexport, "--quiet", "prune", "--model", str(src),
                                                "--speedup", "2", "--out", str(args.workdir / "pruned")]),
        "naive: from_pretrained + save_pretrained": measure([sys.executable, "-c", NAIVE, str(src),
                                                             str(args.workdir / "naive")]),
    }
    pruned = sum(p.stat().st_size for p in (args.workdir / "pruned").glob("*.safetensors"))
    lines = [
        "# Pruning memory and time",
        "",
        f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores. Checkpoint: random Llama, "
        f"16 layers, hidden 2048, fp32, {size / 2**30:.2f} GiB in 1 GB shards; pruned (uls 2x, 8 layers): "
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
