"""The `ulsexport` command line: a thin layer over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import UserError
from .plan import describe, parse_index_list
from .compare import STRATEGIES as PLAN_STRATEGIES

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


def _plan_options(f):
    f = click.option("--skip", help="Explicit layers to remove, e.g. 1,3,10-12 (instead of a strategy).")(f)
    f = click.option("--keep", help="Explicit layers to keep, e.g. 0,2,5,7 (instead of a strategy).")(f)
    f = click.option("--strategy", default="uls", show_default=True,
                     help="uls: the ULS authors' rule; even: K layers spread evenly; "
                          "top: drop the layers just below the last; first: keep the first K; "
                          "bi, angular, greedy-ppl: chosen from --calib text (see compare-plans).")(f)
    f = click.option("--speedup", "-s", type=float,
                     help="Target speedup s; the plan keeps K = int(L / s) layers.")(f)
    return f


def _calib_options(f):
    from .scoring import DEFAULT_CALIB_TOKENS

    f = click.option("--device", default="cpu", show_default=True,
                     help="Where calibration scoring runs: cpu or cuda.")(f)
    f = click.option("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, show_default=True,
                     help="Calibration tokens used (from the start of --calib).")(f)
    f = click.option("--calib", type=click.Path(path_type=Path),
                     help="Calibration text (one paragraph a line) for --strategy bi|angular|greedy-ppl.")(f)
    return f


def _layer_plan(model, speedup, strategy, keep, skip, calib, calib_tokens, device):
    from .scoring import layer_plan_for_model

    keep_list, skip_list = _lists(keep, skip)
    return layer_plan_for_model(model, speedup, strategy, keep_list, skip_list, calib,
                                calib_tokens=calib_tokens, device=device,
                                quiet=click.get_current_context().obj["quiet"])


def _lists(keep, skip):
    return (parse_index_list(keep, "--keep") if keep else None,
            parse_index_list(skip, "--skip") if skip else None)


@main.command()
@click.option("--model", "-m", help="Checkpoint directory (or hub id) to read the layer count and shape from.")
@click.option("--num-layers", "-L", type=int, help="Plan for this many layers, with no model.")
@_plan_options
@_calib_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, num_layers, speedup, strategy, keep, skip, calib, calib_tokens, device, as_json):
    """Show which layers a target speedup keeps, with the predicted speedup.

    \b
    Examples:
      ulsexport plan --num-layers 32 --speedup 2 --json
      ulsexport plan --model path/to/llama --speedup 3 --strategy even
      ulsexport plan --model path/to/llama --speedup 2 --strategy bi --calib calib.txt
    """
    from .plan import make_plan

    if (model is None) == (num_layers is None):
        raise UserError("give exactly one of --model or --num-layers")
    if model:
        result = _layer_plan(model, speedup, strategy, keep, skip, calib, calib_tokens, device)
    else:
        result = make_plan(num_layers, speedup, strategy, *_lists(keep, skip))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else describe(result))


@main.command()
@click.option("--model", "-m", required=True, help="Source checkpoint directory (or hub id). Never modified.")
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Output directory [default: artifacts/<model>-<strategy>-<s>x/hf].")
@_plan_options
@_calib_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (*.bin); they can run code when loaded.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--heal-data", type=click.Path(path_type=Path),
              help="Then heal the pruned model against --model on this text with `ulsexport heal`'s "
                   "defaults (on cuda when available); --out gets the healed model.")
@click.option("--resume", is_flag=True, help="With --heal-data: continue an interrupted healing run.")
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
    from .prune import prune_checkpoint

    layer_plan = _layer_plan(model, speedup, strategy, keep, skip, calib, calib_tokens, device)
    if out is None:
        tag = f"{layer_plan.strategy}-{speedup:g}x" if speedup else layer_plan.strategy
        out = ARTIFACTS / f"{Path(model).name}-{tag}" / "hf"
    if heal_data:
        from .heal import prune_and_heal

        healed = prune_and_heal(model, out, layer_plan, heal_data, force=force, resume=resume,
                                quiet=ctx.obj["quiet"], allow_pickle=allow_pickle,
                                max_shard_bytes=_parse_size(max_shard_size))
        _echo_healed(healed, as_json)
        return
    result = prune_checkpoint(model, out, layer_plan, force=force, allow_pickle=allow_pickle,
                              max_shard_bytes=_parse_size(max_shard_size), quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2))
    else:
        click.echo(describe(layer_plan))
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s")


@main.command()
@click.option("--teacher", "-t", help="The original model the student was pruned from (optional with --loss lm).")
@click.option("--student", required=True, help="The pruned checkpoint to heal. Never modified.")
@click.option("--data", "-d", required=True, type=click.Path(path_type=Path),
              help="Training text: a .txt file (one document per paragraph), a .jsonl file (a 'text' "
                   "field per line), or a directory of them.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--loss", type=click.Choice(["kd", "lm", "kd+lm"]), default="kd", show_default=True,
              help="kd: distil the teacher's token distributions; lm: next-token loss on --data; kd+lm: both.")
@click.option("--kd-weight", type=float, default=0.5, show_default=True, help="Weight of kd in kd+lm.")
@click.option("--temperature", "-T", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--steps", type=int, default=600, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=int, default=32, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per window.")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak AdamW learning rate (cosine decay).")
@click.option("--lora-rank", type=int, help="Train LoRA adapters of this rank instead of all weights "
                                            "(merged when saved; needs peft).")
@click.option("--device", help="cpu or cuda [default: cuda when available].")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: bf16 autocast and a bf16 teacher (trained weights stay fp32).")
@click.option("--eval-text", type=click.Path(path_type=Path), help="Held-out text: perplexity before and after.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in <out>.work/.")
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order.")
@click.option("--force", is_flag=True, help="Replace --out if it exists; discard an earlier run's checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the output's manifest as JSON.")
@click.pass_context
def heal(ctx, as_json, **options):
    """Heal a pruned model: train it briefly to match the original it was pruned from.

    Checkpoints go to <out>.work/ every --save-every steps; after Ctrl-C, run the same command
    with --resume. The output is an ordinary checkpoint whose ulsexport.json records the healing.

    \b
    Example:
      ulsexport prune --model kjv16 --speedup 2 --out kjv16-2x
      ulsexport heal --teacher kjv16 --student kjv16-2x --data kjv-train.txt \\
          --eval-text kjv-valid.txt --out kjv16-2x-healed --device cuda
    """
    from .heal import heal as heal_model

    _echo_healed(heal_model(quiet=ctx.obj["quiet"], **options), as_json)


def _echo_healed(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2))
        return
    record = result.manifest["healing"]
    if record["perplexity_before"] is not None:
        teacher = f" (teacher {record['teacher_perplexity']:.2f})" if record["teacher_perplexity"] else ""
        click.echo(f"perplexity on {record['eval_text']}: {record['perplexity_before']:.2f} before, "
                   f"{record['perplexity_after']:.2f} after{teacher}")
    click.echo(f"healed with {record['loss']} for {record['steps']} steps; "
               f"wrote {result.out_dir} in {result.seconds:.1f} s")


@main.command("compare-plans")
@click.option("--model", "-m", required=True, help="Checkpoint directory (or hub id).")
@click.option("--speedups", default="1.25,1.5,2,3", show_default=True, help="Comma-separated target speedups.")
@click.option("--text", required=True, type=click.Path(path_type=Path),
              help="Evaluation text, one paragraph a line; without --calib, its first half calibrates.")
@_calib_options
@click.option("--strategies", default=",".join(PLAN_STRATEGIES),
              show_default=True, help="Comma-separated strategies to compare.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the Markdown report here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG plot (perplexity vs speedup) here.")
@click.pass_context
def compare_plans_command(ctx, model, speedups, text, calib, calib_tokens, device, strategies, json_path,
                          report, plot):
    """Perplexity after pruning (no fine-tuning) of every strategy at every speedup, side by side.

    Layers are dropped in memory; nothing is written but the reports asked for. Calibration
    (for bi, angular, greedy-ppl) and evaluation text should differ: without --calib, the first
    half of --text's paragraphs calibrates and the second half evaluates.

    \b
    Example:
      ulsexport compare-plans --model tests/fixtures/models/kjv16 --speedups 1.25,1.5,2,3 \\
        --text tests/fixtures/data/kjv-valid.txt --report plans.md --plot plans.png
    """
    from .compare import compare_plans, markdown_report, parse_speedups, write_outputs

    result = compare_plans(model, parse_speedups(speedups), text, calib, calib_tokens=calib_tokens,
                           device=device, quiet=ctx.obj["quiet"],
                           strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()))
    command = "ulsexport " + " ".join(sys.argv[1:])
    write_outputs(result, json_path, report, plot, command)
    click.echo(markdown_report(result))


@main.command()
@click.option("--reference", "-r", required=True, help="The ORIGINAL (full-depth) checkpoint.")
@click.option("--candidate", "-c", required=True, type=click.Path(path_type=Path),
              help="The artifact: a pruned checkpoint or an ONNX export (its ulsexport.json names the kept layers).")
@click.option("--runtime", default="torch", show_default=True,
              help="torch (checkpoints), ort (ONNX exports) or genai (onnxruntime-genai; either ONNX builder).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", help="fp32, fp16 or bf16 [default: the artifact's own, else fp32].")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes to time, comma-separated.")
@click.option("--prompt-len", default=128, show_default=True, help="Prompt tokens for timing.")
@click.option("--new-tokens", default=128, show_default=True, help="Generated tokens for timing.")
@click.option("--runs", default=3, show_default=True, help="Timed runs per setting (median reported).")
@click.option("--warmup", default=1, show_default=True, help="Untimed warm-up runs per setting.")
@click.option("--no-speed", is_flag=True, help="Check parity (and quality) only.")
@click.option("--parity-steps", default=32, show_default=True, help="Greedy steps compared for parity.")
@click.option("--tolerance", type=float, help="Relative logit error allowed [default: fp32 1e-4, fp16 1e-2].")
@click.option("--text", type=click.Path(path_type=Path), help="Held-out text: perplexity of full vs pruned.")
@click.option("--tasks", type=click.Path(path_type=Path), help="JSONL of prompt/reference: BLEU and ROUGE-L.")
@click.option("--reference-artifact", type=click.Path(path_type=Path),
              help="The full model built like the candidate (e.g. its ONNX export) [default: built on the fly].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the Markdown report here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write the PNG plot here.")
@click.pass_context
def validate(ctx, reference, candidate, runtime, device, dtype, batches, prompt_len, new_tokens, runs, warmup,
             no_speed, parity_steps, tolerance, text, tasks, reference_artifact, json_path, report_path, plot_path):
    """Check an artifact's output parity and measure its speedup over the full model.

    Parity: the candidate's greedy run against the pruned checkpoint in PyTorch fp32, step by step.
    Speed: full and pruned model on the same runtime, device and dtype, in this one process.
    Exits 1 when parity fails (the report says at which step and batch row), 2 on bad input.

    \b
    Example:
      ulsexport validate --reference path/to/llama --candidate artifacts/llama-2x/onnx \\
          --runtime ort --device cuda --batch 1,8 --report report.md --json report.json
    """
    from .report import markdown, write_reports
    from .validate import SpeedSettings, validate as run_validation

    speed = None if no_speed else SpeedSettings(tuple(int(b) for b in batches.split(",")), prompt_len,
                                                new_tokens, runs, warmup)
    result = run_validation(reference, candidate, runtime, device, dtype, speed, parity_steps, tolerance, text,
                            tasks, reference_artifact, quiet=ctx.obj["quiet"])
    write_reports(result, json_path, report_path, plot_path)
    click.echo(markdown(result))
    if not result["parity"]["passed"]:
        sys.exit(1)


@main.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory (usually from `ulsexport prune`).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--builder", type=click.Choice(["torch", "genai"]), default="torch", show_default=True,
              help="torch: torch.onnx export, every supported family, loads in onnxruntime and onnxruntime-genai; "
                   "genai: onnxruntime-genai's model builder (fused kernels, fastest on CUDA; fewer families).")
@click.option("--dtype", default="fp32", show_default=True,
              help="fp32, fp16 (meant for cuda; the torch builder's also runs on cpu), int4 (genai builder only).")
@click.option("--device", default="cpu", show_default=True,
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
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def onnx(ctx, model, out, builder, dtype, device, opset, no_optimize, attention, kv_cache, force, as_json):
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
    from .export_onnx import export_onnx, onnx_builder

    if builder == "torch":
        result = export_onnx(model, out, dtype, device, opset, optimize=not no_optimize,
                             attention=attention or "gqa", kv_cache=kv_cache, force=force, quiet=ctx.obj["quiet"])
    else:
        if opset is not None or no_optimize or attention or kv_cache:
            raise UserError("--opset, --no-optimize, --attention and --kv-cache apply to --builder torch only")
        result = onnx_builder(builder)(model, out, dtype, device, force=force, quiet=ctx.obj["quiet"])
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2))
    else:
        layers = ", ".join(f"{i}<-{o}" for i, o in result.manifest["cache_to_original_layer"].items())
        graph = result.manifest.get("optimizations", {}).get("variant")  # the fused graph kept (torch builder)
        click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s" + (f" ({graph} graph)" if graph else "")
                   + f"; cache index<-original layer: {layers}")


@main.command()
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
    from .recipe import load_recipe, run_recipe

    result = run_recipe(load_recipe(recipe, list(overrides)), force=force, quiet=ctx.obj["quiet"],
                        echo=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {result.out_dir}")
    if result.report is not None:
        from .report import markdown

        click.echo(markdown(result.report))
        if not result.report["parity"]["passed"]:
            sys.exit(1)


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
