"""What does keeping the padding mask cost? Our GroupQueryAttention graph with and without its
attention_bias input, on unpadded batches, beside onnxruntime-genai's builder.

`ulsexport onnx --attention gqa` feeds the padding mask to every GroupQueryAttention node as
attention_bias, which keeps left-padded batches exact. genai's graphs take no mask. This script
exports one pruned checkpoint, writes a copy of the graph whose GroupQueryAttention nodes have no
attention_bias (right only for batches without padding: a diagnostic, not an artifact to ship), and
times both in our onnxruntime loop and genai's build in its own, with CUPTI kernel times.

    python benchmarks/gqa_bias_cost.py --shape 7b --layers 8 --results $OUT
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from attention_fusion_speed import SHAPES, add_checkpoint_arguments, build_artifact, build_checkpoints  # noqa: E402
from decode_kernel_time import decode_kernel_time  # noqa: E402

BIAS_INPUT = 10  # GroupQueryAttention's attention_bias


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

    from ulsexport.runtimes import open_runtime

    ids = np.random.default_rng(0).integers(3, vocab, (8, args.prompt_len), dtype=np.int64)
    tokens = [open_runtime(f, "ort", args.dtype, args.device).greedy(ids, np.ones_like(ids), steps).tokens
              for f in (folder_a, folder_b)]
    return bool((tokens[0] == tokens[1]).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(ap, workdir="/tmp/gqa_bias", shape="7b", runs=5)
    args = ap.parse_args()

    from ulsexport.runtimes import open_runtime
    from ulsexport.validate import SpeedSettings, measure_speed

    args.results.mkdir(parents=True, exist_ok=True)
    shape = dict(SHAPES[args.shape])
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    pruned = build_checkpoints(args, shape)
    gqa, _ = build_artifact("gqa-concat", pruned, args)  # the graph with an attention_bias
    genai, _ = build_artifact("genai", pruned, args)
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
                record["kernels"] = [decode_kernel_time(runtime, b, args.prompt_len, 16, shape["vocab_size"])
                                     for b in (1, 8)]
            results["artifacts"][f"{rnd}.{name}"] = record
            del runtime
            (args.results / "gqa_bias_cost.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Cost of the padding mask in our GroupQueryAttention graph ({args.device}, {args.dtype})", "",
             f"Llama-shaped {shape['num_hidden_layers']} x {shape['hidden_size']}, uls {args.speedup:g}x, unpadded "
             f"batches, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs}. "
             "`python benchmarks/gqa_bias_cost.py`. Greedy tokens of the graph without the bias equal the "
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
