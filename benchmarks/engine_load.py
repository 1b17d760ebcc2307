"""Continuous batching under load, in one process (issue 32): ulsexport's decode engine against
onnxruntime-genai's Engine over the same checkpoint, and our runtime's own fixed batch as the ceiling.

A random Llama of --shape/--layers (fp16 on CUDA, fp32 on the CPU) is made in --workdir with its uls prunes
at --speedups, and built twice: our torch builder's shared-cache export of every depth (run by
`runtime.decode_engine.DecodeEngine`, the engine behind `ulsexport triton` and `serve`), and the full depth
by genai's builder (on CUDA with its paged attention and a dynamic batch of the largest client count, the
build genai's Engine is made for; on the CPU its static cache, whatever batch its Engine allows there).

For each system and each client count N (--clients), a closed loop: N clients, each sending its next
request as soon as its last one finished, --requests-per-client each, every request a random
--prompt-len-token prompt asking for exactly --new-tokens greedy tokens (no early stop). Reported per
(system, depth, N), by serve_load.py's `summarize` (the served figures' twin): output tokens/s over the
loop's wall time, time to first token and time per output token (p50, p99). `fixed` is `runtime.greedy` over
one batch of N prompts (prefill included), on the same runtime as the engine: the throughput our runtime
reaches when N requests arrive together and leave together, which the engine should approach.
Systems and client counts run interleaved over --rounds, so drift hits them alike; the medians are reported.

    python benchmarks/engine_load.py --shape 7b --layers 32 --device cuda --clients 1,32,64 --out RESULTS/engine-load
    python benchmarks/engine_load.py --shape tiny --vocab 512 --device cpu --clients 1,4 --new-tokens 32 --out /tmp/engine-load

The engine runs in this loop's thread (no server): served figures, Triton's overhead included, come from
`benchmarks/serve_load.py` against `ulsexport serve`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from serve_load import summarize
from ulsexport.testing import add_shape_arguments, make_pruned_set, shape_from_args


def build(args, shape: dict) -> tuple[dict[str, Path], Path | None]:
    """Our export of each depth and genai's build of the full depth (None without --genai), made if missing."""
    from ulsexport.export import get_builder
    from ulsexport.export.genai import build_genai

    work = Path(args.workdir) / f"{args.shape}-{shape['num_hidden_layers']}-{shape['vocab_size']}"
    dtype = "fp16" if args.device == "cuda" else "fp32"
    # a tokenizer that round-trips text, so that serving_session.sh can serve these exports with `ulsexport triton`
    checkpoints = make_pruned_set(work, shape, args.device, [int(s) for s in args.speedups.split(",") if s != "1"],
                                  tokenizer="bytes")
    ours = {}
    for name, checkpoint in checkpoints.items():
        ours[name] = work / f"{name}-ours"
        if not (ours[name] / "ulsexport.json").is_file():
            get_builder("torch").build(checkpoint, ours[name], dtype, args.device, quiet=True)
    genai = None
    if args.genai:
        genai = work / "full-genai"
        if not (genai / "ulsexport.json").is_file():
            extra = ("use_paged_attention=true", f"max_batch_size={max(clients(args))}") if args.device == "cuda" else ()
            build_genai(checkpoints["full"], genai, dtype, args.device, quiet=True, extra_options=extra)
    return ours, genai


def clients(args) -> list[int]:
    return [int(c) for c in args.clients.split(",")]


def prompts_for(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, length)] for _ in range(count)]


def record(prompt: list[int], max_tokens: int, sent: float, first: float | None, end: float, tokens: int) -> dict:
    """One request in the form serve_load.summarize reads (the served figures' twin)."""
    return {"prompt_tokens": len(prompt), "max_tokens": max_tokens, "sent": sent, "first": first, "end": end,
            "tokens": tokens, "error": None}


