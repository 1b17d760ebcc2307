"""`ulsexport engine`: a TensorRT engine from a standard-ops ONNX export."""
from __future__ import annotations

from pathlib import Path

import click

from ..artifact import json_text
from .options import quiet_option

from ..errors import UserError


@click.command()
@click.option("--model", "-m", required=True, type=click.Path(path_type=Path),
              help="ONNX export folder of `ulsexport onnx --target tensorrt` (standard ops, concat KV cache).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--fp16", is_flag=True, help="An fp16 engine (strongly typed libraries: the graph must be fp16).")
@click.option("--bf16", is_flag=True, help="A bf16 engine from an fp32 graph (weakly typed TensorRT only).")
@click.option("--batch", default="1,8", show_default=True,
              help="Batch sizes, one optimization profile each (batch 1..B, tuned for B).")
@click.option("--max-seq", type=int,
              help="Positions the engine covers, past plus new tokens [default: min(4096, the model's)].")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file: loaded if it exists, written back after the build (full TensorRT; "
                   "TensorRT for RTX ignores timing caches).")
@click.option("--library", type=click.Choice(["tensorrt", "tensorrt-rtx"]),
              help="tensorrt: full TensorRT (every GPU of its release, H100/H200 included); tensorrt-rtx: TensorRT for "
                   "RTX (engines run on compute capability 8.0 8.6 8.9 12.0 12.1 only) [default: the first installed].")
@click.option("--workspace-gb", type=float, help="Builder workspace limit in GiB [default: the library's].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@quiet_option
@click.pass_context
def engine(ctx, model, out, fp16, bf16, batch, max_seq, timing_cache, library, workspace_gb, force, as_json):
    """Build a TensorRT engine (model.plan) from an ONNX export, with optimization profiles for every
    --batch, new-token lengths 1..--max-seq and past lengths 0..--max-seq - 1 of every cache input.

    \b
    Examples:
      ulsexport onnx   --model artifacts/NAME/hf --out artifacts/NAME/onnx-trt --target tensorrt \\
          --dtype fp16 --device cuda
      ulsexport engine --model artifacts/NAME/onnx-trt --out artifacts/NAME/trt --fp16 --batch 1,8,32
    """
    from ..engine import build_engine, parse_batch

    if fp16 and bf16:
        raise UserError("--fp16 and --bf16 exclude each other; give one")
    batches = parse_batch(batch)
    result = build_engine(model, out, precision="fp16" if fp16 else "bf16" if bf16 else None, batch=batches,
                          max_seq=max_seq, timing_cache=timing_cache, library=library, workspace_gb=workspace_gb,
                          force=force, quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json_text(result.manifest))
        return
    facts = result.manifest["engine"]
    runs_on = "compute capability " + " ".join(facts["runs_on"]) if facts["runs_on"] else facts["runs_on_note"]
    click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s: {facts['engine_bytes'] / 1e6:.1f} MB "
               f"{facts['precision']} engine, {facts['library']} {facts['version']}, batch {batch}, "
               f"{facts['max_sequence_length']} positions; runs on {runs_on}")
