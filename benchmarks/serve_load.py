"""Load generator for a Triton server from `ulsexport serve` (issue 32): streams over HTTP generate_stream.

Each request POSTs {"input_ids": [...], "max_tokens": n} to /v2/models/NAME/generate_stream and reads the
server-sent events (one per token) until the stream ends. Prompt lengths, output lengths and the prompts'
token ids (uniform over [--min-token, vocabulary)) are drawn from --seed, so every setting and every server
gets the same requests in the same order. The model may stop a request early at an end-of-sequence token:
only the tokens actually received count.

Load:
- closed loop (--clients 1,8,16): C client threads, each sending its next request when the last one ended,
  --requests per setting (or for --duration seconds);
- open loop (--rate 2,4): requests sent at Poisson arrival times of that mean rate (per second), each on a
  thread of its own, whatever the server's backlog, --requests per setting.

Reported per setting (like vLLM's benchmark_serving): output tokens/s and requests/s over the setting's wall
time (first send to last end), time to first token (send to first event) p50/p99, time per output token
((end - first event) / (tokens - 1), requests of 2 tokens or more) p50/p99, and the mean tokens per request.
--warmup requests go first, one at a time, uncounted.

--serve REPO starts `ulsexport serve REPO` on free ports (its own session; stopped with SIGTERM, then killed,
whatever happens) and measures it; otherwise --url and --model name a running server.

    python benchmarks/serve_load.py --serve /tmp/sb/repo-cont --clients 1,8,16 --requests 60 \\
        --out benchmarks/results/serve-load-cpu --label continuous
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ulsexport.testing import add_section_arguments, cpu_machine, free_ports, save_sections, section_header


# -- the server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(repo: Path, root: Path, ready_s: float = 300, model_python: str | None = None):
    """`ulsexport serve REPO` on free ports (logs under `root`; the models in `model_python`'s environment where
    given); yields (base url, the stream model's name); always stopped: SIGTERM to the CLI, then SIGKILL to its
    process group, and the tritonserver's group killed."""
    http, grpc, metrics = free_ports(3)
    stdout = root / "serve.out"
    with open(stdout, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ulsexport.cli", "serve", str(repo), "--http-port", str(http),
                                    "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                    "--log-file", str(root / "tritonserver.log"),
                                    *(["--python", model_python] if model_python else [])],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_s
        while "Ctrl-C stops the server" not in stdout.read_text():
            if process.poll() is not None:
                raise SystemExit(f"ulsexport serve exited:\n{stdout.read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready in {ready_s} s:\n{stdout.read_text()}")
            time.sleep(0.2)
        stream = re.search(r"HTTP stream:\s+\S+/v2/models/(\S+)/generate_stream", stdout.read_text())
        if not stream:
            raise SystemExit(f"the server names no streaming model:\n{stdout.read_text()}")
        yield f"http://127.0.0.1:{http}", stream.group(1)
    finally:
        server_pid = re.search(r"tritonserver pid (\d+)", stdout.read_text())
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if server_pid:  # never leave the server behind, whatever happened to the CLI
            try:
                os.killpg(int(server_pid.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass


def repo_vocab(repo: Path) -> int:
    for config in sorted(repo.glob("models/*/1/artifact/config.json")):
        vocab = json.loads(config.read_text()).get("vocab_size")
        if vocab:
            return int(vocab)
    raise SystemExit(f"no artifact config.json with vocab_size under {repo}/models; pass --vocab")


# -- requests -----------------------------------------------------------------------------------
def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def make_requests(count: int, seed: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int,
                  min_token: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(*prompt)
        out.append({"input_ids": [rng.randrange(min_token, vocab) for _ in range(n)],
                    "max_tokens": rng.randint(*output)})
    return out


def send(url: str, body: dict, timeout: float) -> dict:
    """One streamed request: its send, first-event and end times (perf_counter) and the tokens received."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    record = {"prompt_tokens": len(body["input_ids"]), "max_tokens": body["max_tokens"], "tokens": 0,
              "first": None, "error": None}
    record["sent"] = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    record["error"] = str(event["error"])
                    break
                ids = event.get("output_ids", [])
                got = len(ids) if isinstance(ids, list) else 1
                if got and record["first"] is None:
                    record["first"] = time.perf_counter()
                record["tokens"] += got
    except (urllib.error.URLError, OSError, ValueError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["end"] = time.perf_counter()
    return record


def closed_loop(url: str, requests: list[dict], clients: int, duration: float | None, timeout: float) -> list[dict]:
    records, lock = [], threading.Lock()
    order = iter(range(len(requests)))
    stop_at = time.perf_counter() + duration if duration else None

    def client():
        while True:
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            with lock:
                i = next(order, None)
            if i is None:
                return
            record = send(url, requests[i], timeout)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def open_loop(url: str, requests: list[dict], rate: float, seed: int, timeout: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, len(requests)))
    records, lock, threads = [], threading.Lock(), []

    def one(i):
        record = send(url, requests[i], timeout)
        with lock:
            records.append(record)

    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    return records


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None and r["first"] is not None]
    errors = [r["error"] for r in records if r["error"] is not None or r["first"] is None]
    if not ok:
        return {"requests": len(records), "completed": 0, "errors": len(errors), "first_errors": errors[:3]}
    wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
    tokens = sum(r["tokens"] for r in ok)
    ttft = np.array([r["first"] - r["sent"] for r in ok])
    tpot = np.array([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1])
    latency = np.array([r["end"] - r["sent"] for r in ok])

    def pct(values, q):
        return float(np.percentile(values, q)) if len(values) else None

    return {"requests": len(records), "completed": len(ok), "errors": len(errors), "first_errors": errors[:3],
            "wall_seconds": wall, "output_tokens": tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
            "asked_tokens": sum(r["max_tokens"] for r in ok), "mean_output_tokens": tokens / len(ok),
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_mean_s": float(ttft.mean()),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
            "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99)}


# -- a run --------------------------------------------------------------------------------------
def measure(args, base: str, model: str, vocab: int) -> list[dict]:
    url = f"{base}/v2/models/{model}/generate_stream"
    settings = ([("closed", int(c)) for c in args.clients.split(",")] if args.clients else []) + \
               ([("open", float(r)) for r in args.rate.split(",")] if args.rate else [])
    count = args.requests if not args.duration else max(args.requests, 100000)
    requests = make_requests(count, args.seed, span(args.prompt_len), span(args.output_len), vocab, args.min_token)
    warm = make_requests(args.warmup, args.seed + 1, span(args.prompt_len), span(args.output_len), vocab,
                         args.min_token)
    for body in warm:
        record = send(url, body, args.timeout)
        if record["error"]:
            raise SystemExit(f"the warm-up request failed: {record['error']}")
    results = []
    for mode, value in settings:
        load = os.getloadavg()[0]
        if mode == "closed":
            records = closed_loop(url, requests, value, args.duration, args.timeout)
        else:
            records = open_loop(url, requests[:args.requests], value, args.seed, args.timeout)
        row = {"load": mode, ("clients" if mode == "closed" else "rate_per_s"): value} | summarize(records)
        row["load_average_1min"] = [load, os.getloadavg()[0]]
        results.append(row)
        if row["completed"]:
            print(f"{mode} {value}: {row['completed']}/{row['requests']} ok, {row['output_tokens_per_s']:.1f} out tok/s, "
                  f"{row['requests_per_s']:.2f} req/s, TTFT p50 {1000 * row['ttft_p50_s']:.1f} ms p99 "
                  f"{1000 * row['ttft_p99_s']:.1f} ms, TPOT p50 {1000 * row['tpot_p50_s']:.1f} ms p99 "
                  f"{1000 * row['tpot_p99_s']:.1f} ms", flush=True)
        else:
            print(f"{mode} {value}: no request completed: {row['first_errors']}", flush=True)
    return results


def ms(value) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def render(report: dict) -> str:
    lines = section_header(
        report, "Serving load on the CPU: continuous vs static batching (issue 32)",
        "Produced by `benchmarks/serve_load.py` (every figure from `serve-load-cpu.json` beside this file). "
        "Streaming HTTP generate_stream requests of random token ids; output tok/s and req/s over each "
        "setting's wall time; TTFT: send to first token event; TPOT: (end - first event) / (tokens - 1) per "
        "request of 2 tokens or more; p50/p99 over the setting's requests; \"out tok/req\": mean tokens "
        "received (the model may stop at EOS before max_tokens). \"load avg\": the machine's 1-minute load "
        "average at the setting's start and end (the server and this client run on the same cores).")
    rows = [(s, r) for s in report["sections"] for r in s["results"]]
    lines += ["| server | load | completed | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
              "TPOT p99 ms | out tok/req | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in rows:
        load = (f"closed, {r['clients']} client{'s' if r['clients'] != 1 else ''}" if r["load"] == "closed"
                else f"open, Poisson {r['rate_per_s']}/s")
        if not r["completed"]:
            lines.append(f"| {s['label']} | {load} | 0/{r['requests']} | - | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {s['label']} | {load} | {r['completed']}/{r['requests']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | "
                     f"{ms(r['tpot_p50_s'])} | {ms(r['tpot_p99_s'])} | {r['mean_output_tokens']:.1f} | "
                     f"{r['load_average_1min'][0]:.2f}, {r['load_average_1min'][1]:.2f} |")
    lines.append("")
    for s in report["sections"]:
        lines += [f"## {s['label']}", "", f"- server: {s['server']}", f"- machine: this machine: {s['machine']}",
                  f"- requests: {s['requests']}", f"- command: `{s['command']}`"]
        if s.get("note"):
            lines.append(f"- note: {s['note']}")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=Path, help="a repository from `ulsexport triton`: serve it for this run")
    ap.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000 (without --serve)")
    ap.add_argument("--model", help="the streaming model's name (NAME_stream) [--serve: the one the server names]")
    ap.add_argument("--vocab", type=int, help="vocabulary size [--serve: the artifact's config.json]")
    ap.add_argument("--min-token", type=int, default=4, help="smallest random token id (skips special ids)")
    ap.add_argument("--clients", help="closed loop: comma-separated client counts, e.g. 1,8,16")
    ap.add_argument("--rate", help="open loop: comma-separated Poisson rates in requests/s, e.g. 2,4")
    ap.add_argument("--requests", type=int, default=60, help="requests per setting")
    ap.add_argument("--duration", type=float, help="closed loop: seconds per setting instead of --requests")
    ap.add_argument("--prompt-len", default="16:64", help="prompt tokens, uniform LOW:HIGH")
    ap.add_argument("--output-len", default="16:128", help="max_tokens, uniform LOW:HIGH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    ap.add_argument("--model-python", help="--serve: the interpreter of the models' environment (`ulsexport serve "
                                           "--python`; a GPU machine's, from benchmarks/stub_env.sh)")
    add_section_arguments(ap, "server")
    args = ap.parse_args()
    section = None
    if not args.render_only:
        if not (args.clients or args.rate):
            ap.error("give --clients and/or --rate")
        section = {"label": args.label, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                   "machine": cpu_machine(), "note": args.note,
                   "requests": f"{args.requests if not args.duration else f'{args.duration} s'} per setting, "
                               f"prompt {args.prompt_len} tokens, max_tokens {args.output_len}, seed {args.seed}, "
                               f"{args.warmup} warm-up"}
        if args.serve:
            repo = args.serve
            manifest = json.loads((repo / "ulsexport.json").read_text())
            section["server"] = (f"`ulsexport serve {repo}` (batching {manifest.get('batching')}, max batch "
                                 f"{manifest.get('max_batch')}, {manifest.get('runtime')} on {manifest.get('device')}, "
                                 f"source {manifest.get('source')})")
            section["repository"] = {k: manifest.get(k) for k in ("source", "batching", "max_batch", "runtime",
                                                                  "device", "max_tokens", "queue_delay_us")}
            vocab = args.vocab or repo_vocab(repo)
            with tempfile.TemporaryDirectory(prefix="serve-load-") as root:
                with serving(repo, Path(root), model_python=args.model_python) as (base, model):
                    section["results"] = measure(args, base, args.model or model, vocab)
        else:
            if not (args.url and args.model and args.vocab):
                ap.error("without --serve, give --url, --model and --vocab")
            section["server"] = f"{args.url}, model {args.model}"
            section["results"] = measure(args, args.url.rstrip("/"), args.model, args.vocab)
    save_sections(args, section, render)


if __name__ == "__main__":
    main()
