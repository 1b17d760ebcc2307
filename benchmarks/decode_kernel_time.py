"""GPU kernel time of one decode step, for any runtime (torch, ort, genai), seen by CUPTI.

onnxruntime's own profiler times kernels from the host, so on CUDA a node that waits for the GPU
absorbs the work queued before it. CUPTI (through torch.profiler) records every kernel the process
launches, whichever library launched it, with its time on the GPU. Two profiled runs, one with only
the prefill and one with the prefill and `steps` decode steps, differ by exactly the decode steps:

    kernel ms per step   GPU busy time of one decode step (kernels and copies)
    wall ms per step     the same step timed from the host, in a separate unprofiled run
    session.run ms       of that, the time inside onnxruntime's run (our onnxruntime loop only)
    kernels per step     launches per step: the graph's fused-ness, seen from the GPU

A wall time well above the kernel time means the host, not the GPU, sets the pace (launch overhead,
synchronizations); close to it, the kernels themselves are what to make faster.

Per layer (ONNX exports): the kernels every decoder layer launches (a count per step that is a multiple
of the layer count), their time per layer against the floor of one layer's weight bytes (the
initializers without the vocabulary axis, over the layer count) at the device-to-device copy bandwidth
measured in the same run. Our onnxruntime loop runs its fixed-width step uncaptured here (the kernels
are those of the captured step, its argmax included; a replayed graph's launches are not all seen one
by one).

    python benchmarks/decode_kernel_time.py /root/bench/uls2-onnx:ort /root/bench/uls2-genai:genai \
        --batch 1 8 --json benchmarks/results/gpu/kernels.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ulsexport.artifact import read_manifest
from ulsexport.testing import copy_bandwidth, decode_kernel_time, per_layer_kernels, weight_bytes


def markdown(results: dict) -> str:
    lines = [f"# Decode-step GPU kernel time (CUPTI): {results.get('device', '?')}", "",
             "| artifact | runtime | batch | wall ms/step | session.run ms/step | kernel ms/step | kernel / wall | kernels/step |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in results["artifacts"].items():
        for row in rows:
            lines.append(f"| {key.rsplit(':', 1)[0]} | {key.rsplit(':', 1)[1]} | {row['batch']} | "
                         f"{row['wall_ms_per_step']:.2f} | {_ms(row['session_run_ms_per_step'])} | "
                         f"{row['kernel_ms_per_step']:.2f} | "
                         f"{row['kernel_ms_per_step'] / row['wall_ms_per_step']:.2f} | {row['kernels_per_step']:.0f} |")
    layer_rows = [(key, row) for key, rows in results["artifacts"].items() for row in rows if row.get("layer")]
    if layer_rows:
        lines += ["", f"## Per decoder layer (copy bandwidth {results['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)", "",
                  "| artifact | runtime | batch | layers | kernels/layer | kernel us/layer | of which GEMM | floor us/layer "
                  "| floor / kernel | outside layers us/step |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in layer_rows:
            layer = row["layer"]
            lines.append(f"| {key.rsplit(':', 1)[0]} | {key.rsplit(':', 1)[1]} | {row['batch']} | {layer['layers']} | "
                         f"{layer['layer_kernels']:.0f} | {layer['layer_us']:.1f} | {layer['layer_gemm_us']:.1f} | "
                         f"{layer['layer_floor_us']:.1f} | {layer['fraction_of_floor']:.1%} | {layer['outside_layers_us']:.1f} |")
        for key, row in layer_rows:
            lines += ["", f"Kernels of one layer, {key}, batch {row['batch']}: " + "; ".join(
                f"{k['name'][:60]} {k['us_per_layer']:.1f} us (x{k['per_layer']:.0f})" for k in row["layer"]["per_layer"])]
    for key, rows in results["artifacts"].items():
        for row in rows:
            lines += ["", f"Top kernels, {key}, batch {row['batch']}: " + "; ".join(
                f"{k['name'][:60]} {k['ms_per_step']:.3f} ms ({k['per_step']:.0f})" for k in row["top_kernels"][:8])]
    return "\n".join(lines) + "\n"


def vocab_and_layers(folder: Path) -> tuple[int, int]:
    """From genai_config.json where the builder was onnxruntime-genai's (its folders have no usable
    config.json), else from the checkpoint's config.json."""
    if (folder / "genai_config.json").is_file():
        model = json.loads((folder / "genai_config.json").read_text())["model"]
        return model["vocab_size"], model["decoder"]["num_hidden_layers"]
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    return config["vocab_size"], config["num_hidden_layers"]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="FOLDER:RUNTIME, runtime one of torch, ort, genai")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--json", type=Path, required=True, help="results (a .md beside it)")
    args = parser.parse_args()

    import torch
    from ulsexport.runtime import open_runtime

    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "copy_bandwidth_bytes_per_s": bandwidth, "artifacts": {}}
    for spec in args.artifacts:
        folder, runtime_name = spec.rsplit(":", 1)
        vocab, layers = vocab_and_layers(Path(folder))
        options = {"cuda_graph": False, "fixed_width": True} if runtime_name == "ort" else {}
        runtime = open_runtime(folder, runtime_name, args.dtype, "cuda", **options)
        rows = [decode_kernel_time(runtime, b, args.prompt_len, args.steps, vocab, top=None,
                                   folder=folder) for b in args.batch]
        # one layer's weights (ONNX exports): all but the embedding and lm head, over the layers
        layer_bytes = weight_bytes(folder, without_axis=vocab) / layers \
            if (read_manifest(folder) or {}).get("onnx") else None
        for row in rows:
            if layer_bytes:
                row["layer"] = per_layer_kernels(row["top_kernels"], layers, layer_bytes, bandwidth)
            row["top_kernels"] = row["top_kernels"][:12]
        results["artifacts"][spec] = rows
        del runtime
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
