"""Where does one decode step of an ONNX export spend its time? onnxruntime's own profiler, by op type.

Runs a prompt through an export of `ulsexport onnx --builder torch` (its folder), then --steps decode
steps with
SessionOptions.enable_profiling on, and prints the op types by total time over the decode steps
only (the prefill run and the first few decode steps are left out), with their share and calls per step.
On CUDA, nodes that onnxruntime placed on another provider (CPU) are listed apart, e.g. "Range (CPU)".

    python benchmarks/profile_decode_step.py artifacts/llama-2x/onnx --device cuda --batch 1 \
        --prompt-len 128 --steps 8 --json benchmarks/results/profile.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ulsexport.testing import profile_decode  # the measurement itself (shared with the headline benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an ONNX export folder (model.onnx + ulsexport.json)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--top", type=int, default=15, help="op types printed")
    parser.add_argument("--json", type=Path, help="also write the per-op totals here")
    args = parser.parse_args()

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.folder).get_text_config().vocab_size
    totals, runs = profile_decode(args.folder, args.device, args.batch, args.prompt_len, args.steps, vocab)
    total_us = sum(t["us"] for t in totals.values()) or 1
    ranked = list(totals.items())
    print(f"{args.folder}: {runs} decode steps, batch {args.batch}, prompt {args.prompt_len}, {args.device}; "
          f"kernel time {total_us / runs / 1000:.3f} ms per step")
    print(f"{'op type':<32} {'ms/step':>9} {'share':>7} {'calls/step':>10}")
    for op, t in ranked[:args.top]:
        print(f"{op:<32} {t['us'] / runs / 1000:>9.3f} {100 * t['us'] / total_us:>6.1f}% {t['calls'] / runs:>10.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"folder": str(args.folder), "device": args.device, "batch": args.batch,
                                         "prompt_len": args.prompt_len, "steps": runs,
                                         "per_op_us": dict(ranked)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
