"""Readable reports of a validation: Markdown, JSON and a PNG plot."""
from __future__ import annotations

from pathlib import Path

from ..artifact import json_text


def _x(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def markdown(report: dict) -> str:
    if "depths" in report:  # a multi-depth export: a section per depth
        return "\n".join(markdown(depth) for depth in report["depths"].values())
    parity = report["parity"]
    kept = report["kept"]
    lines = [
        f"# ulsexport validation: {Path(report['candidate']).name}"
        + (f", depth {report['depth']}" if report.get("depth") else ""),
        "",
        f"- reference: `{report['reference']}` ({report['num_layers_original']} layers)",
        f"- candidate: `{report['candidate']}` ({report['candidate_kind']}, {len(kept)} layers kept: "
        f"{','.join(map(str, kept))})",
        f"- runtime: {report['runtime']} on {report['device']} ({report['device_name']}), dtype {report['dtype']}"
        + (", products on ulsexport's decode kernels" if report.get("decode_kernels") else ""),
        "",
        "## Parity (candidate vs the pruned checkpoint in PyTorch fp32)",
        "",
        f"**{'PASS' if parity['passed'] else 'FAIL'}**: max relative logit error "
        f"{parity['max_relative_error']:.2e} (tolerance {parity['tolerance']:g}), max abs error "
        f"{parity['max_abs_error']:.2e}, min top-1 agreement {parity['min_top1_agreement']:.3f}, greedy tokens "
        f"{'identical' if parity['greedy_tokens_equal'] else 'differ'} over {parity['steps_compared']} of "
        f"{parity['new_tokens']} steps (batch {parity['batch']}, left-padded).",
    ]
    if parity["first_divergence"]:
        d = parity["first_divergence"]
        tie = ("a near tie (the reference's margin between the two tokens is within the tolerance), "
               "which parity allows" if d["near_tie"] else "not a near tie")
        lines.append(f"Greedy tokens first differ at step {d['step']}, batch row {d['row']}: the reference's margin "
                     f"is {d['reference_margin']:.1e} of its largest logit, {tie}.")
    if parity["first_step_over_tolerance"] is not None:
        lines.append(f"Logits first exceed the tolerance at step {parity['first_step_over_tolerance']}.")
    if "speed" in report:
        s = report["speed"]["settings"]
        target = report["speedup"]["target"]
        predicted = report["speedup"]["predicted"] or {}
        lines += [
            "", f"## Speed (prompt {s['prompt_len']}, {s['new_tokens']} new tokens, median of {s['runs']} runs "
                f"after {s['warmup']} warm-up; min-max in brackets)", "",
            f"Target {_x(target)}; predicted {_x(predicted.get('layers'))} by layer count, "
            f"{_x(predicted.get('cost_model'))} by cost model.", "",
            "| batch | full decode tok/s | pruned decode tok/s | decode speedup | prefill speedup | end-to-end speedup |",
            "|---|---|---|---|---|---|",
        ]
        for batch, measured in report["speedup"]["measured"].items():
            full = report["speed"]["full"][batch]["decode_tokens_per_s"]
            pruned = report["speed"]["pruned"][batch]["decode_tokens_per_s"]
            lines.append(
                f"| {batch} | {full['median']:.1f} [{full['min']:.1f}-{full['max']:.1f}] | "
                f"{pruned['median']:.1f} [{pruned['min']:.1f}-{pruned['max']:.1f}] | "
                f"{_x(measured['decode_tokens_per_s'])} | {_x(measured['prefill_tokens_per_s'])} | "
                f"{_x(measured['end_to_end_tokens_per_s'])} |")
    if "generality" in report:
        from ..quality import generality_table

        g = report["generality"]
        lines += ["", "## Quality", "", f"Perplexity on each held-out text (ratio to the full model), top-1 agreement "
                  f"with the full model on {g['sampled_windows']} windows it sampled, and the greedy chat answers' "
                  f"agreement over {g['chat_prompts']} prompts (first {g['chat_tokens']} tokens; '-' without a chat "
                  "template).", "", generality_table(g["rows"], reference="full")]
    elif "perplexity" in report:
        p = report["perplexity"]
        lines += ["", "## Quality", "", f"Perplexity on `{p['text']}` ({p['tokens']} tokens): full {p['full']:.3f}, "
                  f"pruned {p['pruned']:.3f}."]
    if "tasks" in report:
        t = report["tasks"]
        lines += ["", f"Tasks ({t['examples']} examples): BLEU full {t['full']['bleu']:.2f} / pruned "
                  f"{t['pruned']['bleu']:.2f}; ROUGE-L full {t['full']['rougeL']:.2f} / pruned {t['pruned']['rougeL']:.2f}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Decode tokens/s per batch size, full vs pruned; perplexity beside it when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = list(report["depths"].values()) if "depths" in report else [report]  # a multi-depth export: each
    first = reports[0]
    names = [r.get("depth") or "pruned" for r in reports]
    panels = ("speed" in first) + ("perplexity" in first)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 3.5), squeeze=False)
    axes = list(axes[0])
    if "speed" in first:
        ax = axes.pop(0)
        batches = list(first["speed"]["full"])
        series = [("full", first["speed"]["full"])] + [(n, r["speed"]["pruned"]) for n, r in zip(names, reports)]
        width = 0.76 / len(series)
        for k, (name, speeds) in enumerate(series):
            values = [speeds[b]["decode_tokens_per_s"]["median"] for b in batches]
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(batches))], values, width, label=name)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{first['runtime']} on {first['device_name']}", fontsize=9)
        ax.legend()
    if "perplexity" in first:
        ax = axes.pop(0)
        ax.bar(["full", *names], [first["perplexity"]["full"], *(r["perplexity"]["pruned"] for r in reports)])
        ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report: dict, json_path=None, markdown_path=None, plot_path=None) -> None:
    if json_path:
        Path(json_path).write_text(json_text(report) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(markdown(report))
    if plot_path:
        plot(report, Path(plot_path))
