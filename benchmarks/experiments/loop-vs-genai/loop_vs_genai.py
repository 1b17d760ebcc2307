"""Our onnxruntime loop against onnxruntime-genai's, interleaved: settles a speed ratio that
back-to-back medians leave to run-to-run noise.

Each round times every artifact once per batch size (decode tokens/s of one greedy run, prompt 128,
128 new tokens, after one warm-up run per runtime), artifacts in turn; the ratio is taken per round
and its median reported. Artifacts are "name=folder:runtime" with runtime ort or genai.

    python benchmarks/experiments/loop-vs-genai/loop_vs_genai.py --rounds 7 --results $OUT \\
        uls3-ours=/root/cg/uls3-torch:ort uls3-genai=/root/cg/uls3-genai:genai
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ulsexport.testing import add_decode_arguments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="name=folder:runtime")
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    add_decode_arguments(ap)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()

    import numpy as np

    from ulsexport.runtime import open_runtime

    runtimes = {}
    for spec in args.artifacts:
        name, rest = spec.split("=", 1)
        folder, runtime = rest.rsplit(":", 1)
        runtimes[name] = open_runtime(folder, runtime, args.dtype, args.device)
    prompts = {b: np.random.default_rng(b).integers(3, args.vocab, (b, args.prompt_len), dtype=np.int64) for b in (1, 8)}
    for runtime in runtimes.values():  # warm-up
        for ids in prompts.values():
            runtime.greedy(ids, np.ones_like(ids), args.new_tokens)
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for name, runtime in runtimes.items():
            for batch, ids in prompts.items():
                run = runtime.greedy(ids, np.ones_like(ids), args.new_tokens)
                row[f"{name}.b{batch}"] = batch * (args.new_tokens - 1) / run.decode_seconds
        rounds.append(row)
    names = list(runtimes)
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratios = {f"{a} / {names[-1]}.b{b}": statistics.median(r[f"{a}.b{b}"] / r[f"{names[-1]}.b{b}"] for r in rounds)
              for a in names[:-1] for b in (1, 8)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "loop_vs_genai.json").write_text(json.dumps(
        {"artifacts": args.artifacts, "rounds": rounds, "median_tokens_per_s": summary, "median_ratio": ratios}, indent=2))
    lines = [f"Interleaved, {args.rounds} rounds, decode tok/s median: " +
             ", ".join(f"{k} {v:.1f}" for k, v in summary.items()),
             "Per-round ratio, median: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())]
    (args.results / "loop_vs_genai.md").write_text("\n\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
