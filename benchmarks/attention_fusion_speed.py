"""Decode speed of the torch builder's two attention fusions (`ulsexport onnx --attention mha|gqa`) on one
pruned checkpoint, side by side in one process on onnxruntime (CUDA by default).

A Llama-shaped model with random fp16 weights is made from a config on the device (nothing downloaded),
pruned with the uls plan, exported twice and timed with the validator's `measure_speed`:

    python benchmarks/attention_fusion_speed.py --results $OUT                    # 1B-shaped, cuda
    python benchmarks/attention_fusion_speed.py --tiny --device cpu --dtype fp32 --results /tmp/a
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_benchmark import TINY  # noqa: E402

ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
VARIANTS = ("mha", "gqa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/attention_fusion"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--speedup", type=float, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, help="decoder layers of the model before pruning [default: the shape's]")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ulsexport.export_onnx import export_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.runtimes import open_runtime
    from ulsexport.validate import SpeedSettings, measure_speed

    args.results.mkdir(parents=True, exist_ok=True)
    shape = dict(TINY if args.tiny else ONE_B)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    full, pruned = args.workdir / "full", args.workdir / "pruned"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, tie_word_embeddings=False), dtype=torch.float16)
    model.save_pretrained(full)
    del model
    prune_checkpoint(full, pruned, plan_for_model(full, args.speedup), quiet=True, force=True)
    settings = SpeedSettings((1, 8), args.prompt_len, args.new_tokens, args.runs, 1)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": shape,
               "speedup": args.speedup, "dtype": args.dtype, "variants": {}}
    for variant in VARIANTS:
        start = time.perf_counter()
        export = export_onnx(pruned, args.workdir / variant, args.dtype, args.device, attention=variant,
                             force=True, quiet=True)
        runtime = open_runtime(export.out_dir, "ort", args.dtype, args.device)
        results["variants"][variant] = {"export_seconds": time.perf_counter() - start,
                                        "optimizations": export.manifest["optimizations"],
                                        "speed": measure_speed(runtime, settings, shape["vocab_size"])}
        del runtime
        (args.results / "attention_fusion_speed.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Attention fusions of the torch builder: {results['device']}, {args.dtype}", "",
             f"Llama-shaped {shape['num_hidden_layers']} x {shape['hidden_size']} (GQA {shape['num_attention_heads']}/"
             f"{shape['num_key_value_heads']}), pruned with uls at {args.speedup:g}x, random weights; prompt "
             f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs} after 1 warm-up. "
             "Command: `python benchmarks/attention_fusion_speed.py`.", "",
             "| batch | " + " | ".join(f"{v} decode tok/s" for v in VARIANTS) + " | gqa / mha |", "|---|---|---|---|"]
    for batch in ("1", "8"):
        tps = {v: results["variants"][v]["speed"][batch]["decode_tokens_per_s"]["median"] for v in VARIANTS}
        lines.append(f"| {batch} | " + " | ".join(f"{tps[v]:.1f}" for v in VARIANTS) + f" | {tps['gqa'] / tps['mha']:.2f} |")
    kept = {v: results["variants"][v]["optimizations"].get("variant") for v in VARIANTS}
    lines += ["", f"Fused attention kept in each export: {kept}."]
    (args.results / "attention_fusion_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
