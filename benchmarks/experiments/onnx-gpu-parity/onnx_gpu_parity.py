"""fp16 ONNX export of a 1B-shaped pruned Llama on CUDA: logit error and greedy agreement vs PyTorch fp16.

Builds the model from a config with random weights (nothing downloaded), prunes it 2x, exports it with
`export_onnx(dtype=fp16, device=cuda)`, then runs the same left-padded batch through PyTorch `generate`
(fp16, CUDA) and the onnxruntime greedy loop (CUDAExecutionProvider, cache kept on the GPU).

    python benchmarks/experiments/onnx-gpu-parity/onnx_gpu_parity.py benchmarks/experiments/onnx-gpu-parity
    python benchmarks/experiments/onnx-gpu-parity/onnx_gpu_parity.py /tmp/r --tiny --device cpu --dtype fp32
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ulsexport.export.trace import export_onnx
from ulsexport.models import load_causal_lm
from ulsexport.precision import relative_error
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.runtime.ort import OnnxDecoder
from ulsexport.runtime.pytorch import torch_greedy
from ulsexport.testing import SHAPES, make_random_llama

# the shapes this run was made with (onnx_gpu_parity.md): the 1B shape with a wider MLP and 2048 positions
ONE_B = dict(SHAPES["1b"], intermediate_size=8192, max_position_embeddings=2048)
TINY = dict(SHAPES["tiny"], num_hidden_layers=4, vocab_size=512, max_position_embeddings=256)


def build_checkpoint(directory: Path, shape: dict, dtype: str) -> Path:
    """A random Llama of `shape` with a word tokenizer (onnxruntime-genai's builder wants one)."""
    return make_random_llama(directory, shape, dtype, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def left_padded_batch(vocab: int, prompt_len: int):
    ids = torch.randint(3, vocab, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, : prompt_len // 4] = 0
    ids[0, : prompt_len // 4] = 0
    return ids, mask


def compare(expected_tokens, expected_logits, actual_tokens, actual_logits) -> dict:
    """Per-step logit error while both runs have fed the same tokens; greedy agreement per row."""
    same = expected_tokens == actual_tokens
    first_diff = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    common = min(first_diff)
    errors = [relative_error(a, e) for a, e in zip(actual_logits[: common + 1], expected_logits[: common + 1])]
    return {"steps": len(expected_logits), "identical_prefix_per_row": first_diff,
            "token_agreement": float(same.mean()), "all_tokens_identical": bool(same.all()),
            "max_relative_logit_error": max(errors), "prefill_relative_logit_error": errors[0],
            "errors_compared_over_steps": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="Directory for onnx_gpu_parity.json and .md")
    parser.add_argument("--tiny", action="store_true", help="A tiny Llama instead of the 1B shape")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--compare-genai", action="store_true",
                        help="Also build the pruned checkpoint with onnxruntime-genai's builder and time both "
                             "graphs' decoding (batch 1 and 8, prompt 128, 128 new tokens)")
    args = parser.parse_args()
    shape = TINY if args.tiny else ONE_B
    tolerance = {"fp16": 1e-2, "fp32": 1e-4}[args.dtype]
    work = Path(tempfile.mkdtemp(prefix="onnx_gpu_parity-"))
    try:
        src = build_checkpoint(work / "full", shape, args.dtype)
        plan = plan_for_model(src, speedup=2)
        pruned = prune_checkpoint(src, work / "pruned", plan, quiet=True).out_dir
        start = time.perf_counter()
        export = export_onnx(pruned, work / "onnx", dtype=args.dtype, device=args.device, quiet=True)
        export_seconds = time.perf_counter() - start

        ids, mask = left_padded_batch(shape["vocab_size"], args.prompt_len)
        model = load_causal_lm(pruned, args.dtype, args.device)
        expected = torch_greedy(model, ids.to(args.device), mask.to(args.device), args.new_tokens)
        del model
        decoder = OnnxDecoder(export.out_dir, args.device)
        actual = decoder.greedy(ids.numpy(), mask.numpy(), args.new_tokens, keep_logits=True)
        result = {
            "shape": shape, "kept": list(plan.kept), "dtype": args.dtype, "device": args.device,
            "providers": decoder.session.get_providers(), "io_binding": decoder.io_binding,
            "batch": 2, "prompt_len": args.prompt_len, "left_pad_rows": {"0": args.prompt_len // 4},
            "export_seconds": export_seconds, "optimizations": export.manifest["optimizations"],
            "export_parity_probe": export.manifest["parity_check"],
            "parity": compare(*expected, actual.tokens, actual.logits), "tolerance": tolerance,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
        }
        result["passed"] = result["parity"]["max_relative_logit_error"] <= tolerance
        write(args.results, result)
        del decoder
        if args.compare_genai:
            result["builders"] = compare_builders(pruned, export.out_dir, work / "genai", args, shape["vocab_size"])
            write(args.results, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))


def write(results: Path, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "onnx_gpu_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "onnx_gpu_parity.md").write_text(markdown(result))


def compare_builders(pruned: Path, torch_built: Path, genai_dir: Path, args, vocab: int) -> dict:
    """Decode tokens/s of our graph (our onnxruntime loop) and of genai's builder (genai's loop), same checkpoint."""
    from ulsexport.export.genai import build_genai
    from ulsexport.runtime.genai import GenaiRuntime
    from ulsexport.validate import SpeedSettings, measure_speed

    start = time.perf_counter()
    build_genai(pruned, genai_dir, args.dtype, args.device, quiet=True)
    out = {"genai_build_seconds": time.perf_counter() - start}
    settings = SpeedSettings((1, 8), 128, 128, runs=3, warmup=1)
    for name, make in (("torch-built (ort loop)", lambda: OnnxDecoder(torch_built, args.device)),
                       ("genai-built (genai loop)", lambda: GenaiRuntime(genai_dir, args.dtype, args.device))):
        runtime = make()
        out[name] = {b: v["decode_tokens_per_s"] for b, v in measure_speed(runtime, settings, vocab).items()}
        del runtime
    return out


def markdown(r: dict) -> str:
    p = r["parity"]
    return "\n".join([
        f"# ONNX {r['dtype']} parity on {r['device']} ({'PASS' if r['passed'] else 'FAIL'})", "",
        f"- model: Llama {r['shape']}, pruned 2x, kept layers {r['kept']}",
        f"- providers: {r['providers']}, IO binding: {r['io_binding']}",
        f"- export: {r['export_seconds']:.1f} s; fusions kept: {r['optimizations'].get('kept')} "
        f"({r['optimizations'].get('applied')})",
        f"- max relative logit error (steps with identical inputs, {p['errors_compared_over_steps']} of "
        f"{p['steps']}): {p['max_relative_logit_error']:.2e} (tolerance {r['tolerance']:g}); "
        f"prefill {p['prefill_relative_logit_error']:.2e}",
        f"- greedy agreement over {p['steps']} tokens: {p['token_agreement']:.1%}; identical prefix per row "
        f"{p['identical_prefix_per_row']}",
        f"- versions: {r['versions']}", "",
        *_builder_lines(r.get("builders"))])


def _builder_lines(builders: dict | None) -> list[str]:
    if not builders:
        return []
    runs = [k for k in builders if k != "genai_build_seconds"]
    lines = ["Decode tokens/s of the same pruned checkpoint (prompt 128, 128 new tokens, median of 3; min-max):", "",
             "| batch | " + " | ".join(runs) + " | ratio |", "|---|---|---|---|"]
    for batch in builders[runs[0]]:
        cells = [builders[r][batch] for r in runs]
        lines.append(f"| {batch} | " + " | ".join(f"{c['median']:.1f} [{c['min']:.1f}-{c['max']:.1f}]" for c in cells)
                     + f" | {cells[0]['median'] / cells[-1]['median']:.2f} |")
    return lines + [""]


if __name__ == "__main__":
    main()
