"""Do onnxruntime 1.31's GEMM switches change the decode kernels, and does a queued run return early?

onnxruntime-gpu 1.31 has a GEMM auto-tuner (`ep.cuda.enable_gemm_auto_tune` or ORT_CUDA_GEMM_AUTO_TUNE: cuBLAS
against a small-N GEMV and tinygemm2, per shape, in the uncaptured runs) and a switch that forces its small-N
GEMV (ORT_ENABLE_SMALL_N_GEMV). For one graph this makes a captured decoder under each setting (the
environment held from the session's making through its first captures, in case a switch is read late),
lists each one's top kernels over a few decode steps at batch 1 (CUPTI), times decode ms per step in
interleaved rounds at batch 1 and 8, and checks its greedy tokens against the default's. Then it times
how long onnxruntime's run takes to return for a replayed step with `disable_synchronize_execution_providers`
0 (the run waits for the GPU) and 1 (it returns at the launch). Its kernel lists include the prefill's
kernels (divided by the 9 decode steps); the decode step's own are those launched a whole number of
times per step.

    python benchmarks/experiments/gemm-kernels/gemm_kernel_probe.py /root/w/uls2-genai --json OUT/probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "default": {},
    "autotune-env": {"ORT_CUDA_GEMM_AUTO_TUNE": "1"},
    "autotune-graph-timing": {"ORT_CUDA_GEMM_AUTO_TUNE": "1", "ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1"},
    "small-n-gemv": {"ORT_ENABLE_SMALL_N_GEMV": "1"},
}


def prompt(batch: int, length: int, vocab: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


def run_return_times(decoder, vocab: int, prompt_len: int, steps: int = 20) -> dict:
    """Microseconds until run_with_iobinding returns for a replayed batch-1 step, waiting or not."""
    ids, mask = prompt(1, prompt_len, vocab)
    state, logits = decoder.prefill(ids, mask, 4 * steps + 1)  # the steps below: 1 + 2 per timed one
    decoder.step(state, decoder.next_tokens(logits)).tokens()
    out = {}
    for wait in (True, False):
        times = []
        for _ in range(steps):
            buffers, phase = state.buffers, state.phase
            options = decoder.run_options(buffers.graph_ids[phase], wait)
            start = time.perf_counter()
            decoder.session.run_with_iobinding(buffers.bindings[phase], options)
            times.append(1e6 * (time.perf_counter() - start))
            state.phase = (phase + 1) % len(buffers.ids)
            state.steps += 1
            decoder.session.run_with_iobinding(buffers.bindings[state.phase], decoder.run_options(
                buffers.graph_ids[state.phase], True))  # waits: the next timed call starts on an idle GPU
            state.phase = (state.phase + 1) % len(buffers.ids)
            state.steps += 1
        out["wait" if wait else "no_wait"] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from ulsexport.runtime.ort import OnnxDecoder
    from ulsexport.testing import kernel_totals, write_results

    decoders = {}
    vocab = None
    for name, env in SETTINGS.items():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            decoder = OnnxDecoder(args.graph, "cuda", cuda_graph=True)
            vocab = decoder.onnx["io_shapes"]["logits"][-1]
            for batch in (1, 8):
                decoder.greedy(*prompt(batch, args.prompt_len, vocab), 12)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        decoders[name] = decoder
    results = {"device": torch.cuda.get_device_name(), "graph": str(args.graph), "settings": SETTINGS,
               "kernels_b1": {}, "ms_per_step": {}, "tokens_equal": {}}
    ids, mask = prompt(1, args.prompt_len, vocab, seed=1)
    for name, decoder in decoders.items():
        totals = kernel_totals(lambda: decoder.greedy(ids, mask, 10))
        top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:12]
        results["kernels_b1"][name] = [(k[:80], round(us / n, 2), n) for k, (us, n) in top]
    reference = {b: decoders["default"].greedy(*prompt(b, args.prompt_len, vocab, seed=2), args.new_tokens).tokens
                 for b in (1, 8)}
    for name, decoder in decoders.items():
        results["tokens_equal"][name] = all(
            (decoder.greedy(*prompt(b, args.prompt_len, vocab, seed=2), args.new_tokens).tokens == t).all()
            for b, t in reference.items())
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for batch in (1, 8):
            ids, mask = prompt(batch, args.prompt_len, vocab, seed=3)
            for name, decoder in decoders.items():
                run = decoder.greedy(ids, mask, args.new_tokens)
                times.setdefault(f"{name}|b{batch}", []).append(1000 * run.decode_seconds / (args.new_tokens - 1))
    results["ms_per_step"] = {k: statistics.median(v) for k, v in times.items()}
    results["run_return_us"] = run_return_times(decoders["default"], vocab, args.prompt_len)
    lines = [f"# GEMM switches of onnxruntime and early return of a queued run ({results['device']})", "",
             f"Graph `{args.graph}`; `python benchmarks/experiments/gemm-kernels/gemm_kernel_probe.py GRAPH`.", "",
             "| setting | b1 ms/step | b8 ms/step | tokens equal to default |", "|---|---|---|---|"]
    for name in decoders:
        lines.append(f"| {name} | {results['ms_per_step'][f'{name}|b1']:.3f} | "
                     f"{results['ms_per_step'][f'{name}|b8']:.3f} | {results['tokens_equal'][name]} |")
    lines += ["", f"run_with_iobinding returns after (us, median of 20 replayed batch-1 steps): "
              f"{json.dumps({k: round(v, 1) for k, v in results['run_return_us'].items()})}", ""]
    for name, top in results["kernels_b1"].items():
        lines.append(f"- {name}: " + "; ".join(f"{k} {us} us x{n}" for k, us, n in top))
    write_results(args.json, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
