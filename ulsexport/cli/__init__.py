"""The `ulsexport` command line: a thin layer over the Python API, one module per command."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click

from ..errors import UserError
from .options import Terminated, quiet_option


@contextlib.contextmanager
def _interrupts_as_exceptions():
    """SIGTERM (and SIGINT, where Python's own handler is installed) raise an exception once, so
    context managers unwind and temporary directories go; while an output's final renames run the
    exception waits until they are done (outputs.deliver_interrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ..outputs import deliver_interrupt

    raised = []

    def on_signal(signum, frame):
        if raised:  # already unwinding: let the cleanup finish
            return
        raised.append(signum)
        deliver_interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current is not signal.default_int_handler:
            continue  # SIGINT ignored (a background job) or handled by the embedding program
        previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, with no traceback; Ctrl-C and SIGTERM
    into one line and exit codes 130 and 143, with nothing half-written left behind."""

    def invoke(self, ctx):
        try:
            with _interrupts_as_exceptions():
                return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Terminated:
            click.echo("terminated; nothing half-written was left behind", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left behind", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@quiet_option
@click.version_option(package_name="ulsexport")
@click.pass_context
def main(ctx):
    """Make a language model faster by removing whole decoder layers (Unified Layer Skipping),
    and ship it as a Hugging Face checkpoint or ONNX with a KV cache (onnxruntime, onnxruntime-genai).

    \b
    Typical flow:
      ulsexport plan     --model PATH --speedup 2
      ulsexport prune    --model PATH --speedup 2 --out artifacts/NAME/hf
      ulsexport heal     --teacher PATH --student artifacts/NAME/hf --data train.txt --out artifacts/NAME/healed
      ulsexport onnx     --model artifacts/NAME/hf --out artifacts/NAME/onnx
      ulsexport validate --reference PATH --candidate artifacts/NAME/onnx --runtime ort
      ulsexport triton   --model artifacts/NAME/onnx --out artifacts/NAME/triton
      ulsexport serve    artifacts/NAME/triton

    \b
    Also: several depths over one set of weights (ulsexport onnx --speedups 1,2,3), and from them
    lossless self-speculative decoding (ulsexport generate --speculative 2x); TensorRT engines
    (ulsexport onnx --target tensorrt, then ulsexport engine).
    The whole pipeline from a YAML recipe: ulsexport run recipes/kjv16-demo.yaml
    Choosing layers from data instead of by position: ulsexport compare-plans --help.
    """
    ctx.ensure_object(dict).setdefault("quiet", False)


def _register() -> None:
    from .engine import engine
    from .generate import generate
    from .heal import heal
    from .onnx import onnx
    from .plan import compare_plans_command, plan
    from .prune import prune
    from .run import run
    from .serve import serve, triton
    from .validate import validate

    for command in (plan, prune, heal, compare_plans_command, validate, onnx, generate, engine, triton, serve,
                    run):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
