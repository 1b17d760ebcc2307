"""The validator: does the artifact still compute what the pruned model computes, how much faster
is it than the full model on the same runtime, and what did pruning cost in quality.

Parity compares the candidate artifact, greedy-decoding through its runtime, with the Hugging Face
checkpoint it was made from in PyTorch fp32 (`generate`, the reference for "did the export change
anything"). Speed runs the full model and the pruned one on the same runtime, device and dtype in
this one process, warm-up runs excluded, and reports the median of several runs with the spread.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..artifact import artifact_kind, file_sha256, read_manifest
from ..errors import UserError
from ..precision import tolerance_for
from ..runtime import open_runtime
from .parity import check_parity, compare_runs, parity_reference
from .speed import SpeedSettings, full_depth_artifact, measure_speed, speedups


def _hf_source(candidate: Path) -> Path:
    """The Hugging Face checkpoint behind an artifact (the artifact itself for a checkpoint)."""
    if artifact_kind(candidate) == "hf-checkpoint":
        return candidate
    return Path((read_manifest(candidate) or {}).get("source", ""))


def _check_lineage(reference: Path, candidate_source: Path) -> dict:
    manifest = read_manifest(candidate_source) or {}
    expected = manifest.get("source_config_sha256")
    if expected and expected != file_sha256(reference / "config.json"):
        raise UserError(f"{candidate_source} was not pruned from {reference} (its config hash differs)")
    if "kept" not in manifest:
        raise UserError(f"{candidate_source} has no ulsexport.json with kept layers; prune it with ulsexport")
    return manifest


def check_settings(speed: SpeedSettings | None, parity_steps: int, tolerance: float | None = None) -> None:
    """Refuse settings that cannot give a measurement, before any model is loaded."""
    import math

    def whole(value, least):
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    problems = [(not whole(parity_steps, 1), f"--parity-steps must be at least 1 (got {parity_steps})"),
                (tolerance is not None and not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
                                                and tolerance >= 0), f"--tolerance {tolerance} must be a finite number >= 0")]
    if speed is not None:
        problems += [
            (not speed.batches or not all(whole(b, 1) for b in speed.batches),
             f"--batch sizes must be whole numbers of at least 1 (got {list(speed.batches)})"),
            (not whole(speed.prompt_len, 1), f"--prompt-len must be at least 1 (got {speed.prompt_len})"),
            (not whole(speed.new_tokens, 2), f"--new-tokens must be at least 2: decode speed needs a step after "
                                             f"the first token (got {speed.new_tokens})"),
            (not whole(speed.runs, 1), f"--runs must be at least 1 (got {speed.runs})"),
            (not whole(speed.warmup, 0), f"--warmup must be 0 or more (got {speed.warmup})"),
        ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def validate(reference, candidate, runtime: str = "torch", device: str = "cpu", dtype: str | None = None,
             speed: SpeedSettings | None = SpeedSettings(), parity_steps: int = 32, tolerance: float | None = None,
             text=None, tasks=None, reference_artifact=None, quiet: bool = False, cuda_graph: bool | None = None,
             decode_kernels: bool = False) -> dict:
    """Validate artifact `candidate` against the original checkpoint `reference`; returns the report.
    `cuda_graph=False` runs `--runtime ort` on CUDA without capturing decode steps (None: where it can);
    `decode_kernels` runs its products on ulsexport's CUDA kernels (`runtime.kernels`), full model too."""
    from ..checkpoint import load_model_info
    from ..progress import progress_bar

    check_settings(speed, parity_steps, tolerance)
    if tasks is not None:
        from .quality import require_task_metrics

        require_task_metrics()
    reference_dir, reference_config, adapter = load_model_info(reference)
    candidate = Path(candidate)
    if not candidate.is_dir():
        raise UserError(f"--candidate {candidate} does not exist")
    candidate_manifest = read_manifest(candidate) or {}
    dtype = dtype or (candidate_manifest.get("onnx") or {}).get("dtype") or "fp32"
    tolerance = tolerance_for(dtype) if tolerance is None else tolerance
    pruned_dir = _hf_source(candidate)
    lineage = _check_lineage(reference_dir, pruned_dir)
    vocab = adapter.shape(reference_config).vocab_size
    report = {
        "reference": str(reference_dir), "candidate": str(candidate), "candidate_kind": artifact_kind(candidate),
        "runtime": runtime, "device": device, "dtype": dtype, "kept": lineage["kept"],
        "num_layers_original": adapter.num_layers(reference_config), "plan": lineage.get("plan"),
        "device_name": _device_name(device),
    }
    if cuda_graph is not None and runtime != "ort":
        raise UserError("--no-cuda-graph applies to --runtime ort (onnxruntime's CUDA graph capture)")
    if decode_kernels and runtime != "ort":
        raise UserError("--decode-kernels applies to --runtime ort (a custom-op library for onnxruntime)")
    options = {} if cuda_graph is None else {"cuda_graph": cuda_graph}
    if decode_kernels:
        options["decode_kernels"] = True
    report["cuda_graph"], report["decode_kernels"] = cuda_graph, decode_kernels
    candidate_runtime = open_runtime(candidate, runtime, dtype, device, **options)
    with tempfile.TemporaryDirectory() as tmp:
        expected = parity_reference(reference_dir, candidate, lineage["kept"], Path(tmp))
        report["parity"] = {"reference_checkpoint": str(expected) if expected != Path(tmp) / "pruned-reference"
                            else "the reference, pruned afresh to the kept layers",
                            **check_parity(candidate_runtime, expected, parity_steps, tolerance, device=device)}
        if speed is not None:
            full = full_depth_artifact(reference_dir, runtime, dtype, device, Path(tmp),
                                       Path(reference_artifact) if reference_artifact else None,
                                       candidate_manifest.get("builder", "torch"))
            total = 2 * len(speed.batches) * (speed.warmup + speed.runs)
            with progress_bar(total, "timing", quiet=quiet) as bar:
                report["speed"] = {"settings": speed.__dict__,
                                   "full": measure_speed(open_runtime(full, runtime, dtype, device, **options),
                                                         speed, vocab, bar),
                                   "pruned": measure_speed(candidate_runtime, speed, vocab, bar)}
            report["speedup"] = speedups(report["speed"], lineage.get("plan") or {})
    if text is not None:
        from .quality import perplexities

        report["perplexity"] = perplexities(reference_dir, pruned_dir, text, device)
    if tasks is not None:
        from .quality import score_tasks

        report["tasks"] = score_tasks(reference_dir, pruned_dir, tasks, device)
    return report


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


__all__ = ["SpeedSettings", "check_settings", "check_parity", "compare_runs", "measure_speed", "validate"]
