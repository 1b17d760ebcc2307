"""The `ulsexport` command line: a thin layer over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import UserError
from .plan import describe, parse_index_list

ARTIFACTS = Path("artifacts")


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
    and ship it as a Hugging Face checkpoint or ONNX with a KV cache.

    \b
    Typical flow:
      ulsexport plan  --model PATH --speedup 2
      ulsexport prune --model PATH --speedup 2 --out artifacts/NAME/hf
    """
    ctx.obj = {"quiet": quiet}


def _plan_options(f):
    f = click.option("--skip", help="Explicit layers to remove, e.g. 1,3,10-12 (instead of a strategy).")(f)
    f = click.option("--keep", help="Explicit layers to keep, e.g. 0,2,5,7 (instead of a strategy).")(f)
    f = click.option("--strategy", default="uls", show_default=True,
                     help="uls: the ULS authors' rule; even: K layers spread evenly; "
                          "top: drop the layers just below the last; first: keep the first K.")(f)
    f = click.option("--speedup", "-s", type=float,
                     help="Target speedup s; the plan keeps K = int(L / s) layers.")(f)
    return f


def _lists(keep, skip):
    return (parse_index_list(keep, "--keep") if keep else None,
            parse_index_list(skip, "--skip") if skip else None)


@main.command()
@click.option("--model", "-m", help="Checkpoint directory (or hub id) to read the layer count and shape from.")
@click.option("--num-layers", "-L", type=int, help="Plan for this many layers, with no model.")
@_plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, num_layers, speedup, strategy, keep, skip, as_json):
    """Show which layers a target speedup keeps, with the predicted speedup.

    \b
    Examples:
      ulsexport plan --num-layers 32 --speedup 2 --json
      ulsexport plan --model path/to/llama --speedup 3 --strategy even
    """
    from .plan import make_plan
    from .prune import plan_for_model

    if (model is None) == (num_layers is None):
        raise UserError("give exactly one of --model or --num-layers")
    keep_list, skip_list = _lists(keep, skip)
    if model:
        result = plan_for_model(model, speedup, strategy, keep_list, skip_list)
    else:
        result = make_plan(num_layers, speedup, strategy, keep_list, skip_list)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else describe(result))


@main.command()
@click.option("--model", "-m", required=True, help="Source checkpoint directory (or hub id). Never modified.")
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Output directory [default: artifacts/<model>-<strategy>-<s>x/hf].")
@_plan_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (*.bin); they can run code when loaded.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def prune(ctx, model, out, speedup, strategy, keep, skip, force, allow_pickle, max_shard_size, as_json):
    """Remove the planned layers from a checkpoint and write an ordinary checkpoint.

    The output loads with AutoModelForCausalLM.from_pretrained and no custom code; its
    ulsexport.json says which original layers were kept. Tensors are streamed one at a time.

    \b
    Example:
      ulsexport prune --model path/to/llama --speedup 2 --out artifacts/llama-2x/hf
    """
    from .prune import plan_for_model, prune_checkpoint

    keep_list, skip_list = _lists(keep, skip)
    layer_plan = plan_for_model(model, speedup, strategy, keep_list, skip_list)
    if out is None:
        tag = f"{layer_plan.strategy}-{speedup:g}x" if speedup else layer_plan.strategy
        out = ARTIFACTS / f"{Path(model).name}-{tag}" / "hf"
    result = prune_checkpoint(model, out, layer_plan, force=force, allow_pickle=allow_pickle,
                              max_shard_bytes=_parse_size(max_shard_size), quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2))
    else:
        click.echo(describe(layer_plan))
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s")


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UserError(f"--max-shard-size: '{text}' is not a size like 5GB or 500MB")


if __name__ == "__main__":
    main()
