"""CUDA-graph decode against onnxruntime-genai's best setting, in one run, interleaved rounds.

A Llama-7B-shaped model (random fp16 weights made on the GPU), full depth and uls-pruned at 2x and 3x.
Graphs: onnxruntime-genai's builder at every depth, and our torch builder's shared-cache graph at
--torch-depths (its export takes minutes per depth). Runtimes over each graph:

- ours-graph: `--runtime ort` with the decode step captured as a CUDA graph (the default on CUDA), the
  greedy ids chosen in the graph (only they come back), steps queued `QUEUED_STEPS` at a time;
- ours-graph-stepwise: the same decoder, each step's ids read before the next step is launched;
- ours-eager: the same loop uncaptured;
- ours-kernels (--decode-kernels): ours-graph with the MatMuls by weights on ulsexport's DecodeMatMul kernel
  (`ulsexport/runtime/kernels`), the session's own copy of the graph; ours-kernels-eager, that graph uncaptured;
- genai-graph: onnxruntime-genai's loop with its `enable_cuda_graph` (batch 1: it refuses capture above);
- genai-eager: onnxruntime-genai's loop uncaptured.

Parity (PARITY_PAIRS): each captured runtime against the same graph uncaptured, and ours-kernels against
ours-eager (the graph as exported), greedy tokens over --parity-steps and fp16 logits (step by step, logits
kept), and the queued run's tokens. Kernels: CUPTI totals of a few steps of ours-graph at batch 1.
Speed: decode ms
per step (the prompt excluded), each round running every runtime once per (graph, batch); ratios are taken
within a round and their median reported. The weights-bytes floor is the graph's weight bytes over the
copy bandwidth measured in this run (bytes read + written, device to device).

    python benchmarks/cuda_graph_decode.py --workdir /root/w --results $OUT/cuda-graph
    python benchmarks/cuda_graph_decode.py --shape tiny --layers 4 --device cpu --results /tmp/cg   # CPU check
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ulsexport.testing import add_shape_arguments, copy_bandwidth, make_pruned_set, shape_from_args, weight_bytes


def build_artifacts(args) -> dict[str, Path]:
    """(depth-builder) -> artifact folder, each built only if missing."""
    from ulsexport.export import get_builder

    work = Path(args.workdir)
    checkpoints = make_pruned_set(work, shape_from_args(args), device=args.device)
    artifacts = {}
    dtype = "fp16" if args.device == "cuda" else "fp32"
    for builder, depths in (("genai", args.genai_depths), ("torch", args.torch_depths)):
        for depth in filter(None, depths.split(",")):
            out = work / f"{depth}-{builder}"
            if not out.exists():
                start = time.perf_counter()
                get_builder(builder).build(checkpoints[depth], out, dtype, args.device, quiet=True)
                print(f"built {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
            artifacts[f"{depth}-{builder}"] = out
    return artifacts


GRAPH_RUNTIMES = ("ours-graph", "ours-kernels")  # captured: kernel lists of both
PARITY_PAIRS = [("ours-graph", "ours-eager"), ("ours-kernels", "ours-kernels-eager"), ("ours-kernels", "ours-eager")]


def runtimes_for(folder: Path, builder: str, device: str, decode_kernels: bool = False, load_seconds=None) -> dict:
    import copy

    from ulsexport.runtime.ort import OnnxDecoder

    def timed(name, **options):
        start = time.perf_counter()
        out[name] = OnnxDecoder(folder, device, **options)
        if load_seconds is not None:
            load_seconds[name] = time.perf_counter() - start

    out = {}
    timed("ours-eager", cuda_graph=False)
    if device == "cuda":
        timed("ours-graph", cuda_graph=True)
        out["ours-graph-stepwise"] = copy.copy(out["ours-graph"])  # the same session and buffers
        out["ours-graph-stepwise"].queued_steps = 1
        if decode_kernels:
            timed("ours-kernels", cuda_graph=True, decode_kernels=True)
            timed("ours-kernels-eager", cuda_graph=False, decode_kernels=True)
    try:
        from ulsexport.runtime.genai import GenaiRuntime

        out["genai-eager"] = GenaiRuntime(folder, device=device)
        if device == "cuda":
            out["genai-graph"] = GenaiRuntime(folder, device=device, cuda_graph=True)
    except Exception as exc:  # genai missing, or it refuses this graph: recorded, not fatal
        out["genai-error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def prompt(batch: int, length: int, vocab: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


def parity(runtimes: dict, batches, args, vocab: int) -> dict:
    from ulsexport.precision import TOLERANCES
    from ulsexport.validate.parity import compare_runs

    out = {}
    pairs = [(name, reference) for name, reference in PARITY_PAIRS if name in runtimes and reference in runtimes]
    for batch in batches:
        ids, mask = prompt(batch, args.prompt_len, vocab, seed=batch)
        runs = {name: runtimes[name].greedy(ids, mask, args.parity_steps, keep_logits=True)
                for name in dict.fromkeys(n for pair in pairs for n in pair)}
        queued = {name: runtimes[name].greedy(ids, mask, args.parity_steps)  # no logits kept: steps queued
                  for name in dict.fromkeys(name for name, _ in pairs)}
        for name, reference in pairs:
            result = compare_runs(runs[reference], runs[name], TOLERANCES["fp16"])
            result.pop("per_step")
            result["tokens_equal_fraction"] = float((runs[reference].tokens == runs[name].tokens).mean())
            result["queued_tokens_equal"] = bool((queued[name].tokens == runs[name].tokens).all())
            out.setdefault(f"{name} vs {reference}", {})[str(batch)] = result
    return out


def kernels(runtimes: dict, args, vocab: int, steps: int = 9) -> dict:
    """runtime -> the top kernels (name, us per launch, launches per step) of `steps` decode steps at
    batch 1, the prefill's subtracted (testing.decode_kernel_time)."""
    from ulsexport.testing import decode_kernel_time

    out = {}
    for name in (n for n in GRAPH_RUNTIMES if n in runtimes):
        report = decode_kernel_time(runtimes[name], 1, args.prompt_len, steps, vocab, top=14)
        out[name] = [(k["name"][:90], round(1000 * k["ms_per_step"] / k["per_step"], 2), round(k["per_step"], 2))
                     for k in report["top_kernels"] if k["per_step"] > 0]
    return out


