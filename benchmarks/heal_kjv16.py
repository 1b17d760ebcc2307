"""Heal kjv16 pruned with the uls plan at 2x and 3x, by distillation (kd) and by the plain LM loss (lm).

Reports held-out perplexity on kjv-valid.txt of the full model, and of each pruned model before and
after healing, with the time of each run; writes heal_kjv16.json and heal_kjv16.md to --results.
Target (issue 11): healed 2x perplexity within 5% of the full model's.

    # on the GPU machine (4 runs of 600 steps, batch 32 x 256 tokens):
    python benchmarks/heal_kjv16.py --train tests/fixtures/data/kjv-train.txt --device cuda
    # a few steps on CPU, to check the script:
    python benchmarks/heal_kjv16.py --train tests/fixtures/data/kjv-train.txt --smoke --results /tmp/heal-smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ulsexport.heal import EVAL_MAX_TOKENS, heal
from ulsexport.models import load_causal_lm
from ulsexport.tokenizer import load_tokenizer
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.quality import perplexity, read_text, token_windows

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.05


def main(argv=None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.device, args.steps, args.batch, args.seq_len = "cpu", 3, 4, 64
    args.results.mkdir(parents=True, exist_ok=True)
    windows = token_windows(load_tokenizer(args.model), read_text(args.valid), args.seq_len, EVAL_MAX_TOKENS)
    full = perplexity(load_causal_lm(args.model, args.dtype, args.device), windows)
    print(f"full model: perplexity {full:.2f} on {args.valid.name}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="heal-kjv16-") as work:
        for speedup in args.speedups:
            plan = plan_for_model(args.model, speedup, "uls")
            student = Path(work) / f"uls-{speedup:g}x"
            prune_checkpoint(args.model, student, plan, quiet=True)
            for loss in args.losses:
                start = time.perf_counter()
                result = heal(args.model, student, args.train, Path(work) / f"uls-{speedup:g}x-{loss}", loss=loss,
                              temperature=args.temperature, steps=args.steps, batch=args.batch,
                              seq_len=args.seq_len, lr=args.lr, device=args.device, dtype=args.dtype,
                              eval_text=args.valid, save_every=args.steps, quiet=args.quiet, force=True)
                record = result.manifest["healing"]
                runs.append({"speedup": speedup, "kept": list(plan.kept), "loss": loss,
                             "perplexity_before": record["perplexity_before"],
                             "perplexity_after": record["perplexity_after"],
                             "after_over_full": record["perplexity_after"] / full,
                             "final_train_loss": record["final_train_loss"],
                             "seconds": time.perf_counter() - start,
                             "seconds_per_step": record["train_seconds"] / args.steps})
                print(_row(runs[-1]), flush=True)
    report = {"command": " ".join(sys.argv), "smoke": args.smoke, "model": str(args.model), "train": str(args.train),
              "valid": str(args.valid), "eval_tokens": sum(len(w) for w in windows),
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "temperature": args.temperature, "device": _device_name(args.device), "dtype": args.dtype,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "full_perplexity": full, "runs": runs,
              "target": f"healed 2x perplexity <= {TARGET_RATIO} x full",
              "target_met": all(r["after_over_full"] <= TARGET_RATIO for r in runs if r["speedup"] == 2)}
    (args.results / "heal_kjv16.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "heal_kjv16.md").write_text(_markdown(report))
    print(f"wrote {args.results}/heal_kjv16.json and .md; target met: {report['target_met']}")
    return 0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "tests/fixtures/models/kjv16")
    p.add_argument("--train", type=Path, default=ROOT / "tests/fixtures/data/kjv-train.txt")
    p.add_argument("--valid", type=Path, default=ROOT / "tests/fixtures/data/kjv-valid.txt")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/heal_kjv16")
    p.add_argument("--speedups", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 3.0])
    p.add_argument("--losses", type=lambda s: s.split(","), default=["kd", "lm"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--smoke", action="store_true", help="3 steps of batch 4 x 64 on CPU, to check the script")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"


def _row(run: dict) -> str:
    return (f"| {run['speedup']:g}x | {','.join(map(str, run['kept']))} | {run['loss']} | "
            f"{run['perplexity_before']:.2f} | {run['perplexity_after']:.2f} | {run['after_over_full']:.3f} | "
            f"{run['seconds']:.1f} | {1000 * run['seconds_per_step']:.0f} |")


def _markdown(report: dict) -> str:
    lines = [
        "# Healing kjv16 (issue 11)" + (" -- SMOKE RUN, not a result" if report["smoke"] else ""), "",
        f"Command: `{report['command']}`", "",
        f"Device {report['device']}, {report['dtype']}, torch {report['torch']}, "
        f"transformers {report['transformers']}. {report['steps']} steps of {report['batch']} x "
        f"{report['seq_len']} tokens, AdamW lr {report['lr']} (cosine), temperature {report['temperature']}; "
        f"held-out perplexity on {Path(report['valid']).name} ({report['eval_tokens']} tokens, windows of "
        f"{report['seq_len']}).", "",
        f"Full model (16 layers): perplexity **{report['full_perplexity']:.2f}**.", "",
        "| speedup | kept layers | loss | ppl before | ppl after | after / full | run s | ms/step |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in report["runs"]), "",
        f"Target ({report['target']}): {'met' if report['target_met'] else 'NOT met'}.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
