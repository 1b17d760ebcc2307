"""Perplexity of a model before and after `ulsexport prune`, on held-out text (a figure, not a test).

    python benchmarks/pruned_perplexity.py --model tests/fixtures/models/stories260K \
        --text tests/fixtures/data/tinystories-valid-excerpt.txt --speedups 1.25,2
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ulsexport.models import load_causal_lm
from ulsexport.tokenizer import load_tokenizer
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.quality import perplexity, read_text, token_windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tests/fixtures/models/stories260K")
    ap.add_argument("--text", default="tests/fixtures/data/tinystories-valid-excerpt.txt")
    ap.add_argument("--speedups", default="1.25,2")
    ap.add_argument("--strategy", default="uls")
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    windows = token_windows(load_tokenizer(args.model), read_text(args.text), args.window)
    tokens = sum(len(w) for w in windows)
    print(f"{args.model} on {args.text} ({tokens} tokens, windows of {args.window})")
    print("| model | layers kept | perplexity |\n|---|---|---|")
    print(f"| full | all | {perplexity(load_causal_lm(args.model), windows):.3f} |")
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in args.speedups.split(",")):
            plan = plan_for_model(args.model, s, args.strategy)
            out = Path(tmp) / f"{s}"
            prune_checkpoint(args.model, out, plan, quiet=True)
            print(f"| {args.strategy} {s:g}x | {','.join(map(str, plan.kept))} | "
                  f"{perplexity(load_causal_lm(out), windows):.3f} |")


if __name__ == "__main__":
    main()
