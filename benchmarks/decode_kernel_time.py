"""GPU kernel time of one decode step, for any runtime (torch, ort, genai), seen by CUPTI.

onnxruntime's own profiler times kernels from the host, so on CUDA a node that waits for the GPU
absorbs the work queued before it. CUPTI (through torch.profiler) records every kernel the process
launches, whichever library launched it, with its time on the GPU. Two profiled runs, one with only
the prefill and one with the prefill and `steps` decode steps, differ by exactly the decode steps:

    kernel ms per step   GPU busy time of one decode step (kernels and copies)
    wall ms per step     the same step timed from the host, in a separate unprofiled run
    session.run ms       of that, the time inside onnxruntime's run (our onnxruntime loop only)
    kernels per step     launches per step: the graph's fused-ness, seen from the GPU

A wall time well above the kernel time means the host, not the GPU, sets the pace (launch overhead,
synchronizations); close to it, the kernels themselves are what to make faster.

    python benchmarks/decode_kernel_time.py /root/bench/uls2-onnx:ort /root/bench/uls2-genai:genai \
        --batch 1 8 --json benchmarks/results/gpu/kernels.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def kernel_totals(run) -> dict:
    """name -> [microseconds, launches] of every GPU activity (kernel, copy, memset) during run()."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # without CUDA (a check of this script on CPU) nothing is recorded on a device: totals stay empty
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        run()
    totals = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            totals[event.name][0] += event.time_range.elapsed_us()
            totals[event.name][1] += 1
    return totals


class TimedSession:
    """An onnxruntime session whose run_with_iobinding calls are timed: the rest of a step is our loop."""

    def __init__(self, session):
        self.session, self.seconds = session, []  # one entry per run

    def run_with_iobinding(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.session.run_with_iobinding(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return result

    def __getattr__(self, name):
        return getattr(self.session, name)


def decode_kernel_time(runtime, batch: int, prompt_len: int, steps: int, vocab: int, top: int = 12) -> dict:
    """Per decode step: kernel ms, wall ms, launches, and the `top` kernels by time."""
    ids = np.random.default_rng(0).integers(3, vocab, (batch, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    runtime.greedy(ids, mask, steps + 1)  # warm-up: kernel selection, allocations
    decoder = getattr(runtime, "decoder", None)  # our onnxruntime loop: time the session's own share
    session = TimedSession(decoder.session) if decoder is not None and decoder.io_binding else None
    if session:
        decoder.session = session
    wall = runtime.greedy(ids, mask, steps + 1).decode_seconds / steps
    run_ms = 1000 * sum(session.seconds[1:]) / steps if session else None  # the runs after the prefill
    if session:
        decoder.session = session.session
    prefill = kernel_totals(lambda: runtime.greedy(ids, mask, 1))
    both = kernel_totals(lambda: runtime.greedy(ids, mask, steps + 1))
    per_step = {name: ((us - prefill.get(name, (0, 0))[0]) / steps, (n - prefill.get(name, (0, 0))[1]) / steps)
                for name, (us, n) in both.items()}
    kernel_us = sum(us for us, _ in per_step.values())
    ranked = sorted(per_step.items(), key=lambda item: -item[1][0])
    return {"batch": batch, "steps": steps, "wall_ms_per_step": 1000 * wall, "kernel_ms_per_step": kernel_us / 1000,
            "session_run_ms_per_step": run_ms,
            "kernels_per_step": sum(n for _, n in per_step.values()),
            "top_kernels": [{"name": name[:120], "ms_per_step": us / 1000, "per_step": n} for name, (us, n) in ranked[:top]]}


def markdown(results: dict) -> str:
    lines = [f"# Decode-step GPU kernel time (CUPTI): {results.get('device', '?')}", "",
             "| artifact | runtime | batch | wall ms/step | session.run ms/step | kernel ms/step | kernel / wall | kernels/step |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in results["artifacts"].items():
        for row in rows:
            lines.append(f"| {key.rsplit(':', 1)[0]} | {key.rsplit(':', 1)[1]} | {row['batch']} | "
                         f"{row['wall_ms_per_step']:.2f} | {_ms(row['session_run_ms_per_step'])} | "
                         f"{row['kernel_ms_per_step']:.2f} | "
                         f"{row['kernel_ms_per_step'] / row['wall_ms_per_step']:.2f} | {row['kernels_per_step']:.0f} |")
    for key, rows in results["artifacts"].items():
        for row in rows:
            lines += ["", f"Top kernels, {key}, batch {row['batch']}: " + "; ".join(
                f"{k['name'][:60]} {k['ms_per_step']:.3f} ms ({k['per_step']:.0f})" for k in row["top_kernels"][:8])]
    return "\n".join(lines) + "\n"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="FOLDER:RUNTIME, runtime one of torch, ort, genai")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--json", type=Path, required=True, help="results (a .md beside it)")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from ulsexport.runtimes import open_runtime

    results = {"device": torch.cuda.get_device_name(), "artifacts": {}}
    for spec in args.artifacts:
        folder, runtime_name = spec.rsplit(":", 1)
        vocab = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
        runtime = open_runtime(folder, runtime_name, args.dtype, "cuda")
        results["artifacts"][spec] = [decode_kernel_time(runtime, b, args.prompt_len, args.steps, vocab)
                                      for b in args.batch]
        del runtime
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
