"""Every layer plan side by side: perplexity after pruning (no fine-tuning) for each strategy and speedup."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..errors import UserError
from .positional import POSITIONAL_STRATEGIES, make_plan
from .scoring import (CALIB_WINDOW, DEFAULT_CALIB_TOKENS, STRATEGIES, calibration_from_text,
                      data_plans, kept_layers_only, strategy_name)


GENERALITY_TOKENS = 50_000   # of each held-out domain in the generality table


def split_paragraphs(text: str) -> tuple[str, str]:
    """(first half, second half) of the text's non-empty lines (paragraphs)."""
    paragraphs = [p for p in text.split("\n") if p.strip()]
    if len(paragraphs) < 2:
        raise UserError("--text has fewer than 2 paragraphs, so it cannot be split into calibration and "
                        "evaluation halves; give --calib")
    half = len(paragraphs) // 2
    return "\n".join(paragraphs[:half]), "\n".join(paragraphs[half:])


def _overlap_note(calib_text: str, eval_text: str) -> str | None:
    calib = {p for p in calib_text.split("\n") if p.strip()}
    evaluated = [p for p in eval_text.split("\n") if p.strip()]
    shared = sum(p in calib for p in evaluated)
    if shared == 0:
        return None
    return (f"WARNING: calibration and evaluation text are not disjoint ({shared} of {len(evaluated)} "
            "evaluation paragraphs also appear in the calibration text), so the perplexities of the data "
            "strategies are optimistic")


