"""`ulsexport prune`: remove the planned layers from a checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from ..plan import describe
from .heal import echo_healed
from ..artifact import json_text
from .options import ARTIFACTS, calib_options, layer_plan_option, parse_size, plan_options, quiet_option


@click.command()
@click.option("--model", "-m", required=True, help="Source checkpoint directory (or hub id). Never modified.")
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Output directory [default: artifacts/<model>-<strategy>-<s>x/hf].")
@plan_options
@calib_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (*.bin); they can run code when loaded.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--heal-data", type=click.Path(path_type=Path),
              help="Then heal the pruned model against --model on this text with `ulsexport heal`'s "
                   "defaults (on cuda when available); --out gets the healed model.")
@click.option("--resume", is_flag=True, help="With --heal-data: continue an interrupted healing run.")
@quiet_option
@click.pass_context
def prune(ctx, model, out, speedup, strategy, keep, skip, calib, calib_tokens, device, force, allow_pickle,
          max_shard_size, as_json, heal_data, resume):
    """Remove the planned layers from a checkpoint and write an ordinary checkpoint.

    The output loads with AutoModelForCausalLM.from_pretrained and no custom code; its
    ulsexport.json says which original layers were kept. Tensors are streamed one at a time.

    \b
    Example:
      ulsexport prune --model path/to/llama --speedup 2 --out artifacts/llama-2x/hf
    """
    from ..prune import prune_checkpoint

    layer_plan = layer_plan_option(model, speedup, strategy, keep, skip, calib, calib_tokens, device)
    if out is None:
        tag = f"{layer_plan.strategy}-{speedup:g}x" if speedup else layer_plan.strategy
        out = ARTIFACTS / f"{Path(model).name}-{tag}" / "hf"
    if heal_data:
        from ..heal import prune_and_heal

        healed = prune_and_heal(model, out, layer_plan, heal_data, force=force, resume=resume,
                                quiet=ctx.obj["quiet"], allow_pickle=allow_pickle,
                                max_shard_bytes=parse_size(max_shard_size))
        echo_healed(healed, as_json)
        return
    result = prune_checkpoint(model, out, layer_plan, force=force, allow_pickle=allow_pickle,
                              max_shard_bytes=parse_size(max_shard_size), quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json_text(result.manifest))
    else:
        click.echo(describe(layer_plan))
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s")
