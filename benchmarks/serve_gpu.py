"""Served decode speed through a real Triton server on one GPU, against the same runtime called directly.

A Llama-7B-shaped model (random fp16 weights made on the GPU), full depth and uls-pruned at 2x and 3x,
built with onnxruntime-genai's builder (its graphs run in our loop: `--runtime ort`, CUDA-graph decode).
One repository serves the three depths as models `full`, `2x`, `3x` (`ulsexport triton`, then
`ulsexport serve`'s TritonServer). Clients: plain HTTP JSON on the generate endpoint, `input_ids` of a
--prompt-len prompt and `max_tokens` --new-tokens, 1, 8 and 32 concurrent clients. Reported per depth and
concurrency: served tokens/s (new tokens over wall time), p50 / p99 request latency; the same runtime
called directly at batch 1 (end to end: prompt and decode); the served speedups of 2x and 3x over full.

    python benchmarks/serve_gpu.py --workdir /root/serve-work --results $OUT/serve [--model-python /root/stubenv/bin/python]

--model-python names the environment the models run in (the Python backend stub of nvidia-pytriton 0.7.0
needs numpy < 2; the GPU image's torch stack needs numpy 2): numpy 1.26, onnxruntime-gpu, tokenizers and
ulsexport, no torch or transformers (the tokenizer.json is read with `tokenizers`). This process, which
builds the artifacts and times the runtime directly, keeps the image's own stack.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from ulsexport.testing import add_shape_arguments, make_pruned_set, shape_from_args

DEPTHS = {"full": "full", "uls2": "2x", "uls3": "3x"}


def request(url: str, ids: list[int], max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"input_ids": ids, "max_tokens": max_tokens}).encode()
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                timeout=600) as response:
        answer = json.loads(response.read())
    out = answer["output_ids"]
    return time.perf_counter() - start, len(out) if isinstance(out, list) else 1


def load(url: str, clients: int, per_client: int, prompts: list[list[int]], max_tokens: int) -> dict:
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(index: int):
        for k in range(per_client):
            try:
                seconds, count = request(url, prompts[(index * per_client + k) % len(prompts)], max_tokens)
                with lock:
                    latencies.append(seconds)
                    tokens.append(count)
            except Exception as exc:  # recorded, not fatal
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": errors, "new_tokens": sum(tokens),
            "wall_s": wall, "tokens_per_s": sum(tokens) / wall if wall else 0.0,
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None}


def main():
    from ulsexport.export import get_builder
    from ulsexport.runtime import open_runtime
    from ulsexport.serve import TritonServer, write_repository

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, "7b")
    ap.add_argument("--workdir", default="/root/serve-work")
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script (--shape tiny)")
    ap.add_argument("--model-python", help="interpreter of the models' environment [default: this one]")
    args = ap.parse_args()
    work, shape = Path(args.workdir), shape_from_args(args)
    args.results.mkdir(parents=True, exist_ok=True)
    checkpoints = make_pruned_set(work, shape, device=args.device)
    dtype = "fp16" if args.device == "cuda" else "fp32"
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "direct": {}, "served": {}}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, shape["vocab_size"], args.prompt_len).tolist() for _ in range(64)]
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "models").mkdir(parents=True)
    for depth, name in DEPTHS.items():
        artifact = work / f"{depth}-genai"
        if not artifact.exists():
            get_builder("genai").build(checkpoints[depth], artifact, dtype, args.device, quiet=True)
        runtime = open_runtime(artifact, "ort", device=args.device)
        ids = np.array(prompts[:1], np.int64)
        runs = [runtime.greedy(ids, np.ones_like(ids), args.new_tokens) for _ in range(4)][1:]
        seconds = statistics.median(r.prefill_seconds + r.decode_seconds for r in runs)
        report["direct"][name] = {"end_to_end_s": seconds, "tokens_per_s": args.new_tokens / seconds,
                                  "cuda_graph": runtime.cuda_graph, "cuda_graph_off": runtime.cuda_graph_off}
        del runtime
        single = work / f"repo-{name}"
        write_repository(artifact, single, name=name, device=args.device, runtime="ort", max_batch=32,
                         max_tokens=args.new_tokens, queue_delay_us=2000, force=True)
        for model in (single / "models").iterdir():
            shutil.move(str(model), repo / "models" / model.name)
        print(f"direct {name}: {report['direct'][name]}", flush=True)
    shutil.copy2(work / "repo-full" / "ulsexport.json", repo / "ulsexport.json")
    with TritonServer(repo, http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2,
                      log_file=work / "tritonserver.log", python=args.model_python) as server:
        server.wait_ready(timeout_s=600)
        for name in DEPTHS.values():
            url = server.generate_url(name)
            request(url, prompts[0], 4)  # warm-up: first captures
            for clients in (int(c) for c in args.clients.split(",")):
                load(url, clients, 1, prompts, args.new_tokens)  # warm the batch sizes this load makes
                result = load(url, clients, max(2, 64 // clients), prompts, args.new_tokens)
                report["served"][f"{name}|{clients}"] = result
                print(f"served {name} x{clients}: {json.dumps({k: v for k, v in result.items() if k != 'errors'})}",
                      flush=True)
        report["server_log_tail"] = server.log_tail(40)
    summary = {}
    for key, result in report["served"].items():
        name, clients = key.split("|")
        full = report["served"].get(f"full|{clients}")
        summary[key] = {"tokens_per_s": result["tokens_per_s"], "p50_s": result["p50_s"], "p99_s": result["p99_s"],
                        "speedup_over_full": result["tokens_per_s"] / full["tokens_per_s"] if full else None}
        if clients == "1":
            direct = report["direct"][name]["end_to_end_s"]
            summary[key]["served_over_direct_latency"] = result["p50_s"] / direct
    report["summary"] = summary
    (args.results / "serve-gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, a check run"
    lines = [f"# Served through Triton ({device}, tritonserver from nvidia-pytriton 0.7.0)", "",
             f"7B-shaped, random fp16, genai-built graphs in our onnxruntime loop (CUDA graphs), prompt "
             f"{args.prompt_len}, max_tokens {args.new_tokens}, HTTP generate, `python benchmarks/serve_gpu.py`.", "",
             "| depth | clients | tokens/s | p50 s | p99 s | speedup over full | p50 / direct (1 client) |",
             "|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        name, clients = key.split("|")
        lines.append(f"| {name} | {clients} | {s['tokens_per_s']:.0f} | {s['p50_s']:.3f} | {s['p99_s']:.3f} | "
                     f"{s['speedup_over_full']:.2f}x | {s.get('served_over_direct_latency', float('nan')):.3f} |")
    lines += ["", "Direct (same runtime in process, batch 1, prompt + decode): " + ", ".join(
        f"{n} {d['end_to_end_s']:.3f} s ({d['tokens_per_s']:.0f} tok/s)" for n, d in report["direct"].items())]
    (args.results / "serve-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
