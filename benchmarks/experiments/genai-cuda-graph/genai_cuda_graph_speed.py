"""onnxruntime-genai's loop with and without CUDA graph capture (`enable_cuda_graph`), on the genai
builder's graphs at every depth and on our torch builder's shared-cache graphs (these also in our own
onnxruntime loop, mode "ort"), side by side in one process.

Decode speed per artifact and mode, the measured speedups of the pruned graphs over the full one
in each mode, and whether capture changes the greedy tokens. The 7B-shaped random checkpoint and
its uls prunes are made as `gpu_benchmark.py` makes them (stage build: `ulsexport.testing.make_pruned_set`).

    python benchmarks/experiments/genai-cuda-graph/genai_cuda_graph_speed.py --results $OUT --torch-depths uls3
    python benchmarks/experiments/genai-cuda-graph/genai_cuda_graph_speed.py --tiny --device cpu --dtype fp32 \
        --results /tmp/g
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ulsexport.testing import SHAPES, add_decode_arguments, make_pruned_set

MODES = {"eager": False, "cuda-graph": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/root/cuda_graph"))
    ap.add_argument("--depths", default="full,uls2,uls3", help="checkpoints built with genai's builder")
    ap.add_argument("--torch-depths", default="uls3", help="checkpoints also exported by our torch builder")
    add_decode_arguments(ap)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on CPU")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import numpy as np

    from ulsexport.export import get_builder
    from ulsexport.runtime.genai import GenaiRuntime
    from ulsexport.runtime.ort import OnnxDecoder
    from ulsexport.validate import SpeedSettings, measure_speed

    args.results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES["tiny" if args.tiny else "7b"]
    make_pruned_set(args.workdir, shape, args.device, (2, 3))
    vocab = shape["vocab_size"]
    artifacts = {}
    for depth in args.depths.split(","):
        artifacts[f"{depth}-genai"] = get_builder("genai").build(
            args.workdir / depth, args.workdir / f"{depth}-genai", args.dtype, args.device, force=True,
            quiet=True).out_dir
    for depth in filter(None, args.torch_depths.split(",")):
        artifacts[f"{depth}-torch"] = get_builder("torch").build(
            args.workdir / depth, args.workdir / f"{depth}-torch", args.dtype, args.device, force=True,
            quiet=True).out_dir
    settings = SpeedSettings((1, 8), args.prompt_len, args.new_tokens, args.runs, 1)
    prompt = np.random.default_rng(0).integers(3, vocab, (8, args.prompt_len), dtype=np.int64)
    results = {"device": _device(args.device), "runs": args.runs, "speed": {}, "tokens_equal": {}, "errors": {}}
    modes = MODES if args.device == "cuda" else {"eager": False}
    for name, folder in artifacts.items():
        tokens = {}
        for mode, cuda_graph in ({"ort": None, **modes} if name.endswith("-torch") else modes).items():
            key = f"{name}.{mode}"
            try:
                runtime = OnnxDecoder(folder, args.device) if mode == "ort" else \
                    GenaiRuntime(folder, args.dtype, args.device, cuda_graph=cuda_graph)
                start = time.perf_counter()
                results["speed"][key] = measure_speed(runtime, settings, vocab)
                results["speed"][key]["seconds"] = time.perf_counter() - start
                tokens[mode] = runtime.greedy(prompt, np.ones_like(prompt), 32).tokens
                del runtime
            except Exception as exc:  # record and go on: the other artifacts and modes still run
                results["errors"][key] = f"{type(exc).__name__}: {exc}"[:400]
        if "cuda-graph" in tokens and "eager" in tokens:
            results["tokens_equal"][name] = bool((tokens["eager"] == tokens["cuda-graph"]).all())
        (args.results / "genai_cuda_graph_speed.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, args)
    (args.results / "genai_cuda_graph_speed.md").write_text(text)
    print(text)


def _device(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def markdown(results: dict, args) -> str:
    speed = {key: {b: r[b]["decode_tokens_per_s"]["median"] for b in ("1", "8")} for key, r in results["speed"].items()}
    lines = [f"# onnxruntime-genai's loop with and without CUDA graphs: {results['device']}, {args.dtype}", "",
             f"Decode tokens/s, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.runs} runs "
             f"after 1 warm-up. Command: `python benchmarks/experiments/genai-cuda-graph/genai_cuda_graph_speed.py "
             f"--torch-depths "
             f"{args.torch_depths}`.", "",
             "| artifact | mode | batch 1 | batch 8 | speedup over full-genai, same mode (b1 / b8) | "
             "over the genai build of its depth, eager (b1 / b8) |", "|---|---|---|---|---|---|"]
    for key, tps in speed.items():
        name, mode = key.rsplit(".", 1)
        full = speed.get(f"full-genai.{mode}")
        peer = speed.get(f"{name.rsplit('-', 1)[0]}-genai.eager")
        ratio = " / ".join(f"{tps[b] / full[b]:.2f}x" for b in ("1", "8")) if full else "-"
        over = " / ".join(f"{tps[b] / peer[b]:.2f}" for b in ("1", "8")) if peer else "-"
        lines.append(f"| {name} | {mode} | {tps['1']:.1f} | {tps['8']:.1f} | {ratio} | {over} |")
    lines += ["", f"Greedy tokens (batch 8, 32 steps) equal with and without capture: {results['tokens_equal']}"]
    if results["errors"]:
        lines += ["", f"Errors: {results['errors']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