def interleaved_rounds(runtimes: dict, batches, args, vocab: int, times: dict) -> None:
    """Round 0 warms every (runtime, batch), captures included; each later round runs every runtime once."""
    for round_ in range(args.rounds + 1):
        for name, group in runtimes.items():
            for batch in batches:
                ids, mask = prompt(batch, args.prompt_len, vocab, seed=100 + batch)
                for runtime_name, runtime in group.items():
                    if runtime_name == "genai-graph" and batch != 1:
                        continue  # genai 0.18 refuses capture above batch 1
                    run = runtime.greedy(ids, mask, args.new_tokens)
                    if round_:
                        key = f"{name}|{runtime_name}|{batch}"
                        times.setdefault(key, []).append(1000 * run.decode_seconds / (args.new_tokens - 1))
        print(f"{', '.join(runtimes)}: round {round_} done", flush=True)


def _release() -> None:
    import gc

    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, "7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default="/root/cuda-graph-work")
    ap.add_argument("--results", required=True)
    ap.add_argument("--genai-depths", default="full,uls2,uls3")
    ap.add_argument("--torch-depths", default="uls2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--parity-steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-kernels", action="store_true", help="add ours-kernels (needs nvcc, or "
                    "ULSEXPORT_KERNELS_LIBRARY)")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    vocab = shape_from_args(args)["vocab_size"]
    report = {"settings": vars(args), "device": _device(args.device), "graphs": {}}
    artifacts = build_artifacts(args)
    if args.device == "cuda":
        report["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
    times: dict[str, list[float]] = {}
    for depth in dict.fromkeys(name.rsplit("-", 1)[0] for name in artifacts):
        # one depth at a time: every session of every runtime holds its own weights and arena
        group = {name: folder for name, folder in artifacts.items() if name.rsplit("-", 1)[0] == depth}
        runtimes = {}
        for name, folder in group.items():
            load_seconds = {}
            runtimes[name] = runtimes_for(folder, name.rsplit("-", 1)[1], args.device, args.decode_kernels,
                                          load_seconds)
            graph = report["graphs"][name] = {
                "weight_bytes": weight_bytes(folder), "load_seconds": load_seconds,
                "cuda_graph_off": getattr(runtimes[name].get("ours-graph"), "cuda_graph_off", None),
                "genai_error": runtimes[name].pop("genai-error", None)}
            graph["parity"] = parity(runtimes[name], [b for b in batches if b <= 8], args, vocab)
            print(f"{name}: parity " + json.dumps({r: {b: p['greedy_tokens_equal'] for b, p in v.items()}
                                                   for r, v in graph["parity"].items()}), flush=True)
            if args.device == "cuda":
                graph["kernels_b1"] = kernels(runtimes[name], args, vocab)
        interleaved_rounds(runtimes, batches, args, vocab, times)
        del runtimes
        _release()
        (results / "cuda-graph-decode.json").write_text(json.dumps({**report, "decode_ms_per_step": times}, indent=2))
    report["decode_ms_per_step"] = times
    report["summary"] = summarize(times, report, batches, args)
    (results / "cuda-graph-decode.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "cuda-graph-decode.md").write_text(markdown(report, batches))
    print(markdown(report, batches))


def summarize(times: dict, report: dict, batches, args) -> dict:
    """Medians, per-round ratios against genai's best setting, depth speedups and the floor."""
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"median_ms": med, "vs_genai_best": {}, "speedup_over_full": {}, "floor": {}, "vs_stepwise": {},
           "kernels_vs_graph": {}}
    for key in times:
        name, runtime, batch = key.split("|")
        if not runtime.startswith("ours"):
            continue
        stepwise = f"{name}|ours-graph-stepwise|{batch}"
        if runtime.startswith("ours-graph") and key != stepwise and stepwise in times:
            out["vs_stepwise"][key] = statistics.median(s / d for d, s in zip(times[key], times[stepwise]))
        graph_key = f"{name}|ours-graph|{batch}"
        if runtime == "ours-kernels" and graph_key in times:
            out["kernels_vs_graph"][key] = statistics.median(g / k for k, g in zip(times[key], times[graph_key]))
        genai_graph = name.replace("-torch", "-genai")
        best = f"{genai_graph}|genai-graph|{batch}" if int(batch) == 1 else f"{genai_graph}|genai-eager|{batch}"
        if best in times:
            ratios = [b / o for o, b in zip(times[key], times[best])]
            out["vs_genai_best"][key] = {"against": best, "median_ratio": statistics.median(ratios),
                                         "min": min(ratios), "max": max(ratios)}
        full = key.replace(name.split("-")[0], "full", 1)
        if full in times and full != key:
            ratios = [f / o for o, f in zip(times[key], times[full])]
            out["speedup_over_full"][key] = statistics.median(ratios)
        bandwidth = report.get("copy_bandwidth_bytes_per_s")
        if bandwidth and batch == "1":
            floor_ms = 1000 * report["graphs"][name]["weight_bytes"] / bandwidth
            out["floor"][key] = {"floor_ms": floor_ms, "fraction_of_floor": floor_ms / med[key]}
    return out


def markdown(report: dict, batches) -> str:
    summary = report["summary"]
    lines = [f"# CUDA-graph decode ({report['device']})", "",
             f"Settings: {json.dumps({k: report['settings'][k] for k in ('shape', 'prompt_len', 'new_tokens', 'rounds', 'parity_steps')})}",
             f"Copy bandwidth measured: {report.get('copy_bandwidth_bytes_per_s', 0) / 1e12:.2f} TB/s (read + write)", "",
             "## Decode ms per step (median of the rounds) and tokens/s", "",
             "| graph | runtime | " + " | ".join(f"b{b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    rows = sorted({tuple(k.split("|")[:2]) for k in summary["median_ms"]})
    for name, runtime in rows:
        cells = []
        for b in batches:
            ms = summary["median_ms"].get(f"{name}|{runtime}|{b}")
            cells.append(f"{ms:.3f} ms ({1000 * b / ms:.0f} tok/s)" if ms else "-")
        lines.append(f"| {name} | {runtime} | " + " | ".join(cells) + " |")
    lines += ["", "## Ours over genai's best (genai-graph at batch 1, genai-eager above; median per-round ratio)", "",
              "| ours | against | ratio (min..max) |", "|---|---|---|"]
    for key, r in sorted(summary["vs_genai_best"].items()):
        lines.append(f"| {key} | {r['against']} | {r['median_ratio']:.3f} ({r['min']:.3f}..{r['max']:.3f}) |")
    lines += ratio_table("Speedup of the pruned graphs over the full graph, same runtime (median per-round ratio)",
                         summary["speedup_over_full"], "speedup", "x")
    lines += ratio_table("Queued steps against the step-by-step captured loop (stepwise ms over queued ms, median "
                         "per-round ratio)", summary["vs_stepwise"])
    lines += ratio_table("ours-kernels against ours-graph (ours-graph ms over ours-kernels ms, median per-round "
                         "ratio)", summary["kernels_vs_graph"])
    lines += ["", "Session load seconds: " + "; ".join(
        f"{name} " + ", ".join(f"{r} {s:.1f}" for r, s in g.get("load_seconds", {}).items())
        for name, g in report["graphs"].items())]
    lines += ["", "## Weight-bytes floor, batch 1", "", "| graph, runtime | floor ms | measured ms | fraction |",
              "|---|---|---|---|"]
    for key, f in sorted(summary["floor"].items()):
        lines.append(f"| {key} | {f['floor_ms']:.3f} | {summary['median_ms'][key]:.3f} | {f['fraction_of_floor']:.2%} |")
    lines += ["", "## Parity: each captured graph against itself uncaptured, and ours-kernels against ours-eager "
              "(fp16 tolerance 1e-2)", "",
              "| graph | runtime | batch | tokens equal | first divergence | max relative logit error | "
              "queued run's tokens equal |", "|---|---|---|---|---|---|---|"]
    for name, graph in report["graphs"].items():
        if graph["cuda_graph_off"]:
            lines.append(f"| {name} | - | - | capture off: {graph['cuda_graph_off']} | | | |")
        for runtime, per_batch in graph["parity"].items():
            for batch, p in per_batch.items():
                div = p["first_divergence"]
                div_text = "none" if div is None else f"step {div['step']} row {div['row']} (near tie: {div['near_tie']})"
                lines.append(f"| {name} | {runtime} | {batch} | {p['greedy_tokens_equal']} over {p['steps_compared']} "
                             f"steps | {div_text} | {p['max_relative_error']:.2e} | {p['queued_tokens_equal']} |")
    lines += ["", "## Top kernels per decode step, batch 1 (CUPTI: us per launch, launches per step)", ""]
    for name, graph in report["graphs"].items():
        for runtime, top in graph.get("kernels_b1", {}).items():
            lines.append(f"- {name} {runtime}: " + "; ".join(f"{k} {us} us x{n}" for k, us, n in top))
    return "\n".join(lines) + "\n"


def ratio_table(title: str, ratios: dict, column: str = "ratio", unit: str = "") -> list[str]:
    """A markdown section: one row per (graph, runtime, batch) key and its ratio."""
    return ["", f"## {title}", "", f"| graph, runtime, batch | {column} |", "|---|---|",
            *(f"| {key} | {v:.3f}{unit} |" for key, v in sorted(ratios.items()))]


def _device(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({platform.machine()})"


if __name__ == "__main__":
    main()