def ours_loop(engine, prompts: list[list[int]], n_clients: int, per_client: int, new_tokens: int) -> dict:
    """Closed loop over our DecodeEngine, stepped in this thread."""
    from ulsexport.runtime.decode_engine import Request

    queue = iter(prompts)
    left = {c: per_client for c in range(n_clients)}
    live, records = [], []

    def submit(client):
        left[client] -= 1
        request = engine.add(Request(next(queue), max_tokens=new_tokens))
        live.append((client, request))

    for client in range(n_clients):
        submit(client)
    while live:
        engine.step()
        for client, request in [item for item in live if item[1].done]:
            live.remove((client, request))
            records.append(record(request.prompt, new_tokens, request.arrived, request.first_token_at,
                                  request.finished_at, len(request.tokens)))
            if left[client]:
                submit(client)
    return summarize(records)


def genai_loop(engine, prompts: list[list[int]], n_clients: int, per_client: int, new_tokens: int) -> dict:
    """Closed loop over onnxruntime-genai's Engine (its `run` steps it and fills an event buffer)."""
    import onnxruntime_genai as og

    finished_flag = int(og.EngineEventFlags.TURN_FINISHED)
    queue = iter(prompts)
    left = {c: per_client for c in range(n_clients)}
    live, records = {}, []
    buffer = engine.create_event_buffer(4 * max(n_clients, 1) + 16)

    def submit(client):
        left[client] -= 1
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(new_tokens)
        options.set_min_generated_tokens(new_tokens)   # no early stop at an end-of-sequence id
        prompt, arrived = next(queue), time.perf_counter()
        request.begin_turn(np.array(prompt, np.int32), options)
        live[id(request)] = {"client": client, "request": request, "prompt": prompt, "arrived": arrived,
                             "first": None, "tokens": 0}

    for client in range(n_clients):
        submit(client)
    while live:
        engine.run(buffer)
        now = time.perf_counter()
        for event in buffer:
            entry = live.get(id(event.request))
            if entry is None:
                continue
            if int(event.flags) & int(og.EngineEventFlags.TOKEN):
                entry["tokens"] += 1
                entry["first"] = entry["first"] or now
            if int(event.flags) & finished_flag or int(event.flags) & int(og.EngineEventFlags.FAILED):
                if int(event.flags) & int(og.EngineEventFlags.FAILED):
                    raise RuntimeError(f"genai's Engine failed a request: {event.error_code}")
                del live[id(event.request)]
                records.append(record(entry["prompt"], new_tokens, entry["arrived"], entry["first"], now,
                                      entry["tokens"]))
                entry["request"].close()
                if left[entry["client"]]:
                    submit(entry["client"])
    return summarize(records)


def fixed_batch(runtime, prompts: list[list[int]], n: int, new_tokens: int) -> dict:
    ids = np.array(prompts[:n], np.int64)
    start = time.perf_counter()
    runtime.greedy(ids, np.ones_like(ids), new_tokens)
    wall = time.perf_counter() - start
    return {"requests": n, "output_tokens": n * new_tokens, "wall_seconds": wall, "output_tokens_per_s": n * new_tokens / wall}


