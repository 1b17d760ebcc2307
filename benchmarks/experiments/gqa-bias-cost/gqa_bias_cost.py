"""What does keeping the padding mask cost? Our GroupQueryAttention graph with and without its
attention_bias input, on unpadded batches, beside onnxruntime-genai's builder.

`ulsexport onnx --attention gqa` feeds the padding mask to every GroupQueryAttention node as
attention_bias, which keeps left-padded batches exact. genai's graphs take no mask. This script
exports one pruned checkpoint, writes a copy of the graph whose GroupQueryAttention nodes have no
attention_bias (right only for batches without padding: a diagnostic, not an artifact to ship), and
times both in our onnxruntime loop and genai's build in its own, with CUPTI kernel times.

    python benchmarks/experiments/gqa-bias-cost/gqa_bias_cost.py --shape 7b --layers 8 --results $OUT
    python benchmarks/experiments/gqa-bias-cost/gqa_bias_cost.py --shape tiny --device cpu --dtype fp32 \
        --results /tmp/g     # a check of the script (needs onnxruntime-genai)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ulsexport.testing import add_decode_arguments, add_shape_arguments, decode_kernel_time, shape_from_args

BIAS_INPUT = 10  # GroupQueryAttention's attention_bias


def build_artifacts(args, shape: dict) -> tuple[Path, Path]:
    """A random Llama of `shape`, pruned with uls at --speedup; (our gqa graph with its attention_bias
    (`--attention gqa --kv-cache concat`), genai's build), both of the pruned checkpoint."""
    from ulsexport.export import get_builder
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.testing import make_random_llama

    full = make_random_llama(args.workdir / "full", shape, "fp16", args.device)
    pruned = prune_checkpoint(full, args.workdir / "pruned", plan_for_model(full, args.speedup), quiet=True,
                              force=True).out_dir
    gqa = get_builder("torch").build(pruned, args.workdir / "gqa-concat", args.dtype, args.device, force=True,
                                     quiet=True, attention="gqa", kv_cache="concat").out_dir
    genai = get_builder("genai").build(pruned, args.workdir / "genai", args.dtype, args.device, force=True,
                                       quiet=True).out_dir
    return gqa, genai


def without_attention_bias(folder: Path, out: Path) -> Path:
    """A copy of export `folder` whose GroupQueryAttention nodes take no attention_bias."""
    import onnx

    shutil.copytree(folder, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx"))
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > BIAS_INPUT:
            del node.input[BIAS_INPUT:]
    onnx.save(model, str(out / "model.onnx"))
    return out


def same_greedy_tokens(folder_a: Path, folder_b: Path, args, vocab: int, steps: int = 32) -> bool:
    """Both graphs give the same greedy tokens on an unpadded batch of 8."""
    import numpy as np

    from ulsexport.runtime import open_runtime

    ids = np.random.default_rng(0).integers(3, vocab, (8, args.prompt_len), dtype=np.int64)
    tokens = [open_runtime(f, "ort", args.dtype, args.device).greedy(ids, np.ones_like(ids), steps).tokens
              for f in (folder_a, folder_b)]
    return bool((tokens[0] == tokens[1]).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gqa_bias"))
    add_shape_arguments(ap, "7b")
    add_decode_arguments(ap)
    ap.add_argument("--speedup", type=float, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from ulsexport.runtime import open_runtime
    from ulsexport.validate import SpeedSettings, measure_speed

    args.results.mkdir(parents=True, exist_ok=True)
    shape = shape_from_args(args)
    gqa, genai = build_artifacts(args, shape)  # gqa: the graph with an attention_bias
    artifacts = {"gqa": (gqa, "ort"), "gqa-no-bias": (without_attention_bias(gqa, args.workdir / "gqa-no-bias"), "ort"),
                 "genai": (genai, "genai")}
    settings = SpeedSettings((1, 8), args.prompt_len, args.new_tokens, args.runs, 1)
    results = {"shape": shape, "speedup": args.speedup, "artifacts": {},
               "no_bias_tokens_equal": same_greedy_tokens(gqa, artifacts["gqa-no-bias"][0], args, shape["vocab_size"])}
    for rnd in (1, 2):  # twice, so that the spread between rounds shows
        for name, (folder, runtime_name) in artifacts.items():
            runtime = open_runtime(folder, runtime_name, args.dtype, args.device)
            record = {"speed": measure_speed(runtime, settings, shape["vocab_size"])}
            if args.device == "cuda" and rnd == 1:
                record["kernels"] = [decode_kernel_time(runtime, b, args.prompt_len, 16, shape["vocab_size"],
                                                        folder=folder) for b in (1, 8)]
            results["artifacts"][f"{rnd}.{name}"] = record
            del runtime
            (args.results / "gqa_bias_cost.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Cost of the padding mask in our GroupQueryAttention graph ({args.device}, {args.dtype})", "",
             f"Llama-shaped {shape['num_hidden_layers']} x {shape['hidden_size']}, uls {args.speedup:g}x, unpadded "
             f"batches, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs}. "
             "`python benchmarks/experiments/gqa-bias-cost/gqa_bias_cost.py`. Greedy tokens of the graph without the bias equal the "
             f"graph's own over 32 steps, unpadded batch of 8: {results['no_bias_tokens_equal']}.", "",
             "| round | artifact | batch 1 tok/s | batch 8 tok/s | wall / kernel ms, kernels (b1) | (b8) |",
             "|---|---|---|---|---|---|"]
    for key, record in results["artifacts"].items():
        tps = [record["speed"][b]["decode_tokens_per_s"]["median"] for b in ("1", "8")]
        kernels = [f"{k['wall_ms_per_step']:.2f} / {k['kernel_ms_per_step']:.2f}, {k['kernels_per_step']:.0f}"
                   for k in record.get("kernels", [])] or ["-", "-"]
        lines.append(f"| {key.split('.')[0]} | {key.split('.', 1)[1]} | {tps[0]:.1f} | {tps[1]:.1f} | "
                     f"{kernels[0]} | {kernels[1]} |")
    (args.results / "gqa_bias_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
