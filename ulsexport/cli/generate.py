"""`ulsexport generate`: greedy text from an artifact, at one depth or self-speculatively."""
from __future__ import annotations

import json

import click

from ..runtime import RUNTIMES
from .options import quiet_option


@click.command()
@click.option("--model", "-m", required=True, help="An artifact folder: a checkpoint, an ONNX export, a multi-depth export.")
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--max-tokens", "-n", default=64, show_default=True, help="New tokens at most (EOS stops sooner).")
@click.option("--depth", help="A multi-depth export: decode at this depth (full, 2x, ...) [default: its default graph].")
@click.option("--speculative", metavar="DEPTH",
              help="A multi-depth export: this pruned depth drafts, the full depth verifies; the tokens are the "
                   "full depth's own (batch 1, onnxruntime).")
@click.option("--draft-tokens", "-k", default=4, show_default=True, help="With --speculative: tokens drafted per verify.")
@click.option("--adaptive", is_flag=True,
              help="With --speculative: choose the drafted tokens each round (at most --draft-tokens) from the running "
                   "acceptance rate and the measured draft and verify costs.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)), help="[default: the artifact kind's own]")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--json", "as_json", is_flag=True,
              help="Print ids, text and timing as JSON (with --speculative: acceptance rate, tokens per verify, "
                   "draft and verify seconds).")
@quiet_option
def generate(as_json, **options):
    """Continue a prompt greedily with an artifact.

    \b
    Examples:
      ulsexport generate --model artifacts/kjv16-multi/onnx --prompt "In the beginning" --depth 2x
      ulsexport generate --model artifacts/kjv16-multi/onnx --prompt "In the beginning" \\
          --speculative 2x --draft-tokens 4 --json
    """
    from ..generate import generate as run_generate
    from ..validate import check_device

    check_device(options["device"])
    result = run_generate(options["model"], options["prompt"], options["max_tokens"], options["depth"],
                          options["speculative"], options["draft_tokens"], options["device"], options["runtime"],
                          options["chat"], options["adaptive"])
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(result.text)
    if result.speculative:
        s = result.speculative
        click.echo(f"[{len(result.ids)} tokens in {result.seconds:.3f} s; draft {s['draft']} x{s['draft_tokens']}: "
                   f"acceptance {s['acceptance_rate']:.2f}, {s['tokens_per_verify']:.2f} tokens per verify]", err=True)
