"""Healing that keeps what the model knew: the generality table of each healing choice, side by side.

Two steps, so that the heal runs themselves are plain `ulsexport heal` commands (run as a user would, in
parallel on one GPU by `heal_quality_gpu.sh`):

  python benchmarks/heal_quality.py prepare --work W [--model smollm2|PATH] [--speedups 2,3]
      the model (SmolLM2-135M-Instruct from its PyPI GGUF by default) and held-out pages of the Python
      docs (the last 5% of pydoc-train.txt's paragraphs; the rest is the user's healing text). Prints the
      paths as shell variables.
  python benchmarks/heal_quality.py table --work W --out benchmarks/results/NAME
      one table over every healed output under W: perplexity on each held-out domain (python docs,
      KJV, TinyStories) with its ratio to the full model, top-1 agreement with the teacher on text it
      sampled, greedy agreement (on its greedy continuations: a self-speculative draft's acceptance), chat
      answers' agreement, and steps, tokens, seconds and peak memory of the run.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from ulsexport.artifact import read_manifest
from ulsexport.heal.train import quality_rows
from ulsexport.quality import generality_table
from ulsexport.testing import write_results

DATA = ROOT.parent / "shared" / "data"   # the project's shared text; --data-dir names another copy
HOLDOUT_SHARE = 0.05


def split_pydoc(work: Path, source: Path) -> tuple[Path, Path]:
    """The last 5% of the paragraphs held out (whole pages, contiguous), the rest for healing."""
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut = int(len(paragraphs) * (1 - HOLDOUT_SHARE))
    heal, held = work / "pydoc-heal.txt", work / "pydoc-holdout.txt"
    heal.write_text("\n\n".join(paragraphs[:cut]) + "\n", encoding="utf-8")
    held.write_text("\n\n".join(paragraphs[cut:]) + "\n", encoding="utf-8")
    return heal, held


def prepare(args) -> None:
    from ulsexport.testing import smollm2_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = smollm2_checkpoint() if args.model == "smollm2" else Path(args.model)
    heal_text, held = split_pydoc(work, Path(args.data_dir) / "pydoc-train.txt")
    stories_heal, stories_held = split_half(work, Path(args.data_dir) / "tinystories-valid-excerpt.txt", "tinystories")
    print(f"MODEL={model}\nHEAL_TEXT={heal_text}\nHOLDOUT={held}\nSTORIES_HEAL={stories_heal}\n"
          f"STORIES_HOLDOUT={stories_held}")


def split_half(work: Path, source: Path, name: str) -> tuple[Path, Path]:
    """The first half of a text's lines (TinyStories: a story each) to heal on, the second half held out
    (SET=domains)."""
    paragraphs = [p for p in source.read_text(encoding="utf-8").split("\n") if p.strip()]
    heal, held = work / f"{name}-heal.txt", work / f"{name}-holdout.txt"
    heal.write_text("\n\n".join(paragraphs[:len(paragraphs) // 2]) + "\n", encoding="utf-8")
    held.write_text("\n\n".join(paragraphs[len(paragraphs) // 2:]) + "\n", encoding="utf-8")
    return heal, held


def table(args) -> None:
    work = Path(args.work)
    rows, runs = {}, []
    for folder in sorted(p for p in work.iterdir() if (p / "ulsexport.json").is_file() and p.name.startswith("healed")):
        manifest = read_manifest(folder) or {}
        record = manifest.get("healing")
        if not record:
            continue
        variant = folder.name.removeprefix("healed-")
        student = Path(record["student"]).name
        for label, row in quality_rows(record, manifest.get("trained_depths")).items():
            if label.endswith(" before"):   # a joint run's depth before healing: the teacher's layers, pruned
                label = f"unhealed ({label.removesuffix(' before')}, teacher's weights)"
            elif label.endswith(" after"):    # a joint run's depth after: this variant at that depth
                label = f"{variant}: {label.removesuffix(' after')}"
            rows[{"after": variant, "before": f"unhealed ({student})"}.get(label, label)] = row
        samples = record.get("teacher_samples") or {}
        runs.append({"variant": variant, "steps": record["steps"], "tokens": record.get("tokens"),
                     "lr": record["lr"], "lora_rank": record["lora_rank"], "loss": record["loss"],
                     "teacher_samples": samples.get("count", 0), "teacher_weight": samples.get("weight", 0),
                     "train_seconds": record["train_seconds"], "seconds": record["seconds"],
                     "peak_memory_mib": record.get("peak_memory_mib"), "device": record.get("device")})
    ordered = {"teacher": rows.pop("teacher")} if "teacher" in rows else {}
    ordered.update(sorted(rows.items(), key=lambda kv: not kv[0].startswith("unhealed")))
    head = "| variant | steps | tokens | lr | LoRA | teacher samples (share) | train s | total s | peak MiB |"
    lines = [head, "|" + "---|" * 9]
    for r in runs:
        lines.append(f"| {r['variant']} | {r['steps']} | {r['tokens']} | {r['lr']:g} | {r['lora_rank'] or '-'} | "
                     f"{r['teacher_samples']} ({r['teacher_weight']:g}) | {r['train_seconds']:.0f} | "
                     f"{r['seconds']:.0f} | {r['peak_memory_mib']} |")
    device = args.device_name or platform.node()
    markdown = (f"# {args.title}\n\nDevice: {device}. Command: `{args.command}`.\n\n"
                f"Perplexity per held-out domain (ratio to the teacher), top-1 agreement with the teacher on "
                f"{args.eval_note}, greedy agreement on its greedy continuations of held-out text (the acceptance rate "
                f"of a self-speculative draft; - for runs made before the column existed), chat answers' token "
                f"agreement (first 32 greedy tokens over 50 prompts).\n\n"
                f"{generality_table(ordered)}\n\n## Runs\n\n" + "\n".join(lines) + "\n")
    write_results(Path(args.out).with_suffix(".json"), {"device": device, "rows": ordered, "runs": runs}, markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=str(DATA))
    t = sub.add_parser("table")
    t.add_argument("--work", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--title", default="Healing choices side by side")
    t.add_argument("--device-name", default=None)
    t.add_argument("--command", default="bash benchmarks/heal_quality_gpu.sh")
    t.add_argument("--eval-note", default="32 windows it sampled (seeds training never used)")
    args = ap.parse_args()
    (prepare if args.what == "prepare" else table)(args)


if __name__ == "__main__":
    main()
