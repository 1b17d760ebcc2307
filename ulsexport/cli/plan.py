"""`ulsexport plan` and `ulsexport compare-plans`: which layers stay, and what each choice costs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import UserError
from ..plan import describe
from ..plan.compare import STRATEGIES as PLAN_STRATEGIES
from .options import (calib_options, check_plan_conflicts, index_lists, layer_plan_option, plan_options,
                      quiet_option)


@click.command()
@click.option("--model", "-m", help="Checkpoint directory (or hub id) to read the layer count and shape from.")
@click.option("--num-layers", "-L", type=int, help="Plan for this many layers, with no model.")
@plan_options
@calib_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@quiet_option
def plan(model, num_layers, speedup, strategy, keep, skip, calib, calib_tokens, device, as_json):
    """Show which layers a target speedup keeps, with the predicted speedup.

    \b
    Examples:
      ulsexport plan --num-layers 32 --speedup 2 --json
      ulsexport plan --model path/to/llama --speedup 3 --strategy even
      ulsexport plan --model path/to/llama --speedup 2 --strategy bi --calib calib.txt
    """
    from ..plan import make_plan
    from ..plan.scoring import DATA_STRATEGIES, strategy_name
    from ..validate import check_device

    if (model is None) == (num_layers is None):
        raise UserError("give exactly one of --model or --num-layers")
    strategy = strategy_name(strategy)
    check_device(device)
    if num_layers is not None and strategy in DATA_STRATEGIES and keep is None and skip is None:
        raise UserError(f"--strategy {strategy} scores the layers on calibration text: give --model (and --calib), "
                        "not --num-layers")
    if model:
        result = layer_plan_option(model, speedup, strategy, keep, skip, calib, calib_tokens, device)
    else:
        check_plan_conflicts(speedup, keep, skip)
        result = make_plan(num_layers, speedup, strategy, *index_lists(keep, skip))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else describe(result))


@click.command("compare-plans")
@click.option("--model", "-m", required=True, help="Checkpoint directory (or hub id).")
@click.option("--speedups", default="1.25,1.5,2,3", show_default=True, help="Comma-separated target speedups.")
@click.option("--text", required=True, type=click.Path(path_type=Path),
              help="Evaluation text, one paragraph a line; without --calib, its first half calibrates.")
@calib_options
@click.option("--strategies", default=",".join(PLAN_STRATEGIES),
              show_default=True, help="Comma-separated strategies to compare.")
@click.option("--eval-text", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text of another domain, repeatable: adds the generality table of every plan "
                   "(perplexity per domain, top-1 agreement with the full model on its samples, chat answers).")
@click.option("--eval-samples", default=16, show_default=True,
              help="With --eval-text: windows the full model samples for the top-1 agreement column (0: none).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the Markdown report here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG plot (perplexity vs speedup) here.")
@quiet_option
@click.pass_context
def compare_plans_command(ctx, model, speedups, text, calib, calib_tokens, device, strategies, eval_text,
                          eval_samples, json_path, report, plot):
    """Perplexity after pruning (no fine-tuning) of every strategy at every speedup, side by side.

    Layers are dropped in memory; nothing is written but the reports asked for. Calibration
    (for bi, angular, greedy-ppl) and evaluation text should differ: without --calib, the first
    half of --text's paragraphs calibrates and the second half evaluates.

    \b
    Example:
      ulsexport compare-plans --model tests/fixtures/models/kjv16 --speedups 1.25,1.5,2,3 \\
        --text tests/fixtures/data/kjv-valid.txt --report plans.md --plot plans.png
    """
    from ..outputs import check_writable_file
    from ..plan.compare import compare_plans, markdown_report, parse_speedups, write_outputs
    from ..validate import check_device

    check_device(device)
    for option, path in (("--json", json_path), ("--report", report), ("--plot", plot)):
        check_writable_file(path, option)

    if not 0 <= eval_samples <= 100_000:
        raise UserError(f"--eval-samples {eval_samples} must be between 0 and 100000")
    result = compare_plans(model, parse_speedups(speedups), text, calib, calib_tokens=calib_tokens,
                           device=device, quiet=ctx.obj["quiet"],
                           strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
                           eval_texts=list(eval_text) or None, eval_samples=eval_samples)
    command = "ulsexport " + " ".join(sys.argv[1:])
    write_outputs(result, json_path, report, plot, command)
    click.echo(markdown_report(result))