def parse_speedups(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--speedups: '{text}' is not a list of numbers like 1.25,1.5,2,3") from None
    if not values:
        raise UserError("--speedups is empty")
    return sorted(set(values))


def compare_plans(model: str | Path, speedups: list[float], text_path, calib_path=None, *,
                  calib_tokens: int = DEFAULT_CALIB_TOKENS, eval_tokens: int | None = None,
                  strategies=STRATEGIES, device: str = "cpu", quiet: bool = False, eval_texts=None,
                  eval_samples: int = 16) -> dict:
    """Perplexity on the evaluation text of every (strategy, speedup) plan, layers dropped in memory. With
    `eval_texts` (held-out text, one per domain) also the generality table of every distinct plan: perplexity
    per domain, top-1 agreement with the full model on `eval_samples` windows it samples, and, where the
    tokenizer has a chat template, the greedy chat answers' agreement (`quality.generality`)."""
    from ..models import load_causal_lm
    from ..tokenizer import load_tokenizer
    from ..precision import resolve_device
    from ..progress import progress_bar
    from ..checkpoint import load_model_info
    from ..quality import perplexity, read_text, token_windows

    start = time.perf_counter()
    strategies = tuple(strategy_name(s) for s in strategies)  # any case; an unknown one refused, listing all
    model_dir, config, adapter = load_model_info(model)
    num_layers, shape = adapter.num_layers(config), adapter.shape(config)
    text = read_text(text_path)
    if calib_path is None:
        calib_text, eval_text = split_paragraphs(text)
        split = f"--text {text_path} split by paragraphs: first half for calibration, second half for evaluation"
    else:
        calib_text, eval_text = read_text(calib_path), text
        split = f"calibration text {calib_path}, evaluation text {text_path}"
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_from_text(tokenizer, calib_text, str(calib_path or f"{text_path} (first half)"),
                                  calib_tokens)
    eval_windows = token_windows(tokenizer, eval_text, CALIB_WINDOW, eval_tokens)
    model = load_causal_lm(model_dir, "fp32", resolve_device(device))

    plans = []
    for strategy in strategies:
        if strategy in POSITIONAL_STRATEGIES:
            plans += [make_plan(num_layers, s, strategy, shape=shape) for s in speedups]
        else:
            plans += data_plans(strategy, num_layers, speedups, calib, shape=shape, model=model,
                                base_model=model.base_model, quiet=quiet)
    evaluated = {}
    with progress_bar(len(plans) + 1, "evaluating plans", unit="plan", quiet=quiet) as bar:
        baseline = perplexity(model, eval_windows)
        bar.update(1)
        rows = []
        for plan in plans:
            if plan.kept not in evaluated:
                with kept_layers_only(model, plan.kept):
                    evaluated[plan.kept] = perplexity(model, eval_windows)
            bar.update(1)
            rows.append({"strategy": plan.strategy, "speedup": plan.speedup_target, "kept": list(plan.kept),
                         "skipped": list(plan.skipped), "num_kept": len(plan.kept),
                         "predicted_speedup": plan.to_dict()["predicted_speedup"],
                         "ppl": round(evaluated[plan.kept], 4),
                         "scoring_seconds": plan.scores.get("seconds")})
    general = _generality(model, tokenizer, model_dir, plans, eval_texts, eval_samples, quiet) if eval_texts else None
    notes = [f"Data: {split}."]
    overlap = _overlap_note(calib_text, eval_text)
    notes.append(overlap or "Calibration and evaluation text are disjoint (no evaluation paragraph appears "
                            "in the calibration text).")
    return {
        "model": str(model_dir), "num_layers": num_layers, "device": device,
        "evaluation": {"tokens": sum(len(w) for w in eval_windows), "window": CALIB_WINDOW,
                       "sha256": hashlib.sha256(eval_text.encode("utf-8")).hexdigest()},
        "calibration": calib.describe(), "notes": notes,
        "baseline_ppl": round(baseline, 4), "speedups": speedups, "strategies": list(strategies),
        "rows": rows, **({"generality": general} if general else {}), "seconds": round(time.perf_counter() - start, 2),
    }


def _generality(model, tokenizer, model_dir: Path, plans, eval_texts, eval_samples: int, quiet: bool) -> dict:
    """The generality rows of the full model and of each distinct plan ("strategy speedup"), each plan's layers
    dropped in memory."""
    from ..heal.samples import SampleSettings, teacher_samples
    from ..progress import progress_bar
    from ..quality import EVAL_SEED_OFFSET, EVAL_WINDOW, domain_windows, generality, prepare_generality

    texts = [eval_texts] if isinstance(eval_texts, (str, Path)) else list(eval_texts)
    domains = domain_windows(tokenizer, texts, GENERALITY_TOKENS)
    sampled = []
    if eval_samples:
        array, _ = teacher_samples(model, tokenizer, Path(model_dir), None, None,
                                   SampleSettings(eval_samples, EVAL_WINDOW, seed=EVAL_SEED_OFFSET), quiet=True)
        sampled = array.tolist()
    g = prepare_generality(model, tokenizer, domains, sampled)
    distinct = {}
    for plan in plans:
        distinct.setdefault(plan.kept, f"{plan.strategy} {plan.speedup_target:g}x")
    rows = {"full": generality(model, g, None if quiet else "the full model")}
    with progress_bar(len(distinct), "generality of each plan", unit="plan", quiet=quiet) as bar:
        for kept, label in distinct.items():
            with kept_layers_only(model, kept):
                rows[label] = generality(model, g)
            bar.update(1)
    same = {label: [f"{p.strategy} {p.speedup_target:g}x" for p in plans if p.kept == kept]
            for kept, label in distinct.items()}
    return {**g.describe(), "texts": [str(t) for t in texts], "rows": rows,
            "same_layers": {k: v for k, v in same.items() if len(v) > 1}}


def winners(result: dict) -> list[dict]:
    """Per speedup: the best strategy, its perplexity, the runner-up, and the best positional plan."""
    out = []
    for s in result["speedups"]:
        rows = sorted((r for r in result["rows"] if r["speedup"] == s), key=lambda r: (r["ppl"], r["strategy"]))
        positional = [r for r in rows if r["strategy"] in POSITIONAL_STRATEGIES]
        out.append({"speedup": s, "best": rows[0]["strategy"], "best_ppl": rows[0]["ppl"],
                    "runner_up": rows[1]["strategy"] if len(rows) > 1 else None,
                    "runner_up_ppl": rows[1]["ppl"] if len(rows) > 1 else None,
                    "best_positional": positional[0]["strategy"] if positional else None,
                    "best_positional_ppl": positional[0]["ppl"] if positional else None})
    return out


def markdown_report(result: dict, command: str | None = None) -> str:
    speedups = result["speedups"]
    by_key = {(r["strategy"], r["speedup"]): r for r in result["rows"]}
    best = {w["speedup"]: w["best_ppl"] for w in winners(result)}
    kept_counts = {r["speedup"]: r for r in result["rows"]}
    lines = [f"Perplexity after removing layers (no fine-tuning) of `{result['model']}` "
             f"({result['num_layers']} layers; unpruned: {result['baseline_ppl']:.2f}), on "
             f"{result['evaluation']['tokens']} evaluation tokens; calibration: "
             f"{result['calibration']['tokens']} tokens. Best per speedup in bold.", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    head = [f"{s:g}x (keep {kept_counts[s]['num_kept']}; cost model "
            f"{kept_counts[s]['predicted_speedup']['cost_model']:.2f}x)" for s in speedups]
    lines += ["| strategy | " + " | ".join(head) + " |", "|---" * (len(speedups) + 1) + "|"]
    for strategy in result["strategies"]:
        cells = []
        for s in speedups:
            ppl = by_key[(strategy, s)]["ppl"]
            cells.append(f"**{ppl:.2f}**" if ppl == best[s] else f"{ppl:.2f}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "Kept layers:", "", "| strategy | " + " | ".join(f"{s:g}x" for s in speedups) + " |",
              "|---" * (len(speedups) + 1) + "|"]
    for strategy in result["strategies"]:
        lines.append(f"| {strategy} | " + " | ".join(
            ",".join(map(str, by_key[(strategy, s)]["kept"])) for s in speedups) + " |")
    lines += ["", "Winners:", ""]
    for w in winners(result):
        line = f"- {w['speedup']:g}x: **{w['best']}** ({w['best_ppl']:.2f})"
        if w["runner_up"]:
            line += (f", {100 * (w['runner_up_ppl'] / w['best_ppl'] - 1):.1f}% lower perplexity than the "
                     f"runner-up {w['runner_up']} ({w['runner_up_ppl']:.2f})")
        if w["best_positional"] and w["best_positional"] != w["best"]:
            line += (f"; best position-only plan: {w['best_positional']} ({w['best_positional_ppl']:.2f}, "
                     f"{100 * (w['best_positional_ppl'] / w['best_ppl'] - 1):.1f}% higher)")
        lines.append(line)
    if result.get("generality"):
        from ..quality import generality_table

        g = result["generality"]
        lines += ["", f"Generality (held-out text per domain, at most {GENERALITY_TOKENS} tokens each; top-1 "
                      f"agreement with the full model on {g['sampled_windows']} windows it sampled; chat answers' "
                      "agreement over the first 32 greedy tokens where there is a chat template):", "",
                  generality_table(g["rows"], reference="full")]
        for label, others in g.get("same_layers", {}).items():
            lines.append(f"\n{label} keeps the same layers as {', '.join(o for o in others if o != label)}.")
    lines += [""] + [f"{note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity against predicted speedup (layer count), one line per strategy, log y."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'ulsexport[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in result["strategies"]:
        rows = [r for r in result["rows"] if r["strategy"] == strategy]
        ax.plot([r["predicted_speedup"]["layers"] for r in rows], [r["ppl"] for r in rows],
                marker="o", label=strategy)
    ax.axhline(result["baseline_ppl"], color="gray", linestyle=":", label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("speedup (layers removed: L / K)")
    ax.set_ylabel("perplexity on evaluation text")
    ax.set_title(f"{Path(result['model']).name}: layer plans without fine-tuning")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, json_path=None, report_path=None, plot_path=None, command=None) -> None:
    if json_path:
        from ..artifact import json_text

        Path(json_path).write_text(json_text(result) + "\n")
    if report_path:
        Path(report_path).write_text(markdown_report(result, command))
    if plot_path:
        plot(result, Path(plot_path))
