"""The headline benchmark: a Llama-7B-shaped model, full depth and pruned with the uls plan at 2x and
3x, fp16 on one GPU, decode speed through `ulsexport validate` on PyTorch CUDA, onnxruntime CUDA
(our torch-built ONNX) and onnxruntime-genai (its builder), batch 1 and 8, prompt 128, 128 new tokens.

Random weights made on the GPU from a config (nothing downloaded). Stages keep their outputs in
--workdir and are skipped when done, so the run can be split over several calls:

    python benchmarks/gpu_benchmark.py --stages build,torch                    --results $OUT
    python benchmarks/gpu_benchmark.py --stages onnx,ort,genai-torch,profile   --results $OUT
    python benchmarks/gpu_benchmark.py --stages clean-onnx,genai               --results $OUT
    python benchmarks/gpu_benchmark.py --tiny --device cpu --dtype fp32 --results /tmp/b    # check on CPU

Stages: build (random checkpoint, uls prunes), torch (PyTorch), onnx (our torch builder), ort (its
graphs in our onnxruntime loop), genai-torch (its graphs in onnxruntime-genai's loop), profile (op
times of one decode step of its 2x graph), genai (onnxruntime-genai's builder, in genai's loop),
kernels (GPU kernel time and launches of a decode step of whichever artifacts exist at --kernel-depths,
default the 2x ones, via CUPTI).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from ulsexport.testing import SHAPES, add_decode_arguments

SPEEDUPS = (2, 3)
TARGETS = {"2": {"1": 1.93, "8": 1.93}, "3": {"1": 3.0, "8": 3.0}}
# runtime key -> (runtime, artifact suffix): which graphs each timing row runs.
RUNS = {"torch": ("torch", ""), "ort": ("ort", "-onnx"), "genai-torch": ("genai", "-onnx"),
        "genai": ("genai", "-genai")}


def shape(args) -> dict:
    return SHAPES["tiny" if args.tiny else "7b"]


def stage_build(work: Path, args) -> None:
    """The random fp16 checkpoint (full, with a tokenizer: genai's builder wants one) and its uls prunes."""
    from ulsexport.testing import make_pruned_set

    make_pruned_set(work, shape(args), args.device, SPEEDUPS)


def stage_build_artifacts(work: Path, args, builder: str, suffix: str) -> None:
    """Every depth built with one ONNX builder into <depth><suffix>, timed."""
    from ulsexport.export import get_builder

    for name in args.depths.split(","):
        if not (work / f"{name}{suffix}").exists():
            start = time.perf_counter()
            options = {"attention": args.attention, "kv_cache": args.kv_cache} if builder == "torch" else {}
            get_builder(builder).build(work / name, work / f"{name}{suffix}", args.dtype, args.device, quiet=True,
                                       **options)
            _record(args, f"export_seconds.{builder}.{name}", time.perf_counter() - start)


def validate_all(work: Path, args, run: str) -> None:
    from ulsexport.validate import SpeedSettings, validate

    runtime, suffix = RUNS[run]
    settings = SpeedSettings((1, 8), args.prompt_len, args.new_tokens, args.runs, 1)
    full_artifact = None if runtime == "torch" else work / f"full{suffix}"
    for s in SPEEDUPS:
        key = f"{run}.{s}x"
        if key in _results(args):
            continue
        report = validate(work / "full", work / f"uls{s}{suffix}", runtime, args.device, args.dtype, settings,
                          parity_steps=args.parity_steps, reference_artifact=full_artifact, quiet=True)
        _record(args, key, report)
        print(f"{key}: decode speedup " + ", ".join(
            f"b{b} {m['decode_tokens_per_s']:.2f}x" for b, m in report["speedup"]["measured"].items()), flush=True)


def stage_profile(work: Path, args) -> None:
    """onnxruntime's per-op kernel times of decode steps of our 2x graph, batch 1 and 8."""
    from ulsexport.testing import profile_decode

    for batch in (1, 8):
        key = f"profile.uls2-onnx.b{batch}"
        if key in _results(args):
            continue
        totals, steps = profile_decode(work / "uls2-onnx", args.device, batch, args.prompt_len, 8,
                                       shape(args)["vocab_size"])
        _record(args, key, {"steps": steps, "ms_per_step": sum(t["us"] for t in totals.values()) / steps / 1000,
                            "top_ops": {op: {"ms_per_step": t["us"] / steps / 1000, "calls_per_step": t["calls"] / steps}
                                        for op, t in list(totals.items())[:12]}})


def stage_kernels(work: Path, args) -> None:
    """Decode steps of the artifacts at --kernel-depths seen from the GPU (CUPTI): kernel time, wall time, launches."""
    from ulsexport.runtime import open_runtime
    from ulsexport.testing import decode_kernel_time

    vocab = shape(args)["vocab_size"]
    for depth in args.kernel_depths.split(","):
        for run in ("ort", "genai"):
            runtime_name, suffix = RUNS[run]
            key = f"kernels.{depth}{suffix}.{runtime_name}"
            if key in _results(args) or not (work / f"{depth}{suffix}").exists():
                continue
            folder = work / f"{depth}{suffix}"
            runtime = open_runtime(folder, runtime_name, args.dtype, args.device)
            try:  # CUPTI may be missing: record why, and let the later stages run
                _record(args, key, [decode_kernel_time(runtime, b, args.prompt_len, 16, vocab, folder=folder)
                                    for b in (1, 8)])
            except Exception as exc:
                _record(args, f"kernel-error.{depth}{suffix}", f"{type(exc).__name__}: {exc}"[:300])
            del runtime


def _results(args) -> dict:
    path = args.results / "gpu_benchmark.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(args, key: str, value) -> None:
    results = _results(args)
    results[key] = value
    results["device"] = _device(args.device)
    (args.results / "gpu_benchmark.json").write_text(json.dumps(results, indent=2))
    (args.results / "gpu_benchmark.md").write_text(markdown(results, args))


def _device(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}"


def markdown(results: dict, args) -> str:
    shape = "tiny test shape" if args.tiny else "Llama-7B-shaped (32 layers, hidden 4096, GQA 32/8, vocab 32000)"
    lines = [f"# GPU benchmark: {shape}, {args.dtype}", "",
             f"Device: {results.get('device')}. Prompt {args.prompt_len}, {args.new_tokens} new tokens, median of "
             f"{args.runs} runs after 1 warm-up. Random weights. Command: `python benchmarks/gpu_benchmark.py`; "
             f"torch builder's attention fusion: {args.attention}.", "",
             "| runtime | plan | kept | batch | full decode tok/s | pruned decode tok/s | decode speedup | target | "
             "cost-model prediction | parity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, report in sorted(results.items()):
        if not isinstance(report, dict) or "speedup" not in report:
            continue
        runtime, plan = key.split(".")
        parity = report["parity"]
        parity_text = f"{'pass' if parity['passed'] else 'FAIL'} ({parity['max_relative_error']:.1e}, tokens " + (
            f"equal over {parity['new_tokens']}" if parity["greedy_tokens_equal"] else
            f"part at step {parity['first_divergence']['step']} of {parity['new_tokens']}"
            + (" at a near tie" if parity["first_divergence"].get("near_tie") else "")) + ")"
        for batch, measured in report["speedup"]["measured"].items():
            full = report["speed"]["full"][batch]["decode_tokens_per_s"]["median"]
            pruned = report["speed"]["pruned"][batch]["decode_tokens_per_s"]["median"]
            lines.append(f"| {runtime} | uls {plan} | {len(report['kept'])} | {batch} | {full:.1f} | {pruned:.1f} | "
                         f"{measured['decode_tokens_per_s']:.2f}x | {TARGETS[plan[:-1]][batch]}x | "
                         f"{report['plan']['predicted_speedup']['cost_model']:.2f}x | {parity_text} |")
    lines += _builder_comparison(results)
    for key, profile in sorted((k, v) for k, v in results.items() if k.startswith("profile.")):
        lines += ["", f"Decode-step kernel time of our 2x graph ({key.rsplit('.', 1)[1]}): "
                  f"{profile['ms_per_step']:.2f} ms; top op types: " + ", ".join(
                      f"{op} {t['ms_per_step']:.2f} ms ({t['calls_per_step']:.0f} calls)"
                      for op, t in list(profile["top_ops"].items())[:8])]
    for key, rows in sorted((k, v) for k, v in results.items() if k.startswith("kernels.")):
        lines += ["", f"Decode step of {key.split('.', 1)[1]} seen from the GPU (CUPTI): " + "; ".join(
            f"batch {r['batch']}: wall {r['wall_ms_per_step']:.2f} ms, kernels {r['kernel_ms_per_step']:.2f} ms, "
            f"{r['kernels_per_step']:.0f} launches" for r in rows)]
    exports = {k: v for k, v in results.items() if k.startswith("export_seconds")}
    if exports:
        lines += ["", "Export times: " + ", ".join(f"{k.split('.', 1)[1]} {v:.0f} s" for k, v in sorted(exports.items()))]
    return "\n".join(lines) + "\n"


def _builder_comparison(results: dict) -> list[str]:
    """Decode tokens/s of every timed runtime beside onnxruntime-genai's builder, same depth and batch."""
    if not any(k.startswith("genai.") for k in results):
        return []
    lines = ["", "Decode tokens/s by artifact, and against onnxruntime-genai's builder (genai) at the same depth "
             "and batch (full depth as timed in the 2x run):", "",
             "| depth | batch | " + " | ".join(RUNS) + " | " + " | ".join(f"{r} / genai" for r in RUNS if r != "genai") + " |",
             "|---|---|" + "---|" * (2 * len(RUNS) - 1)]
    for depth, run_key, side in (("full", "2x", "full"), ("2x", "2x", "pruned"), ("3x", "3x", "pruned")):
        for batch in ("1", "8"):
            values = {}
            for run in RUNS:
                report = results.get(f"{run}.{run_key}")
                if report and "speed" in report:
                    values[run] = report["speed"][side][batch]["decode_tokens_per_s"]["median"]
            cells = [f"{values[r]:.1f}" if r in values else "-" for r in RUNS]
            ratios = [f"{values[r] / values['genai']:.2f}" if r in values and "genai" in values else "-"
                      for r in RUNS if r != "genai"]
            lines.append(f"| {depth} | {batch} | " + " | ".join(cells + ratios) + " |")
    return lines


STAGES = {
    "build": stage_build,
    "torch": lambda work, args: validate_all(work, args, "torch"),
    "onnx": lambda work, args: stage_build_artifacts(work, args, "torch", "-onnx"),
    "ort": lambda work, args: validate_all(work, args, "ort"),
    "genai-torch": lambda work, args: validate_all(work, args, "genai-torch"),
    "profile": stage_profile,
    "kernels": stage_kernels,
    "genai": lambda work, args: (stage_build_artifacts(work, args, "genai", "-genai"),
                                 validate_all(work, args, "genai")),
    "clean-onnx": lambda work, args: [shutil.rmtree(p) for p in work.glob("*-onnx")],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="build,torch,onnx,ort,genai-torch,profile,clean-onnx,genai")
    ap.add_argument("--depths", default=",".join(["full", *(f"uls{s}" for s in SPEEDUPS)]),
                    help="which checkpoints the artifact stages build, in this order")
    ap.add_argument("--attention", default="gqa", choices=["gqa", "mha"],
                    help="the fused attention of the torch builder's graphs (ulsexport onnx --attention)")
    ap.add_argument("--kernel-depths", default="uls2", help="the depths the kernels stage looks at")
    ap.add_argument("--kv-cache", choices=["shared", "concat"],
                    help="the torch builder's KV cache layout (ulsexport onnx --kv-cache) [default: its own]")
    ap.add_argument("--workdir", type=Path, default=Path("/root/bench"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    add_decode_arguments(ap)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on CPU")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parity-steps", type=int, default=64)
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        start = time.perf_counter()
        try:  # one failing stage is recorded, and the later ones still run
            STAGES[stage](args.workdir, args)
        except Exception as exc:
            _record(args, f"stage-error.{stage}", f"{type(exc).__name__}: {exc}"[:500])
        print(f"stage {stage}: {time.perf_counter() - start:.0f} s", flush=True)
    print((args.results / "gpu_benchmark.md").read_text() if (args.results / "gpu_benchmark.md").exists() else "")


if __name__ == "__main__":
    main()
