"""Time and peak memory of `ulsexport onnx` (fp32, CPU, with its parity check) on a 1B-shaped Llama, full
depth and pruned 2x, on this machine.

    python benchmarks/export_cost.py --workdir /tmp/export-cost --out benchmarks/results/export-cost.md
    python benchmarks/export_cost.py --tiny --out /tmp/export-cost.md     # a check of the script

The checkpoint is the random 1.1B-parameter Llama of prune_memory.py (16 layers, hidden 2048); nothing is
downloaded.
"""
from __future__ import annotations

import json
import os
import platform
import shutil

from prune_memory import fresh_checkpoint, measure


def main():
    args, src, size, shape = fresh_checkpoint(__doc__, "/tmp/export-cost", "benchmarks/results/export-cost.md")
    ulsexport = shutil.which("ulsexport")
    pruned = args.workdir / "pruned"
    measure([ulsexport, "--quiet", "prune", "--model", str(src), "--speedup", "2", "--out", str(pruned)])
    rows = {}
    layers = shape["num_hidden_layers"]
    kept = len(json.loads((pruned / "ulsexport.json").read_text())["kept"])
    for name, model in ((f"full ({layers} layers)", src), (f"uls 2x ({kept} layers)", pruned)):
        out = args.workdir / f"onnx-{model.name}"
        seconds, rss = measure([ulsexport, "--quiet", "onnx", "--model", str(model), "--out", str(out)])
        onnx_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
        fusions = json.loads((out / "ulsexport.json").read_text())["optimizations"]
        rows[name] = {"seconds": seconds, "peak_rss_mib": rss, "onnx_bytes": onnx_bytes, "fusions_kept": fusions["kept"]}
    lines = [
        "# ONNX export cost on this machine",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Checkpoint: random Llama, {layers} layers, "
        f"hidden {shape['hidden_size']}, fp32, {size / 2**30:.2f} GiB. `ulsexport onnx` (fp32, cpu: export, onnxruntime fusions, parity check of "
        "the fused graph). Command: `python benchmarks/export_cost.py`.",
        "",
        "| model | seconds | peak RSS (MiB) | model.onnx* (GiB) | fusions kept |",
        "|---|---|---|---|---|",
        *[f"| {n} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} | {r['onnx_bytes'] / 2**30:.2f} | {r['fusions_kept']} |"
          for n, r in rows.items()],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"checkpoint_bytes": size, "runs": rows}, indent=2) + "\n")
    print("\n".join(lines))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
