"""Where the time of a captured decode step goes: GPU busy, launch gaps inside the graph, and the host.

A step of our CUDA-graph decode (`--runtime ort` on CUDA) is timed from the host (wall) and seen from the
GPU (CUPTI, through torch.profiler: kernels replayed from a graph are recorded one by one). Over the
decode steps only (the prompt runs before the profiler starts), the GPU's time line splits into busy time
(the union of its activities), short gaps (at most --short-gap-us: the latency between kernels the graph
queues back to back) and long gaps (the GPU idle while the host copies the ids in and out, calls
onnxruntime and replays the next graph). Per step: wall = busy + short gaps + long gaps, up to the
profiler's own cost.

    python benchmarks/captured_step_time.py --workdir /root/w --json $OUT/captured/captured-step-time.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ulsexport.testing import add_shape_arguments, gpu_intervals, gpu_time_split, write_results


def split_steps(runtime, batch: int, prompt_len: int, steps: int, vocab: int, short_gap_us: float) -> dict:
    ids = np.random.default_rng(batch).integers(3, vocab, (batch, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    runtime.greedy(ids, mask, steps + 1)  # warm-up: the capture of this (batch, capacity)
    state, logits = runtime.prefill(ids, mask, steps + 1)
    chosen, wall = [runtime.next_tokens(logits)], []

    def decode():
        for _ in range(steps):
            start = time.perf_counter()
            chosen.append(runtime.next_tokens(runtime.step(state, chosen[-1])))
            wall.append(time.perf_counter() - start)

    split = gpu_time_split(gpu_intervals(decode), short_gap_us)
    per_step = {k: v / steps for k, v in split.items()}
    return {"batch": batch, "steps": steps, "wall_us": 1e6 * float(np.median(wall)), **per_step}


def main() -> None:
    from cuda_graph_decode import build_artifacts  # the same 7B-shaped artifacts, built if missing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, "7b")
    parser.add_argument("--workdir", default="/root/w")
    parser.add_argument("--genai-depths", default="full,uls3")
    parser.add_argument("--torch-depths", default="")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--short-gap-us", type=float, default=8.0)
    parser.add_argument("--json", type=Path, required=True, help="results (a .md beside it)")
    args = parser.parse_args()

    import torch

    from ulsexport.runtime.ort import OnnxDecoder

    results = {"device": torch.cuda.get_device_name(), "settings": {k: str(v) for k, v in vars(args).items()},
               "artifacts": {}}
    for name, folder in build_artifacts(args).items():
        runtime = OnnxDecoder(folder, "cuda", cuda_graph=True)
        vocab = runtime.onnx["io_shapes"]["logits"][-1]
        results["artifacts"][name] = [split_steps(runtime, b, args.prompt_len, args.steps, vocab, args.short_gap_us)
                                      for b in args.batch]
        del runtime
        print(json.dumps(results["artifacts"][name]), flush=True)
    lines = [f"# A captured decode step, from the host and from the GPU ({results['device']})", "",
             f"Per decode step, median wall and CUPTI means over {args.steps} steps; short gaps are at most "
             f"{args.short_gap_us:g} us. `python benchmarks/captured_step_time.py`.", "",
             "| graph | batch | wall us | GPU busy us | short gaps us (count) | long gaps us (count) |",
             "|---|---|---|---|---|---|"]
    for name, rows in results["artifacts"].items():
        for r in rows:
            lines.append(f"| {name} | {r['batch']} | {r['wall_us']:.0f} | {r['busy_us']:.0f} | "
                         f"{r['short_gap_us']:.0f} ({r['short_gaps']:.0f}) | "
                         f"{r['long_gap_us']:.0f} ({r['long_gaps']:.0f}) |")
    write_results(args.json, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
