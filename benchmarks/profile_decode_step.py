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
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def profiled_decoder(folder: Path, device: str, profile_dir: Path):
    """An OnnxDecoder whose session writes onnxruntime's profile into profile_dir."""
    import onnxruntime as ort

    from ulsexport.ort_runner import PROVIDERS, OnnxDecoder

    decoder = OnnxDecoder(folder, device)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "decode")
    decoder.session = ort.InferenceSession(str(folder / decoder.onnx["file"]), sess_options=options,
                                           providers=PROVIDERS[device])
    return decoder


WARMUP_STEPS = 4  # decode steps before the profiled ones: a kernel's first call includes its setup


def run_steps(decoder, batch: int, prompt_len: int, steps: int, vocab: int) -> None:
    """The prefill, then `steps` greedy decode steps (each one session run)."""
    ids = np.random.default_rng(0).integers(3, vocab, (batch, prompt_len), dtype=np.int64)
    decoder.greedy(ids, np.ones_like(ids), steps + 1, keep_logits=False)


def op_times(profile: list[dict], skip_runs: int = 1, provider: str = "CUDAExecutionProvider") -> tuple[dict, int]:
    """Total microseconds per op type over the session runs after the first `skip_runs`; op types run by
    another provider than `provider` are counted apart, e.g. "Range (CPU)"."""
    runs = sorted((e for e in profile if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    totals = defaultdict(lambda: {"us": 0, "calls": 0})
    for event in profile:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(run["ts"] <= event["ts"] <= run["ts"] + run["dur"] for run in kept):
            continue
        op = event.get("args", {}).get("op_name", "?")
        placed = event.get("args", {}).get("provider", "")
        op = op if placed in ("", provider) else f"{op} ({placed.replace('ExecutionProvider', '')})"
        totals[op]["us"] += event["dur"]
        totals[op]["calls"] += 1
    return dict(totals), len(kept)


def profile_decode(folder: Path, device: str, batch: int, prompt_len: int, steps: int, vocab: int):
    """(op type -> {"us", "calls"} over the decode steps, decode steps profiled), op types by time, largest first."""
    from ulsexport.ort_runner import PROVIDERS

    with tempfile.TemporaryDirectory() as tmp:
        decoder = profiled_decoder(folder, device, Path(tmp))
        run_steps(decoder, batch, prompt_len, WARMUP_STEPS + steps, vocab)
        profile = json.loads(Path(decoder.session.end_profiling()).read_text())
    totals, runs = op_times(profile, skip_runs=1 + WARMUP_STEPS, provider=PROVIDERS[device][0])
    return dict(sorted(totals.items(), key=lambda item: -item[1]["us"])), runs


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
