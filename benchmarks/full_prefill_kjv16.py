"""What the ULS authors' scheme (prompt through every layer, generated tokens through the kept ones) buys
and costs on kjv16, against plain pruning: teacher-forced continuation perplexity on kjv-valid.txt
(128-token prompts, 128-token continuations), unhealed and healed, and the prefill time it adds (our
onnxruntime loop over one multi-depth export, CPU, batch 1, 128-token prompt).

    python benchmarks/full_prefill_kjv16.py --healed PATH --results benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KJV16 = ROOT / "tests" / "fixtures" / "models" / "kjv16"
TEXT = ROOT / "tests" / "fixtures" / "data" / "kjv-valid.txt"


def main():
    from ulsexport.artifact import read_manifest
    from ulsexport.export.multi_depth import export_multi_depth
    from ulsexport.models import load_causal_lm
    from ulsexport.tokenizer import load_tokenizer
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.quality import read_text, token_windows
    from ulsexport.runtime import open_runtime
    from ulsexport.validate.prefill_scheme import continuation_perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--healed", type=Path, action="append", default=[],
                    help="healed pruned checkpoints of kjv16 (their ulsexport.json names the kept layers)")
    ap.add_argument("--windows", type=int, default=64, help="256-token windows of kjv-valid.txt scored")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    windows = token_windows(load_tokenizer(KJV16), read_text(TEXT), 2 * args.prompt_len)[:args.windows]
    full = load_causal_lm(KJV16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        candidates = [("uls 2x, unhealed", prune_checkpoint(KJV16, Path(tmp) / "uls2", plan_for_model(KJV16, 2),
                                                            quiet=True).out_dir)]
        candidates += [(f"healed ({p.name})", p) for p in args.healed]
        for label, folder in candidates:
            kept = read_manifest(folder)["kept"]
            result = continuation_perplexity(full, load_causal_lm(folder), kept, windows, args.prompt_len)
            rows.append({"model": label, "kept": kept, **result})
            print(rows[-1], flush=True)
        rows.append({"model": "full kjv16", "kept": list(range(16)),
                     **continuation_perplexity(full, full, list(range(16)), windows, args.prompt_len)})
        multi = export_multi_depth(KJV16, Path(tmp) / "multi", [1, 2], quiet=True).out_dir
        runtime = open_runtime(multi, "ort")
        ids = np.random.default_rng(0).integers(3, 1000, (1, args.prompt_len), dtype=np.int64)
        mask = np.ones_like(ids)
        times = {"full": [], "2x": []}
        for _ in range(8):  # interleaved, first round a warm-up
            for depth in times:
                times[depth].append(runtime.greedy(ids, mask, 1, depth=depth).prefill_seconds)
        prefill = {depth: 1000 * statistics.median(t[1:]) for depth, t in times.items()}
    report = {"text": str(TEXT.relative_to(ROOT)), "windows": len(windows), "prompt_len": args.prompt_len,
              "perplexity": rows, "prefill_ms": prefill}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "full-prefill-kjv16.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Full-depth prefill, pruned decode, on kjv16", "",
             f"Teacher-forced continuation perplexity on {report['text']}: {len(windows)} windows of "
             f"{args.prompt_len} prompt + {args.prompt_len} continuation tokens; `python benchmarks/full_prefill_kjv16.py`.", "",
             "| model | layers kept | plain pruning | full-depth prefill |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {len(row['kept'])} | {row['pruned']:.2f} | {row['full_prefill']:.2f} |")
    lines += ["", f"Prefill of a {args.prompt_len}-token prompt, batch 1, our onnxruntime loop on the CPU (median of 7, "
              f"interleaved): full depth {prefill['full']:.1f} ms, 2x {prefill['2x']:.1f} ms: the scheme adds "
              f"{prefill['full'] - prefill['2x']:.1f} ms ({prefill['full'] / prefill['2x']:.2f}x the pruned prefill).", ""]
    (args.results / "full-prefill-kjv16.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
