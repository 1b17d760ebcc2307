"""`ulsexport validate`: output parity and measured speedup of an artifact."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UserError
from ..runtime import RUNTIMES
from ..validate.stage import ValidateSettings
from .options import quiet_option

@click.command()
@click.option("--reference", "-r", help="The ORIGINAL (full-depth) checkpoint (not needed with --speculative).")
@click.option("--candidate", "-c", required=True, type=click.Path(path_type=Path),
              help="The artifact: a pruned checkpoint or an ONNX export (its ulsexport.json names the kept layers); "
                   "each depth of a multi-depth export (onnx --speedups, --runtime ort).")
@click.option("--depth", help="A multi-depth export: validate this depth only (full, 2x, ...) [default: every depth].")
@click.option("--speculative", metavar="DEPTH",
              help="A multi-depth export: check self-speculative decoding (DEPTH drafts, the full depth verifies) "
                   "against the full depth (identical tokens) and time both at batch 1.")
@click.option("--draft-tokens", default=ValidateSettings.draft_tokens, show_default=True, help="With --speculative: tokens drafted per verify.")
@click.option("--adaptive", is_flag=True, help="With --speculative: choose the drafted tokens each round (at most "
                                               "--draft-tokens) from the running acceptance rate and measured costs.")
@click.option("--runtime", default=ValidateSettings.runtime, show_default=True,
              help=", ".join(f"{r.name} ({r.summary})" for r in RUNTIMES.values()) + ".")
@click.option("--device", default=ValidateSettings.device, show_default=True, help="cpu or cuda.")
@click.option("--dtype", help="fp32, fp16 or bf16 [default: the artifact's own, else fp32].")
@click.option("--batch", "batches", default=",".join(map(str, ValidateSettings.batches)), show_default=True, help="Batch sizes to time, comma-separated.")
@click.option("--prompt-len", default=ValidateSettings.prompt_len, show_default=True, help="Prompt tokens for timing.")
@click.option("--new-tokens", default=ValidateSettings.new_tokens, show_default=True, help="Generated tokens for timing.")
@click.option("--runs", default=ValidateSettings.runs, show_default=True, help="Timed runs per setting (median reported).")
@click.option("--warmup", default=ValidateSettings.warmup, show_default=True, help="Untimed warm-up runs per setting.")
@click.option("--no-speed", is_flag=True, help="Check parity (and quality) only.")
@click.option("--parity-steps", default=ValidateSettings.parity_steps, show_default=True, help="Greedy steps compared for parity.")
@click.option("--tolerance", type=float, help="Relative logit error allowed [default: fp32 1e-4, fp16 1e-2].")
@click.option("--text", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text, repeatable (one per domain): the generality table of full vs pruned "
                   "(perplexity on each, top-1 agreement on the full model's samples, chat answers' agreement).")
@click.option("--eval-samples", default=ValidateSettings.eval_samples, show_default=True,
              help="With --text: windows the full model samples for the top-1 agreement column (0: none).")
@click.option("--tasks", type=click.Path(path_type=Path), help="JSONL of prompt/reference: BLEU and ROUGE-L.")
@click.option("--depth-reference", "depth_references", multiple=True, metavar="DEPTH=DIR",
              help="A multi-depth export with a depth from a checkpoint of its own (onnx --depth-model): that "
                   "checkpoint, which the depth's parity is checked against (its hashes must match the export's "
                   "record; the path the manifest records is never opened).")
@click.option("--reference-artifact", type=click.Path(path_type=Path),
              help="The full model built like the candidate (e.g. its ONNX export) [default: built on the fly].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the Markdown report here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write the PNG plot here.")
@click.option("--no-cuda-graph", is_flag=True,
              help="--runtime ort on CUDA: decode without capturing each step as a CUDA graph (captured by default).")
@click.option("--decode-kernels", is_flag=True,
              help="--runtime ort on CUDA: run the fp16 products on ulsexport's own CUDA kernels (built with nvcc on "
                   "first use; needs onnxruntime's C/C++ headers, ORT_INCLUDE_DIR), full model and candidate alike.")
@quiet_option
@click.pass_context
def validate(ctx, reference, candidate, depth, speculative, draft_tokens, adaptive, runtime, device, dtype, batches, prompt_len, new_tokens, runs, warmup,
             no_speed, parity_steps, tolerance, text, eval_samples, tasks, depth_references, reference_artifact, json_path, report_path, plot_path,
             no_cuda_graph, decode_kernels):
    """Check an artifact's output parity and measure its speedup over the full model.

    Parity: the candidate's greedy run against the pruned checkpoint in PyTorch fp32, step by step.
    Speed: full and pruned model on the same runtime, device and dtype, in this one process.
    Exits 1 when parity fails (the report says at which step and batch row), 2 on bad input.

    \b
    Example:
      ulsexport validate --reference path/to/llama --candidate artifacts/llama-2x/onnx \\
          --runtime ort --device cuda --batch 1,8 --report report.md --json report.json
    """
    from ..outputs import check_writable_file

    settings = ValidateSettings(runtime, device, dtype, parse_batches(batches), prompt_len, new_tokens, runs, warmup,
                                no_speed, parity_steps, tolerance, tuple(text) or None, eval_samples, tasks, depth,
                                no_cuda_graph, decode_kernels, speculative, draft_tokens, adaptive)
    settings.check()
    for option, path in (("--json", json_path), ("--report", report_path), ("--plot", plot_path)):
        check_writable_file(path, option)  # before the work, not after it
    pairs = [value.partition("=") for value in depth_references]
    if any(not tag or not sep or not folder.strip() for tag, sep, folder in pairs):
        raise UserError(f"--depth-reference: give DEPTH=DIR, e.g. 2x=kjv16-2x-healed (got {', '.join(depth_references)})")
    result = settings.run(reference, candidate, reference_artifact, quiet=ctx.obj["quiet"],
                          depth_references={tag: Path(folder.strip()).expanduser() for tag, _, folder in pairs})
    if speculative:
        _write_speculative(result, json_path, report_path)
    else:
        from ..validate.report import markdown, write_reports

        write_reports(result, json_path, report_path, plot_path)
        click.echo(markdown(result))
    if not result["parity"]["passed"]:
        sys.exit(1)


def _write_speculative(result: dict, json_path, report_path) -> None:
    from ..artifact import json_text
    from ..validate.speculative import speculative_markdown

    text = speculative_markdown(result)
    if json_path:
        Path(json_path).write_text(json_text(result) + "\n")
    if report_path:
        Path(report_path).write_text(text)
    click.echo(text)


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8); every batch size a whole number of at least 1."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--batch: '{part}' is not a batch size (a whole number, e.g. --batch 1,8)") from None
        if value < 1:
            raise UserError(f"--batch: batch sizes are at least 1, not {value}")
        out.append(value)
    return tuple(out)
