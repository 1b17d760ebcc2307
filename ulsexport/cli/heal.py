"""`ulsexport heal`: train a pruned model back towards the original."""
from __future__ import annotations

from pathlib import Path

import click

from ..artifact import json_text
from ..heal.train import LOSSES, TRAIN_DTYPES, HealSettings
from .options import quiet_option


@click.command()
@click.option("--teacher", "-t", help="The original model the student was pruned from (optional with --loss lm).")
@click.option("--student", help="The pruned checkpoint to heal. Never modified. (Joint healing: leave it out.)")
@click.option("--speedups", help="Joint healing: one set of weights for several depths, e.g. 2,3 (1 = the full "
                                 "depth). Starts from --teacher, trains each depth in turn; the output holds every "
                                 "layer and records each depth's plan for `prune --speedup` and `onnx --speedups`.")
@click.option("--strategy", default=HealSettings.strategy, show_default=True, help="With --speedups: the plan strategy.")
@click.option("--calib", type=click.Path(path_type=Path), help="With --speedups: calibration text for bi|angular|greedy-ppl.")
@click.option("--data", "-d", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Training text: a .txt file (one document per paragraph), a .jsonl file (a 'text' "
                   "field per line), or a directory of them. Repeat for a mixture.")
@click.option("--data-weights", help="Shares of the --data sources in the mixture, e.g. 3,1 [default: equal].")
@click.option("--teacher-samples", type=int,
              help="Windows the teacher samples to heal on beside --data (unconditional, continuations of your "
                   "documents, chat dialogues through the chat template), cached [default: as many as the run "
                   "draws, at most 4096]; 0 heals on --data alone (the student then forgets other text).")
@click.option("--teacher-weight", type=float, default=HealSettings.teacher_weight, show_default=True,
              help="Share of training windows taken from the teacher's samples.")
@click.option("--sample-temperature", type=float, default=HealSettings.sample_temperature, show_default=True,
              help="The temperature the teacher samples its windows at (lower: closer to its greedy text).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--loss", type=click.Choice(LOSSES), default=HealSettings.loss, show_default=True,
              help="kd: distil the teacher's token distributions; lm: next-token loss on --data; kd+lm: both.")
@click.option("--kd-weight", type=float, default=HealSettings.kd_weight, show_default=True, help="Weight of kd in kd+lm.")
@click.option("--hidden-weight", type=float, default=HealSettings.hidden_weight, show_default=True,
              help="Add hidden-state distillation (kd): this weight times the normalised distance between each "
                   "kept layer's output and the teacher layer's it was.")
@click.option("--temperature", "-T", type=float, default=HealSettings.temperature, show_default=True, help="Distillation temperature.")
@click.option("--steps", type=int, default=HealSettings.steps, show_default=True, help="Optimizer steps.")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps before the cosine decay [default: --steps / 20].")
@click.option("--batch", type=int, default=HealSettings.batch, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=int, default=HealSettings.seq_len, show_default=True, help="Tokens per window.")
@click.option("--lr", type=float, default=HealSettings.lr, show_default=True, help="Peak AdamW learning rate (cosine decay).")
@click.option("--lora-rank", type=int, help="Train LoRA adapters of this rank instead of all weights "
                                            "(merged when saved; needs peft).")
@click.option("--device", help="cpu or cuda [default: cuda when available].")
@click.option("--dtype", type=click.Choice(TRAIN_DTYPES), default=HealSettings.dtype, show_default=True,
              help="bf16: bf16 autocast and a bf16 teacher (trained weights stay fp32).")
@click.option("--eval-text", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text, repeatable (one per domain): the generality table before and after.")
@click.option("--eval-tokens", type=int, default=HealSettings.eval_tokens, show_default=True,
              help="Tokens of each --eval-text scored (from its start).")
@click.option("--eval-samples", type=int, default=HealSettings.eval_samples, show_default=True,
              help="Teacher-sampled windows for the top-1 agreement column (0: none).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in <out>.work/.")
@click.option("--save-every", type=int, default=HealSettings.save_every, show_default=True, help="Checkpoint every N steps.")
@click.option("--seed", type=int, default=HealSettings.seed, show_default=True, help="Seed of the data order.")
@click.option("--force", is_flag=True, help="Replace --out if it exists; discard an earlier run's checkpoints.")
@click.option("--nproc", type=int, help="Heal over N processes of this host with FSDP2 (one per GPU; gloo on "
                                        "the CPU), started through torchrun; the same output as one process.")
@click.option("--json", "as_json", is_flag=True, help="Print the output's manifest as JSON.")
@quiet_option
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
      ulsexport heal --teacher kjv16 --speedups 2,3 --data kjv-train.txt --out kjv16-healed-multi
      ulsexport heal --nproc 4 --teacher llama-70b --student llama-70b-2x --data mine.txt \\
          --dtype bf16 --out llama-70b-2x-healed      # FSDP2 over 4 GPUs
      ulsexport onnx --model kjv16-healed-multi --speedups 2,3 --out kjv16-multi/onnx
    """
    from ..errors import UserError
    from ..heal import heal as heal_model
    from ..plan.compare import parse_speedups

    nproc = options.pop("nproc")
    if nproc is not None:   # this process only launches the ranks, each of which runs this command
        import sys

        from ..heal.distributed import launch

        code = launch(nproc, sys.argv[1:], options["device"])
        if code:
            raise SystemExit(code)
        return

    if options["data_weights"]:
        options["data_weights"] = _numbers(options["data_weights"], "--data-weights")
    options["eval_text"] = list(options["eval_text"]) or None
    options["data"] = list(options["data"])
    if options["speedups"]:
        options["speedups"] = parse_speedups(options["speedups"])
    elif options["student"] is None:
        raise UserError("give --student (the pruned checkpoint to heal), or --speedups for joint healing")
    echo_healed(heal_model(quiet=ctx.obj["quiet"], **options), as_json)


def echo_healed(result, as_json: bool) -> None:
    from ..heal.train import quality_rows
    from ..quality import generality_table

    if as_json:
        click.echo(json_text(result.manifest))
        return
    record = result.manifest["healing"]
    rows = quality_rows(record, result.manifest.get("trained_depths"))
    if rows:
        click.echo(generality_table(rows))
    click.echo(f"healed with {record['loss']} for {record['steps']} steps; "
               f"wrote {result.out_dir} in {result.seconds:.1f} s")


def _numbers(text: str, option: str) -> list[float]:
    from ..errors import UserError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of numbers") from None
