"""Joint healing against separate healing on kjv16, the same step budget per depth.

Separate: `ulsexport prune --speedup s` then `ulsexport heal` of that prune, for each depth, N steps
each. Joint: `ulsexport heal --teacher kjv16 --speedups 2,3`, one set of weights, N steps per depth
(2N in all, the depths in turn). Perplexity of every depth on kjv-valid.txt (never trained on) with
the heal's own evaluation (--seq-len windows), and the full model's for reference.

    python benchmarks/joint_heal_kjv16.py --steps 100 --results benchmarks/results [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KJV16 = ROOT / "tests" / "fixtures" / "models" / "kjv16"
TRAIN = ROOT / "tests" / "fixtures" / "data" / "kjv-train.txt"
VALID = ROOT / "tests" / "fixtures" / "data" / "kjv-valid.txt"


def main():
    from ulsexport.heal import heal
    from ulsexport.prune import plan_for_model, prune_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speedups", default="2,3")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per depth")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    speedups = [float(s) for s in args.speedups.split(",")]
    settings = dict(loss="kd", batch=args.batch, seq_len=args.seq_len, lr=args.lr, device=args.device,
                    eval_text=VALID, quiet=True)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "separate": {}, "joint": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for s in speedups:
            pruned = prune_checkpoint(KJV16, tmp / f"pruned-{s:g}", plan_for_model(KJV16, s), quiet=True).out_dir
            start = time.perf_counter()
            result = heal(KJV16, pruned, TRAIN, tmp / f"healed-{s:g}", steps=args.steps, **settings)
            record = result.manifest["healing"]
            report["separate"][f"{s:g}x"] = {"kept": result.manifest["kept"], "before": record["perplexity_before"],
                                             "after": record["perplexity_after"], "seconds": time.perf_counter() - start}
            report["full"] = record["teacher_perplexity"]
            print(f"separate {s:g}x: {report['separate'][f'{s:g}x']}", flush=True)
        start = time.perf_counter()
        result = heal(KJV16, None, TRAIN, tmp / "joint", steps=args.steps * len(speedups), speedups=speedups,
                      **settings)
        for depth in result.manifest["trained_depths"]:
            report["joint"][f"{depth['speedup']:g}x"] = {"kept": depth["kept"], "before": depth["perplexity_before"],
                                                        "after": depth["perplexity_after"]}
        report["joint_seconds"] = time.perf_counter() - start
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "joint-heal-kjv16.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Joint against separate healing, kjv16", "",
             f"kd, {args.steps} steps per depth of {args.batch} x {args.seq_len} tokens, lr {args.lr:g}, {args.device}; "
             f"perplexity on kjv-valid.txt ({args.seq_len}-token windows), full model {report['full']:.2f}; "
             "`python benchmarks/joint_heal_kjv16.py`.", "",
             "| depth | layers | unhealed | healed alone | healed jointly | joint / alone |", "|---|---|---|---|---|---|"]
    for tag, alone in report["separate"].items():
        joint = report["joint"][tag]
        lines.append(f"| {tag} | {len(alone['kept'])} | {alone['before']:.2f} | {alone['after']:.2f} | "
                     f"{joint['after']:.2f} | {joint['after'] / alone['after']:.3f} |")
    lines += ["", f"Seconds: separate {sum(v['seconds'] for v in report['separate'].values()):.0f} in all, "
              f"joint {report['joint_seconds']:.0f}."]
    (args.results / "joint-heal-kjv16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
