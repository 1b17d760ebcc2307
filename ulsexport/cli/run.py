"""`ulsexport run`: the whole pipeline from a YAML recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, dotted for nested ones: --set model=/models/llama --set plan.speedup=3.")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose inputs did not change.")
@click.pass_context
def run(ctx, recipe, overrides, force):
    """Run a YAML recipe: plan -> prune -> onnx -> validate, into artifacts/<name>/.

    Writes hf/, onnx/ and report/ (report.md, report.json, report.png) under artifacts/<name>/.
    A stage whose inputs did not change since the last run is skipped (and says so). Exits 1 when
    the validation's parity fails.

    \b
    Examples:
      ulsexport run recipes/stories260k-demo.yaml
      ulsexport run recipes/llama-7b-uls-2x-cuda.yaml --set model=/models/Meta-Llama-3-8B
    """
    from ..recipe import load_recipe, run_recipe

    result = run_recipe(load_recipe(recipe, list(overrides)), force=force, quiet=ctx.obj["quiet"],
                        echo=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {result.out_dir}")
    if result.report is not None:
        from ..validate.report import markdown

        click.echo(markdown(result.report))
        if not result.report["parity"]["passed"]:
            sys.exit(1)
