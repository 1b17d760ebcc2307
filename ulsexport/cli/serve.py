"""`ulsexport triton` (write a Triton model repository) and `ulsexport serve` (run tritonserver over it)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from ..artifact import json_text
from ..serve.repository import TritonSettings
from .options import Terminated, quiet_option


@click.command()
@click.option("--model", "-m", required=True, type=click.Path(path_type=Path),
              help="Artifact to serve: an ONNX export (`ulsexport onnx`), a genai export, or a checkpoint.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Repository directory to write.")
@click.option("--name", help="Model name in URLs [default: artifacts/NAME/onnx -> NAME].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=TritonSettings.device, show_default=True,
              help="Where the runtime decodes (cuda: one GPU per instance).")
@click.option("--runtime", help="ort, genai or torch [default: the artifact's own].")
@click.option("--instances", type=int, default=TritonSettings.instances, show_default=True, help="Model instances (instance_group count).")
@click.option("--max-batch", type=int, default=TritonSettings.max_batch, show_default=True,
              help="Requests decoded as one batch at most (with continuous batching: the slots per depth).")
@click.option("--no-cuda-graph", is_flag=True, help="--runtime ort on cuda: decode without capturing each step as a "
                                                  "CUDA graph (captured by default).")
@click.option("--max-tokens", type=int, help="Largest max_tokens a request may ask for [default: 512, or fewer "
                                             "where the model's positions leave less room].")
@click.option("--default-max-tokens", type=int, default=TritonSettings.default_max_tokens, show_default=True,
              help="max_tokens of a request that sends none.")
@click.option("--queue-delay-us", type=int, default=TritonSettings.queue_delay_us, show_default=True,
              help="How long the dynamic batcher waits for more requests (microseconds).")
@click.option("--batching", type=click.Choice(["auto", "continuous", "static"]), default=TritonSettings.batching, show_default=True,
              help="continuous: one decode engine per model; a request joins the running batch at the next step and "
                   "leaves it at its end (ort over the shared KV cache; on CUDA its steps are captured as CUDA graphs, "
                   "not yet measured on a GPU). static: each batch the dynamic batcher forms runs to its end. auto: "
                   "continuous on the CPU, static on CUDA.")
@click.option("--draft-depth", help="A multi-depth export's pruned depth (e.g. 2x) that drafts for requests sending "
                                    "\"depth\": \"speculative\": the full depth verifies, the tokens are its own.")
@click.option("--draft-tokens", type=int, default=TritonSettings.draft_tokens, show_default=True, help="With --draft-depth: tokens drafted per verify.")
@click.option("--decode-kernels", is_flag=True,
              help="--device cuda, --runtime ort: decode with ulsexport's own CUDA kernels (fp16 exports; built with nvcc "
                   "on the server's first load, needs onnxruntime's headers: ORT_INCLUDE_DIR), as `validate "
                   "--decode-kernels` does.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the repository's manifest as JSON.")
def triton(model, out, name, device, runtime, instances, max_batch, no_cuda_graph, max_tokens, default_max_tokens,
           queue_delay_us, batching, draft_depth, draft_tokens, decode_kernels, force, as_json):
    """Write a Triton Inference Server model repository that serves an artifact.

    It holds a generate model (Python backend, dynamic batching; inputs text_input or input_ids,
    max_tokens; outputs text_output, output_ids) and NAME_stream, the same model in decoupled mode
    (one response per token, for generate_stream), both running the artifact copied beside them
    with ulsexport's runtime; and, for ONNX exports with the concat KV cache, a decoder-step model
    for the onnxruntime backend of Triton's full containers (REPO/onnxruntime, not served by
    `ulsexport serve`).

    \b
    Examples:
      ulsexport triton --model artifacts/llama-2x/onnx --out artifacts/llama-2x/triton
      ulsexport serve artifacts/llama-2x/triton
      curl -s localhost:8000/v2/models/llama-2x/generate -d '{"text_input": "Once upon a time", "max_tokens": 32}'
    """
    settings = TritonSettings(name, device, runtime, instances, max_batch, max_tokens, default_max_tokens,
                              queue_delay_us, no_cuda_graph, batching, draft_depth, draft_tokens, decode_kernels)
    result = settings.write(model, out, force=force)
    manifest = result.manifest
    if as_json:
        click.echo(json_text(manifest))
        return
    served = [m["name"] for m in manifest["models"] if m["served"]]
    click.echo(f"wrote {result.out_dir} in {result.seconds:.1f} s: {', '.join(served)} "
               f"({manifest['runtime']} on {manifest['device']}, batches up to {manifest['max_batch']}, "
               f"max_tokens up to {manifest['max_tokens']})")
    step = manifest["step_model"]
    if step["written"]:
        click.echo(f"decoder-step model for the onnxruntime backend (Triton's full containers, not `ulsexport serve`): "
                   f"{result.out_dir / 'onnxruntime'}")
    else:
        click.echo(f"no decoder-step model: {step['reason']}")
    click.echo(f"serve it: ulsexport serve {result.out_dir}")


@click.command()
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (all three endpoints).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--log-file", type=click.Path(path_type=Path), help="Server log [default: a temporary file, shown].")
@click.option("--ready-timeout", type=float, default=300, show_default=True, help="Seconds to wait for the models.")
@click.option("--python", "python", type=click.Path(path_type=Path, dir_okay=False),
              help="Interpreter of the environment the models run in [default: this one]. It needs numpy<2 (the "
                   "Python backend stub crashes with numpy 2), ulsexport and the artifact's runtime "
                   "(onnxruntime or onnxruntime-gpu); transformers is optional where the artifact has a "
                   "tokenizer.json (read with `tokenizers` then).")
@quiet_option
@click.pass_context
def serve(ctx, repository, host, http_port, grpc_port, metrics_port, log_file, ready_timeout, python):
    """Run Triton Inference Server (the nvidia-pytriton wheel's tritonserver) over a repository
    from `ulsexport triton`, until Ctrl-C or SIGTERM.

    Model control is off: the models of the repository are loaded at start and clients cannot
    load or unload any. Needs: pip install 'ulsexport[triton]'.

    \b
    Examples:
      ulsexport serve artifacts/llama-2x/triton
      ulsexport serve artifacts/llama-2x/triton --http-port 9000 --grpc-port 9001 --metrics-port 9002
      ulsexport serve artifacts/llama-2x/triton --python /opt/serve-env/bin/python
    """
    from ..errors import UserError
    from ..serve.server import TritonServer, available

    why = available()
    if why:
        raise UserError(why)
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, log_file=log_file, python=python)
    if host not in LOOPBACK and not host.startswith("127."):
        click.echo(f"warning: --host {host} makes every endpoint (HTTP and gRPC inference, metrics) reachable from "
                   "the network, unauthenticated: anyone who can reach this machine can run the models; use "
                   "127.0.0.1 (the default) unless a firewall or proxy guards it", err=True)
    signalled = []

    def on_signal(signum, frame):
        if signalled:  # stopping already: a second Ctrl-C or SIGTERM waits for the cleanup
            return
        signalled.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    # SIGINT too: a shell that starts us in the background leaves SIGINT ignored
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start = time.monotonic()
        server.start()
        if not ctx.obj.get("quiet"):
            click.echo(f"starting tritonserver over {server.model_repository} (log: {server.log_path}) ...", err=True)
        server.wait_ready(ready_timeout)
        model = server.models[0]
        click.echo(f"ready in {time.monotonic() - start:.1f} s: {', '.join(server.models)}")
        click.echo(f"  HTTP generate:  {server.generate_url(model)}")
        stream = next((m for m in server.models if m.endswith("_stream")), None)
        if stream:
            click.echo(f"  HTTP stream:    {server.generate_url(stream, stream=True)}")
        click.echo(f"  gRPC:           {server.grpc_address}")
        click.echo(f"  metrics:        {server.metrics_url}")
        click.echo(f"  log:            {server.log_path} (tritonserver pid {server.process.pid})")
        click.echo(f"try: curl -s {server.generate_url(model)} -d '{{\"text_input\": \"Once upon a time\", "
                   f"\"max_tokens\": 32}}'")
        click.echo("Ctrl-C stops the server.")
        while server.poll() is None:
            time.sleep(0.5)
        error = server.failure(f"tritonserver exited (code {server.poll()})")
        server.stop(keep_log=True)
        raise error
    except KeyboardInterrupt:  # Terminated too: the group exits 130 or 143 once the server is stopped
        signalled.append(None)  # from here on, further signals wait for the cleanup
        click.echo("stopping tritonserver ...", err=True)
        code = server.stop()
        click.echo(f"stopped (exit code {code})", err=True)
        raise
    finally:
        signalled.append(None)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


LOOPBACK = ("localhost", "::1", "ip6-localhost")
