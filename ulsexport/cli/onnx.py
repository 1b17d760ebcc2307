"""`ulsexport onnx`: export a checkpoint to ONNX with a KV cache."""
from __future__ import annotations

from pathlib import Path

import click

from ..artifact import json_text
from ..errors import UserError
from ..export import BUILDERS
from ..export.stage import OnnxSettings
from .options import quiet_option


@click.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory (usually from `ulsexport prune`).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--builder", type=click.Choice(list(BUILDERS)), default=OnnxSettings.builder, show_default=True,
              help="; ".join(f"{b.name}: {b.summary}" for b in BUILDERS.values()) + ".")
@click.option("--dtype", default=OnnxSettings.dtype, show_default=True,
              help="fp32, fp16 (meant for cuda; the torch builder's also runs on cpu), int4 (genai builder only).")
@click.option("--device", default=OnnxSettings.device, show_default=True,
              help="cpu or cuda: where the model is traced and checked (torch), or which the graph targets (genai).")
@click.option("--opset", type=int, help="ONNX opset [default: torch.onnx's] (torch builder).")
@click.option("--no-optimize", is_flag=True, help="Skip onnxruntime transformer fusions (torch builder).")
@click.option("--attention", type=click.Choice(["gqa", "mha"]),
              help="Fused attention (torch builder) [default: gqa]: gqa keeps key/value heads grouped "
                   "(onnxruntime GroupQueryAttention, one q/k/v MatMul) and falls back to mha "
                   "if it fails the parity check; mha repeats key/value heads to the query heads.")
@click.option("--kv-cache", type=click.Choice(["shared", "concat"]),
              help="KV cache layout (torch builder, gqa) [default: shared]: shared = one buffer per cache tensor, "
                   "bound as past and present, appended in place, rotary inside GroupQueryAttention, rows "
                   "right-padded (onnxruntime-genai's layout; models with sliding-window attention keep concat); "
                   "concat = past and present separate, padding mask as an attention bias.")
@click.option("--target", type=click.Choice(["ort", "tensorrt"]), default=OnnxSettings.target, show_default=True,
              help="tensorrt: standard ONNX ops only (the torch builder's graph, no fusions, concat KV cache), "
                   "the input of `ulsexport engine`.")
@click.option("--speedups", help="Several depths from one set of weights, e.g. 1,2,3 (1 = full depth): --model is "
                                 "the ORIGINAL checkpoint, planned at each speedup with --strategy; one graph per "
                                 "depth, every weight stored once (torch builder).")
@click.option("--strategy", default=OnnxSettings.strategy, show_default=True, help="With --speedups: the plan strategy (see `plan`).")
@click.option("--calib", type=click.Path(path_type=Path), help="With --speedups: calibration text for bi|angular|greedy-ppl.")
@click.option("--depth-model", "depth_models", multiple=True, metavar="SPEEDUP=DIR",
              help="With --speedups: take that depth from checkpoint DIR (a student pruned from --model and healed "
                   "alone) instead of planning it. The full depth stays --model exactly and DIR's "
                   "depth drafts for `generate --speculative`; the tensors healing changed are stored beside "
                   "--model's (a draft's own weights).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only an earlier ulsexport output).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (*.bin); they can run code when loaded.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@quiet_option
@click.pass_context
def onnx(ctx, model, out, builder, dtype, device, opset, no_optimize, attention, kv_cache, target, speedups, strategy,
         calib, depth_models, force, allow_pickle, as_json):
    """Export a checkpoint to ONNX: one decoder graph with a KV cache for the kept layers only.

    The torch builder's graph has inputs input_ids, attention_mask, past_key_values.{i}.key/value
    (and position_ids where the cache is not shared) and outputs logits, present.{i}.key/value; it
    is checked against PyTorch before it is written, and fusions that break parity are dropped. Either builder writes
    genai_config.json (loads in onnxruntime_genai.Model) and ulsexport.json, which maps every cache
    index i to its original layer.

    \b
    Examples:
      ulsexport prune --model path/to/llama --speedup 2 --out artifacts/llama-2x/hf
      ulsexport onnx  --model artifacts/llama-2x/hf --out artifacts/llama-2x/onnx
      ulsexport onnx  --model artifacts/llama-2x/hf --out artifacts/llama-2x/genai --builder genai \\
          --dtype fp16 --device cuda
    """
    from ..export.stage import OnnxSettings, export
    from ..plan.compare import parse_speedups

    settings = OnnxSettings(builder, dtype, device, opset, no_optimize, attention, kv_cache, target,
                            tuple(parse_speedups(speedups)) if speedups else None, strategy, calib,
                            _depth_models(depth_models), allow_pickle)
    result = export(model, out, settings, force=force, quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json_text(result.manifest))
    elif result.manifest.get("multi_depth"):
        weights = result.manifest["weights"]
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s: "
                   + "; ".join(f"{g['tag']} keeps {','.join(map(str, g['kept']))}" for g in result.manifest["graphs"])
                   + f"; weights {weights['bytes'] / 2**20:.1f} MiB stored once "
                     f"({weights['bytes_if_each_depth_held_its_own'] / 2**20:.1f} MiB if each depth held its own)")
    else:
        layers = ", ".join(f"{i}<-{o}" for i, o in result.manifest["cache_to_original_layer"].items())
        graph = result.manifest.get("optimizations", {}).get("variant")  # the fused graph kept (torch builder)
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s" + (f" ({graph} graph)" if graph else "")
                   + f"; cache index<-original layer: {layers}")


def _depth_models(values) -> tuple[tuple[float, Path], ...] | None:
    """--depth-model SPEEDUP=DIR values as (speedup, folder) pairs (export_multi_depth checks the rest)."""
    pairs = []
    for value in values:
        speedup, sep, folder = value.partition("=")
        try:
            number = float(speedup)
        except ValueError:
            number = None
        if not sep or not folder.strip() or number is None:
            raise UserError(f"--depth-model {value!r}: give SPEEDUP=DIR, e.g. 2=kjv16-2x-healed")
        pairs.append((number, Path(folder.strip()).expanduser()))
    if len({s for s, _ in pairs}) != len(pairs):
        raise UserError("--depth-model: give each speedup once")
    return tuple(pairs) or None