def main():
    from ulsexport.runtime import open_runtime
    from ulsexport.runtime.decode_engine import DecodeEngine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, "7b")
    ap.add_argument("--workdir", default="/root/engine-load")
    ap.add_argument("--device", default="cuda", help="cuda; cpu to check the script")
    ap.add_argument("--speedups", default="1,2,3", help="depths of ours (genai: the full depth)")
    ap.add_argument("--clients", default="1,32,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-genai", dest="genai", action="store_false", help="leave out genai's Engine")
    ap.add_argument("--out", type=Path, required=True, help="NAME: writes NAME.json and NAME.md")
    args = ap.parse_args()
    shape = shape_from_args(args)
    ours_exports, genai_build = build(args, shape)
    counts = clients(args)
    capacity = args.prompt_len + args.new_tokens
    systems = {}   # "system|depth" -> (kind, what runs it)
    for depth, folder in ours_exports.items():   # one copy of the weights: the engine binds buffers of its own
        runtime = open_runtime(folder, "ort", None, args.device)
        systems[f"ours-engine|{depth}"] = ("engine", DecodeEngine(runtime, max(counts), capacity))
        systems[f"ours-fixed|{depth}"] = ("fixed", runtime)
    genai_batch, genai_error = None, None
    if genai_build is not None:
        try:
            import onnxruntime_genai as og

            engine = og.Engine(og.Model(str(genai_build)))
            genai_batch = engine.get_capabilities().configured_max_batch_size
            systems["genai-engine|full"] = ("genai", engine)
        except Exception as exc:   # measured without it, and the report says why
            genai_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    total = max(counts) * args.requests_per_client
    prompts = prompts_for(shape["vocab_size"], total, args.prompt_len, 0)
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds + 1):   # round 0 warms up (captures every batch size), untimed
        for n in counts:
            for name, (kind, system) in list(systems.items()):
                if kind == "engine":
                    result = ours_loop(system, prompts, n, args.requests_per_client, args.new_tokens)
                elif kind == "genai":
                    try:
                        result = genai_loop(system, prompts, n, args.requests_per_client, args.new_tokens)
                    except Exception as exc:   # genai's Engine is the peer, not the subject: go on without it
                        genai_error = f"{n} clients: {type(exc).__name__}: {str(exc)[:300]}"
                        del systems[name]
                        continue
                else:
                    result = fixed_batch(system, prompts, n, args.new_tokens)
                if round_:
                    results.setdefault(f"{name}|{n}", []).append(result)
        print(f"round {round_} done", flush=True)
    rows = []
    for key, runs in results.items():
        system, depth, n = key.split("|")
        row = {"system": system, "depth": depth, "clients": int(n)}
        for field, value in runs[0].items():
            values = [r[field] for r in runs if isinstance(r[field], (int, float))]
            row[field] = statistics.median(values) if values else value
        rows.append(row)
    device = "CPU (a check of the script)"
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    report = {"device": device, "settings": {k: str(v) for k, v in vars(args).items()}, "shape": shape,
              "genai_configured_max_batch_size": genai_batch, "genai_error": genai_error, "rows": rows, "runs": results}
    save(report, args.out)


def save(report: dict, out: Path) -> None:
    s = report["settings"]
    by = {(r["system"], r["depth"], r["clients"]): r for r in report["rows"]}
    lines = [f"# Continuous batching under a closed-loop load, in one process ({report['device']})", "",
             f"- model: random Llama, hidden {report['shape']['hidden_size']}, {report['shape']['num_hidden_layers']} "
             f"layers; prompts {s['prompt_len']} random tokens, {s['new_tokens']} new tokens each, "
             f"{s['requests_per_client']} requests per client; medians of {s['rounds']} interleaved rounds",
             f"- genai's Engine: its own build of the full depth (batch up to {report['genai_configured_max_batch_size']})"
             + (f"; FAILED: {report['genai_error']}" if report.get("genai_error") else ""),
             "", "| system | depth | clients | tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | vs fixed batch | vs genai |",
             "|---|---|---|---|---|---|---|---|"]

    def ms(v):
        return "-" if v is None else f"{1000 * v:.1f}"

    for r in sorted(report["rows"], key=lambda r: (r["depth"], r["clients"], r["system"])):
        fixed = by.get(("ours-fixed", r["depth"], r["clients"]))
        genai = by.get(("genai-engine", "full", r["clients"])) if r["depth"] == "full" else None
        lines.append(f"| {r['system']} | {r['depth']} | {r['clients']} | {r['output_tokens_per_s']:.0f} | "
                     f"{ms(r.get('ttft_p50_s'))} / {ms(r.get('ttft_p99_s'))} | {ms(r.get('tpot_p50_s'))} / {ms(r.get('tpot_p99_s'))} | "
                     f"{r['output_tokens_per_s'] / fixed['output_tokens_per_s']:.2f}x | "
                     + (f"{r['output_tokens_per_s'] / genai['output_tokens_per_s']:.2f}x |" if genai else "- |"))
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
