"""The `ulsexport` command line: a thin layer over the Python API, one module per command."""
from __future__ import annotations

import sys

import click

from ..errors import UserError


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left behind", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.version_option(package_name="ulsexport")
@click.pass_context
def main(ctx, quiet):
    """Make a language model faster by removing whole decoder layers (Unified Layer Skipping),
    and ship it as a Hugging Face checkpoint or ONNX with a KV cache (onnxruntime, onnxruntime-genai).

    \b
    Typical flow:
      ulsexport plan     --model PATH --speedup 2
      ulsexport prune    --model PATH --speedup 2 --out artifacts/NAME/hf
      ulsexport heal     --teacher PATH --student artifacts/NAME/hf --data train.txt --out artifacts/NAME/healed
      ulsexport onnx     --model artifacts/NAME/hf --out artifacts/NAME/onnx
      ulsexport validate --reference PATH --candidate artifacts/NAME/onnx --runtime ort

    The whole pipeline from a YAML recipe: ulsexport run recipes/stories260k-demo.yaml
    Choosing layers from data instead of by position: ulsexport compare-plans --help.
    """
    ctx.obj = {"quiet": quiet}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.version_option(package_name="ulsexport")
@click.pass_context
def main(ctx, quiet):
    """Make a language model faster by removing whole decoder layers (Unified Layer Skipping),
    and ship it as a Hugging Face checkpoint or ONNX with a KV cache (onnxruntime, onnxruntime-genai).

    \b
    Typical flow:
      ulsexport plan     --model PATH --speedup 2
      ulsexport prune    --model PATH --speedup 2 --out artifacts/NAME/hf
      ulsexport heal     --teacher PATH --student artifacts/NAME/hf --data train.txt --out artifacts/NAME/healed
      ulsexport onnx     --model artifacts/NAME/hf --out artifacts/NAME/onnx
      ulsexport validate --reference PATH --candidate artifacts/NAME/onnx --runtime ort

    The whole pipeline from a YAML recipe: ulsexport run recipes/stories260k-demo.yaml
    Choosing layers from data instead of by position: ulsexport compare-plans --help.
    """
    ctx.obj = {"quiet": quiet}


def _register() -> None:
    from .heal import heal
    from .onnx import onnx
    from .plan import compare_plans_command, plan
    from .prune import prune
    from .run import run
    from .validate import validate

    for command in (plan, prune, heal, compare_plans_command, validate, onnx, run):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
