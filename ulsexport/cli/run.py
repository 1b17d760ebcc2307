"""`ulsexport run`: the whole pipeline from a YAML recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import quiet_option


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, dotted for nested ones: --set model=/models/llama --set plan.speedup=3.")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose inputs did not change "
                                            "(outputs are replaced only where ulsexport wrote them).")
@quiet_option
@click.pass_context
def run(ctx, recipe, overrides, force):
    """Run a YAML recipe: plan -> prune -> heal -> onnx -> validate -> triton, into artifacts/<name>/.

    Writes hf/, healed/, onnx/, report/ (report.md, report.json, report.png) and triton/ under
    artifacts/<name>/, as the recipe's sections ask, and ends with a short summary of what the run
    measured. A stage whose inputs did not change since the last run is skipped (and says so). Exits 1
    when the validation's parity fails.

    \b
    Examples:
      ulsexport run recipes/kjv16-demo.yaml
      ulsexport run recipes/stories260k-demo.yaml
      ulsexport run recipes/llama-7b-uls-2x-cuda.yaml --set model=/models/Meta-Llama-3-8B
    """
    from ..recipe import load_recipe, run_recipe

    result = run_recipe(load_recipe(recipe, list(overrides)), force=force, quiet=ctx.obj["quiet"],
                        echo=lambda line: click.echo(line, err=True))
    for line in result.summary:
        click.echo(line)
    click.echo(f"wrote {result.out_dir}" + (f" (the validation report: {result.out_dir / 'report' / 'report.md'})"
                                            if result.report is not None else ""))
    if (result.out_dir / "triton").is_dir() and "triton" in result.stages:
        click.echo(f"serve it: ulsexport serve {result.out_dir / 'triton'}")
    if result.report is not None and not result.report["parity"]["passed"]:
        sys.exit(1)
