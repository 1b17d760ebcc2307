"""Decode speed of the torch builder's attention fusions and cache layouts (`ulsexport onnx --attention mha`,
`--attention gqa --kv-cache concat`, `--attention gqa --kv-cache shared`) and of onnxruntime-genai's
builder, on one pruned checkpoint, side by side in one process.

A Llama-shaped model with random fp16 weights is made from a config on the device (nothing downloaded),
pruned with the uls plan, exported with each fusion and built with genai's builder (when installed), and
timed with the validator's `measure_speed` (ours in our onnxruntime loop, genai's in its own). On CUDA,
each artifact's decode step is also seen from the GPU (`ulsexport.testing.decode_kernel_time`: kernel
time, launches).

    python benchmarks/experiments/attention-fusion/attention_fusion_speed.py --shape 7b --results $OUT   # cuda
    python benchmarks/experiments/attention-fusion/attention_fusion_speed.py --shape tiny --device cpu \
        --dtype fp32 --results /tmp/a
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ulsexport.testing import add_decode_arguments, add_shape_arguments, decode_kernel_time, shape_from_args

# variant -> export_onnx options
FUSIONS = {"mha": dict(attention="mha"), "gqa-concat": dict(attention="gqa", kv_cache="concat"),
           "gqa-shared": dict(attention="gqa", kv_cache="shared")}


def build_checkpoints(args, shape: dict) -> Path:
    """The random full checkpoint (with a tokenizer, which genai's builder needs) and its uls prune."""
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.testing import make_random_llama

    full = make_random_llama(args.workdir / "full", shape, "fp16", args.device)
    pruned = args.workdir / "pruned"
    prune_checkpoint(full, pruned, plan_for_model(full, args.speedup), quiet=True, force=True)
    return pruned


def build_artifact(variant: str, pruned: Path, args) -> tuple[Path, dict]:
    """(folder, what to record) of one artifact: our export with fusion `variant`, or genai's build."""
    from ulsexport.export import get_builder

    out = args.workdir / variant
    start = time.perf_counter()
    if variant == "genai":
        get_builder("genai").build(pruned, out, args.dtype, args.device, force=True, quiet=True)
        return out, {"build_seconds": time.perf_counter() - start}
    export = get_builder("torch").build(pruned, out, args.dtype, args.device, force=True, quiet=True,
                                        **FUSIONS[variant])
    return out, {"build_seconds": time.perf_counter() - start, "optimizations": export.manifest["optimizations"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/attention_fusion"))
    add_shape_arguments(ap, "1b")
    add_decode_arguments(ap)
    ap.add_argument("--speedup", type=float, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-genai", action="store_true", help="leave out onnxruntime-genai's builder")
    args = ap.parse_args()

    import torch

    from ulsexport.runtime import open_runtime
    from ulsexport.validate import SpeedSettings, measure_speed

    args.results.mkdir(parents=True, exist_ok=True)
    shape = shape_from_args(args)
    pruned = build_checkpoints(args, shape)
    settings = SpeedSettings((1, 8), args.prompt_len, args.new_tokens, args.runs, 1)
    cuda = args.device == "cuda"
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape, "speedup": args.speedup,
               "dtype": args.dtype, "variants": {}}
    variants = FUSIONS if args.no_genai else (*FUSIONS, "genai")
    for variant in variants:
        folder, record = build_artifact(variant, pruned, args)
        runtime = open_runtime(folder, "genai" if variant == "genai" else "ort", args.dtype, args.device)
        record["speed"] = measure_speed(runtime, settings, shape["vocab_size"])
        if cuda:
            try:  # CUPTI may be missing: the speed figures stand without it
                record["kernels"] = [decode_kernel_time(runtime, b, args.prompt_len, 16, shape["vocab_size"],
                                                        folder=folder) for b in (1, 8)]
            except Exception as exc:
                record["kernels_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del runtime
        if cuda and variant.startswith("gqa"):  # the same graph in onnxruntime-genai's loop, and onnxruntime's profile
            record.update(_genai_loop_and_profile(folder, args, settings, shape["vocab_size"]))
        results["variants"][variant] = record
        (args.results / "attention_fusion_speed.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, args)
    (args.results / "attention_fusion_speed.md").write_text(text)
    print(text)


def _genai_loop_and_profile(folder: Path, args, settings, vocab: int) -> dict:
    """Decode speed of our graph in genai's C++ loop (where our Python loop's share shows), and
    onnxruntime's per-op profile of a decode step (which ops run on the CPU, which absorb waits)."""
    from ulsexport.runtime import open_runtime
    from ulsexport.testing import profile_decode
    from ulsexport.validate import measure_speed

    record = {}
    try:
        runtime = open_runtime(folder, "genai", args.dtype, args.device)
        record["speed_in_genai_loop"] = measure_speed(runtime, settings, vocab)
        del runtime
    except Exception as exc:
        record["genai_loop_error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["profile"] = {}
    for batch in (1, 8):
        totals, steps = profile_decode(folder, args.device, batch, args.prompt_len, 8, vocab)
        record["profile"][str(batch)] = {op: {"ms_per_step": t["us"] / steps / 1000, "calls_per_step": t["calls"] / steps}
                                         for op, t in totals.items()}
    return record


def markdown(results: dict, args) -> str:
    shape, variants = results["shape"], results["variants"]
    lines = [f"# Attention fusions of the torch builder, and genai's builder: {results['device']}, {args.dtype}", "",
             f"Llama-shaped {shape['num_hidden_layers']} x {shape['hidden_size']} (GQA {shape['num_attention_heads']}/"
             f"{shape['num_key_value_heads']}), pruned with uls at {args.speedup:g}x, random weights; prompt "
             f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs} after 1 warm-up, one process. "
             f"Command: `python benchmarks/experiments/attention-fusion/attention_fusion_speed.py --shape {args.shape}"
             + (f" --layers {args.layers}" if args.layers else "") + "`.", "",
             "| artifact | runtime | batch 1 decode tok/s | batch 8 decode tok/s | build s |", "|---|---|---|---|---|"]
    tps = {v: {b: r["speed"][b]["decode_tokens_per_s"]["median"] for b in ("1", "8")} for v, r in variants.items()}
    for variant, record in variants.items():
        runtime = "genai" if variant == "genai" else "ort"
        lines.append(f"| {variant} | {runtime} | {tps[variant]['1']:.1f} | {tps[variant]['8']:.1f} | "
                     f"{record['build_seconds']:.0f} |")
    for a, b in (("gqa-concat", "mha"), ("gqa-shared", "gqa-concat"), ("mha", "genai"), ("gqa-concat", "genai"),
                 ("gqa-shared", "genai")):
        if a in tps and b in tps:
            lines.append(f"\n{a} / {b}: " + ", ".join(f"batch {n} {tps[a][n] / tps[b][n]:.2f}" for n in ("1", "8")))
    for variant, record in variants.items():
        if "speed_in_genai_loop" in record:
            loop = {b: record["speed_in_genai_loop"][b]["decode_tokens_per_s"]["median"] for b in ("1", "8")}
            lines.append(f"\n{variant} graph in onnxruntime-genai's loop: " + ", ".join(
                f"batch {b} {loop[b]:.1f} tok/s ({loop[b] / tps[variant][b]:.2f}x our loop)" for b in ("1", "8")))
        for batch, ops in record.get("profile", {}).items():
            top = sorted(ops.items(), key=lambda item: -item[1]["ms_per_step"])[:10]
            lines.append(f"\n{variant} profile, batch {batch} (onnxruntime, host-timed ms per step, calls): " + "; ".join(
                f"{op} {t['ms_per_step']:.2f} ({t['calls_per_step']:.0f})" for op, t in top))
    kept = {v: r["optimizations"].get("variant") for v, r in variants.items() if "optimizations" in r}  # may fall back
    lines += ["", f"Fused attention kept in each export: {kept}."]
    if any("kernels" in r for r in variants.values()):
        lines += ["", "Decode step seen from the GPU (CUPTI, 16 steps): wall ms, of which inside onnxruntime's run "
                  "(our loop only), GPU kernel ms, kernels per step", "",
                  "| artifact | batch | wall ms | session.run ms | kernel ms | kernels | top kernels (ms per step) |",
                  "|---|---|---|---|---|---|---|"]
        for variant, record in variants.items():
            for row in record.get("kernels", []):
                top = "; ".join(f"{k['name'][:40]} {k['ms_per_step']:.3f}" for k in row["top_kernels"][:4])
                run_ms = row["session_run_ms_per_step"]
                lines.append(f"| {variant} | {row['batch']} | {row['wall_ms_per_step']:.2f} | "
                             f"{'-' if run_ms is None else f'{run_ms:.2f}'} | "
                             f"{row['kernel_ms_per_step']:.2f} | {row['kernels_per_step']:.0f} | {top} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
