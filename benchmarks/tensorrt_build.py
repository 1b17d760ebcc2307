"""TensorRT engine builds on the GPU machine, recorded as they happened (issue 23).

For each model: the standard-ops ONNX export (`ulsexport onnx --target tensorrt`), the TensorRT for
RTX build through `ulsexport engine` (parse result, unsupported nodes, build seconds, engine bytes),
then one attempt to load the engine, its outcome and the library's messages kept verbatim. On
compute capability 9.0 (H100/H200) TensorRT for RTX refuses to load its engines: that refusal is
the expected record. Only where an engine does load are greedy tokens run and compared with
onnxruntime (CPU) on the same graph; nothing is ever reported as run that did not run.

Models: the tiny test families (--families, fp32, exported on CPU) and a Llama-7B-shaped model
(hidden 4096, intermediate 11008, 32 heads, 8 kv heads, vocab 32000, 4096 positions; --layers deep,
default 32) pruned at 2x with the uls plan, random fp16 weights made on the GPU, exported fp16 on
cuda where onnxruntime has the CUDA provider (the export's parity check runs there) and on the CPU
otherwise (the device image's onnxruntime is CPU-only unless onnxruntime-gpu is carried).

    python benchmarks/tensorrt_build.py --results $OUT/trt                      # tiny families + 7B 2x
    python benchmarks/tensorrt_build.py --results /tmp/t --stages tiny          # here: says no library

Results (written after every model, so a cut-off run keeps what it did): RESULTS/tensorrt-build.json
and RESULTS/tensorrt-build.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
import traceback
from pathlib import Path

from ulsexport.testing import SEVEN_B

START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {text}", flush=True)


def environment(lib_name: str) -> dict:
    import torch

    from ulsexport.engine.library import load_library

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        facts.update(device=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    for name in ("onnx", "onnxruntime", "transformers"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            facts[name] = f"not importable: {exc}"
    try:
        lib, trt = load_library(lib_name)
        facts.update(library=lib.name, library_module=lib.module, library_version=lib.version(trt),
                     library_runs_on=list(lib.runs_on or []))
    except Exception as exc:  # noqa: BLE001
        facts["library_error"] = str(exc)
    return facts


def try_load(engine_dir: Path, lib_name: str) -> dict:
    """One attempt to load the engine: the validity check where the library has one, then
    deserialize_cuda_engine; the library's messages kept verbatim."""
    from ulsexport.engine.library import load_library

    _, trt = load_library(lib_name)

    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages = []

        def log(self, severity, msg):
            self.messages.append(f"{severity}: {msg}")
            print(f"    [trt] {severity}: {msg}", flush=True)

    logger = Capture()
    runtime = trt.Runtime(logger)
    plan = (engine_dir / "model.plan").read_bytes()
    record = {}
    if hasattr(runtime, "get_engine_validity"):
        try:
            validity, diagnostics = runtime.get_engine_validity(plan)
            record["validity"] = {"result": str(validity), "diagnostics": str(diagnostics)}
        except Exception as exc:  # noqa: BLE001
            record["validity"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        engine = runtime.deserialize_cuda_engine(plan)
        record["deserialized"] = engine is not None
    except Exception as exc:  # noqa: BLE001
        record["deserialized"], record["exception"] = False, f"{type(exc).__name__}: {exc}"
        engine = None
    record["messages"] = logger.messages
    del engine, runtime
    return record


def try_run(engine_dir: Path, onnx_dir: Path, steps: int = 4) -> dict:
    """Greedy tokens through the engine vs onnxruntime on the CPU over the same graph (loaded engines only)."""
    import numpy as np

    from ulsexport.runtime.ort import OnnxDecoder
    from ulsexport.runtime.tensorrt import TensorrtRuntime

    vocab = json.loads((onnx_dir / "ulsexport.json").read_text())["onnx"]["io_shapes"]["logits"][-1]
    ids = np.random.default_rng(0).integers(3, vocab, (2, 8))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    run = TensorrtRuntime(engine_dir).greedy(ids, mask, steps)
    expected = OnnxDecoder(onnx_dir).greedy(ids, mask, steps).tokens
    return {"executed": True, "tokens": run.tokens.tolist(), "ort_tokens": expected.tolist(),
            "tokens_match": bool((run.tokens == expected).all()),
            "decode_seconds": run.decode_seconds, "prefill_seconds": run.prefill_seconds}


def one_model(name: str, checkpoint: Path, work: Path, args, dtype: str, device: str) -> dict:
    from ulsexport.engine import build_engine, standard_ops_check
    from ulsexport.engine.onnx_target import export_standard_onnx
    from ulsexport.errors import UserError

    record = {"model": name, "dtype": dtype, "export_device": device}
    onnx_dir, engine_dir = work / f"{name}-onnx-trt", work / f"{name}-trt"
    say(f"{name}: export ({dtype} on {device})")
    try:
        result = export_standard_onnx(checkpoint, onnx_dir, dtype, device, force=True, quiet=True)
    except Exception as exc:  # noqa: BLE001  recorded, not hidden
        record["export_error"] = f"{type(exc).__name__}: {exc}"
        say(f"{name}: export failed: {record['export_error']}")
        return record
    onnx = result.manifest["onnx"]
    record.update(export_seconds=round(result.seconds, 1), layers=len(result.manifest["cache_to_original_layer"]),
                  kept=result.manifest.get("kept"), non_standard_ops=standard_ops_check(onnx_dir / onnx["file"]),
                  onnx_bytes=sum(p.stat().st_size for p in onnx_dir.glob("model.onnx*")))
    say(f"{name}: exported in {record['export_seconds']} s, {record['layers']} layers, "
        f"{record['onnx_bytes'] / 1e6:.0f} MB; build with {args.library}")
    try:
        import torch

        torch.cuda.empty_cache()
        built = build_engine(onnx_dir, engine_dir, batch=args.batch, max_seq=args.max_seq, library=args.library,
                             force=True, quiet=False)
    except UserError as exc:  # a parser refusal names the nodes
        record.update(parsed="refused" if "ONNX parser refused" in str(exc) else "not reached", build_error=str(exc))
        say(f"{name}: build refused: {exc}")
        return record
    except Exception as exc:  # noqa: BLE001
        record.update(build_error=f"{type(exc).__name__}: {exc}", build_traceback=traceback.format_exc()[-2000:])
        say(f"{name}: build failed: {record['build_error']}")
        return record
    engine = built.manifest["engine"]
    record.update(parsed="parsed, no unsupported node", unsupported_nodes=[], build_seconds=engine["build_seconds"],
                  engine_bytes=engine["engine_bytes"], precision=engine["precision"], profiles=len(engine["profiles"]),
                  library_version=engine["version"], built_on=engine["built_on"], runs_on=engine["runs_on"])
    say(f"{name}: built in {engine['build_seconds']:.1f} s, {engine['engine_bytes'] / 1e6:.1f} MB; loading it")
    record["load"] = try_load(engine_dir, args.library)
    if record["load"].get("deserialized"):
        try:
            record["run"] = try_run(engine_dir, onnx_dir)
        except Exception as exc:  # noqa: BLE001
            record["run"] = {"executed": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        record["run"] = {"executed": False, "why": "the engine did not load (messages above, verbatim)"}
    say(f"{name}: loaded={record['load'].get('deserialized')} executed={record['run'].get('executed')}")
    if not args.keep:
        shutil.rmtree(engine_dir, ignore_errors=True)
        if name.startswith("7b"):
            shutil.rmtree(onnx_dir, ignore_errors=True)
    return record


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# TensorRT engine builds (issue 23)", "",
        f"Device: {env.get('device', 'no CUDA device')} (compute capability {env.get('compute_capability', '-')}); "
        f"library: {env.get('library', '-')} {env.get('library_version', env.get('library_error', ''))} "
        f"(`{env.get('library_module', '-')}`), whose engines run on compute capability "
        f"{' '.join(env.get('library_runs_on', [])) or '-'}; torch {env['torch']}, onnx {env.get('onnx')}, "
        f"onnxruntime {env.get('onnxruntime')}. Batch profiles {results['batch']}, "
        f"{results['max_seq'] or 'min(4096, the model' + chr(39) + 's)'} positions.", "",
        "| model | layers | dtype | export on | non-standard ops | parse | build s | engine MB | loaded | executed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["models"]:
        load, run = r.get("load") or {}, r.get("run") or {}
        foreign = ", ".join(r["non_standard_ops"]) or "none" if "non_standard_ops" in r else "-"
        parse = r.get("parsed", "export failed" if "export_error" in r else "-")
        built = "engine_bytes" in r
        cells = [r["model"], r.get("layers", "-"), r["dtype"], r["export_device"], foreign, parse,
                 r["build_seconds"] if built else "-", f"{r['engine_bytes'] / 1e6:.2f}" if built else "-",
                 ("yes" if load.get("deserialized") else "no") if built else "-",
                 "yes" if run.get("executed") else "no"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## What the library said on loading (verbatim)", ""]
    for r in results["models"]:
        for key in ("export_error", "build_error"):
            if key in r:
                lines.append(f"- {r['model']}: {key.replace('_', ' ')}: `{r[key]}`")
        load = r.get("load")
        if load:
            said = load.get("messages") or [load.get("exception", "(no message)")]
            validity = load.get("validity")
            lines.append(f"- {r['model']}: " + (f"validity {validity}; " if validity else "") +
                         "; ".join(f"`{m}`" for m in said))
        run = r.get("run") or {}
        if run.get("executed"):
            lines.append(f"  - ran: greedy tokens {'match' if run['tokens_match'] else 'DIFFER from'} onnxruntime's")
    executed = [r["model"] for r in results["models"] if (r.get("run") or {}).get("executed")]
    lines += ["", ("Engines executed: " + ", ".join(executed)) if executed else
              "No TensorRT engine was executed in this run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tensorrt-build"))
    ap.add_argument("--stages", default="tiny,7b", help="tiny, 7b or both")
    ap.add_argument("--families", default="llama,qwen3,gemma2", help="tiny test families")
    ap.add_argument("--layers", type=int, default=32, help="depth of the 7B-shaped model before the 2x prune")
    ap.add_argument("--library", default="tensorrt-rtx", choices=["tensorrt", "tensorrt-rtx"])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--max-seq", type=int, help="positions of the engines [default: min(4096, the model's)]")
    ap.add_argument("--keep", action="store_true", help="keep the exports and engines in --workdir")
    args = ap.parse_args()

    import torch

    from ulsexport.testing import make_pruned_set, make_tiny_checkpoint

    args.results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(args.library), "batch": args.batch, "max_seq": args.max_seq,
               "layers_7b": args.layers, "models": []}
    say(f"environment: {json.dumps(results['environment'])}")

    def save():
        (args.results / "tensorrt-build.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.results / "tensorrt-build.md").write_text(markdown(results))

    save()
    if "library_error" in results["environment"]:
        say(f"no library: {results['environment']['library_error']}")
        return
    stages = args.stages.split(",")
    if "tiny" in stages:
        for family in args.families.split(","):
            checkpoint = make_tiny_checkpoint(family, args.workdir / family, num_layers=2)
            results["models"].append(one_model(f"tiny-{family}", checkpoint, args.workdir, args,
                                               "fp32", "cpu"))
            save()
    if "7b" in stages:
        if not torch.cuda.is_available():
            say("7b: skipped, no CUDA device")
        else:
            import onnxruntime as ort

            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            say(f"7b: random fp16 checkpoint of {args.layers} layers on the GPU, uls 2x prune")
            folders = make_pruned_set(args.workdir / "7b", {**SEVEN_B, "num_hidden_layers": args.layers}, "cuda",
                                      speedups=(2,))
            torch.cuda.empty_cache()
            results["models"].append(one_model(f"7b-{args.layers}L-uls2x", folders["uls2"], args.workdir, args,
                                               "fp16", device))
            save()
            if not args.keep:
                shutil.rmtree(args.workdir / "7b", ignore_errors=True)
    say(f"done; results in {args.results}")


if __name__ == "__main__":
    main()
