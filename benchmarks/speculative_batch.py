"""Self-speculative decoding of a batch, row by row, against the full depth's batched greedy decode (issue 31).

onnxruntime's GroupQueryAttention takes several new tokens over a cache only at batch 1, so the runtime
verifies a batch's rows one at a time (`runtime.speculative`). This measures what that costs as the batch
grows: for each batch size B, B prompts decoded by the full depth as one batch (plain greedy) and by
speculative decoding (draft DRAFT, K tokens), interleaved over --rounds, tokens checked identical;
throughput = B x new tokens / seconds, median over the rounds.

    python benchmarks/speculative_batch.py --export /tmp/dak/x-mixture --text ../shared/data/kjv-valid.txt \\
        --draft 2x --k 2 --out benchmarks/results/speculative-batch-cpu
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ulsexport.testing import cpu_machine, write_results

sys.path.insert(0, str(Path(__file__).parent))
from speculative import text_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="a multi-depth export")
    ap.add_argument("--text", required=True, help="held-out text the prompts come from")
    ap.add_argument("--draft", default="2x")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="results NAME (NAME.json, NAME.md)")
    args = ap.parse_args()

    from ulsexport.runtime.ort import MultiDepthDecoder
    from ulsexport.runtime.speculative import speculative_greedy
    from ulsexport.tokenizer import load_tokenizer

    runtime = MultiDepthDecoder(args.export, "cpu", cuda_graph=False)
    batches = [int(b) for b in args.batches.split(",")]
    prompts, source = text_prompts(args.text, load_tokenizer(args.export), max(batches), 32, 1.0)
    rows = []
    for batch in batches:
        ids = np.array(prompts[:batch], np.int64)
        mask = np.ones_like(ids)
        runtime.greedy(ids, mask, 4, depth=runtime.default)                       # warm-up, untimed
        speculative_greedy(runtime, ids, mask, 4, args.draft, args.k)
        plain_s, spec_s, identical, accepted, drafted = [], [], True, 0, 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            plain = runtime.greedy(ids, mask, args.new_tokens, depth=runtime.default)
            plain_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            spec = speculative_greedy(runtime, ids, mask, args.new_tokens, args.draft, args.k)
            spec_s.append(time.perf_counter() - start)
            identical &= spec.tokens == [[int(t) for t in row] for row in plain.tokens]
            accepted, drafted = accepted + spec.accepted, drafted + spec.drafted
        tokens = batch * args.new_tokens
        row = {"batch": batch, "plain_tokens_per_s": tokens / statistics.median(plain_s),
               "speculative_tokens_per_s": tokens / statistics.median(spec_s),
               "acceptance_rate": accepted / drafted, "identical": identical}
        row["speculative_over_plain"] = row["speculative_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print(f"batch {batch}: plain {row['plain_tokens_per_s']:.0f} tok/s, speculative "
              f"{row['speculative_tokens_per_s']:.0f} tok/s ({row['speculative_over_plain']:.2f}x), acceptance "
              f"{row['acceptance_rate']:.3f}, identical {identical}", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = ["# Speculative decoding of a batch, row by row, against batched plain decoding", "",
             f"Export `{args.export}` (depths {', '.join(runtime.depths)}), draft {args.draft}, K = {args.k}, "
             f"{args.new_tokens} new tokens per row, prompts: {source}; median of {args.rounds} interleaved rounds. "
             f"Machine: {cpu_machine()}. Command: `{command}`.", "",
             "| batch | plain tok/s | speculative tok/s | speculative / plain | acceptance | identical |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plain_tokens_per_s']:.0f} | {r['speculative_tokens_per_s']:.0f} | "
              f"{r['speculative_over_plain']:.2f}x | {r['acceptance_rate']:.3f} | {'yes' if r['identical'] else 'NO'} |"
              for r in rows]
    write_results(Path(args.out).with_suffix(".json"), {"command": command, "rows": rows}, "\n".join(lines) + "\n")
    if not all(r["identical"] for r in rows):
        raise SystemExit("speculative tokens differ from the plain full-depth tokens")


if __name__ == "__main__":
    main()
