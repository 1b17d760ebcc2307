"""The validator: does the artifact still compute what the pruned model computes, how much faster
is it than the full model on the same runtime, and what did pruning cost in quality.

Parity compares the candidate artifact, greedy-decoding through its runtime, with the Hugging Face
checkpoint it was made from in PyTorch fp32 (`generate`, the reference for "did the export change
anything"). Speed runs the full model and the pruned one on the same runtime, device and dtype in
this one process, warm-up runs excluded, and reports the median of several runs with the spread.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..artifact import Artifact, artifact_kind, checkpoint_hashes, file_sha256
from ..errors import UserError
from ..precision import tolerance_for
from ..progress import progress_bar
from ..runtime import open_runtime
from .parity import check_parity, compare_runs, parity_reference, pruned_reference
from .speed import SpeedSettings, full_depth_artifact, measure_speed, speedups


def _hf_source(candidate: Path) -> Path:
    """The Hugging Face checkpoint behind an artifact (the artifact itself for a checkpoint)."""
    if artifact_kind(candidate) == "hf-checkpoint":
        return candidate
    return Path(Artifact.open(candidate).get("source", ""))


def _check_lineage(reference: Path, candidate_source: Path) -> dict:
    manifest = Artifact.open(candidate_source).manifest
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


def check_device(device: str, option: str = "--device") -> None:
    """Refuse a device that is not cpu, cuda or cuda:N, or CUDA where PyTorch sees none, in one line."""
    import re

    if device == "cpu":
        return
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"{option} must be cpu or cuda (or cuda:N), not {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "PyTorch was built without CUDA" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        raise UserError(f"{option} {device}: {why} on this machine; use cpu")
    if ":" in device and int(device.split(":")[1]) >= count:
        raise UserError(f"{option} {device}: this machine has {count} CUDA device(s), numbered from 0")


def validate(reference, candidate, runtime: str = "torch", device: str = "cpu", dtype: str | None = None,
             speed: SpeedSettings | None = SpeedSettings(), parity_steps: int = 32, tolerance: float | None = None,
             text=None, tasks=None, reference_artifact=None, quiet: bool = False, cuda_graph: bool | None = None,
             decode_kernels: bool = False, depth: str | None = None, eval_samples: int = 32,
             depth_references: dict | None = None) -> dict:
    """Validate artifact `candidate` against the original checkpoint `reference`; returns the report.
    `cuda_graph=False` runs `--runtime ort` on CUDA without capturing decode steps (None: where it can);
    `decode_kernels` runs its products on ulsexport's CUDA kernels (`runtime.kernels`), full model too.
    A multi-depth export (`onnx --speedups`) is validated depth by depth (only `depth` where named): the
    report's `depths` holds one report each, and its `parity` passes when every depth's does."""
    from ..checkpoint import load_model_info

    check_settings(speed, parity_steps, tolerance)
    check_device(device)
    if tasks is not None:
        from .quality import require_task_metrics

        require_task_metrics()
    if cuda_graph is not None and runtime != "ort":
        raise UserError("--no-cuda-graph applies to --runtime ort (onnxruntime's CUDA graph capture)")
    if decode_kernels and runtime != "ort":
        raise UserError("--decode-kernels applies to --runtime ort (a custom-op library for onnxruntime)")
    reference_dir, reference_config, adapter = load_model_info(reference)
    candidate = Path(candidate)
    if not candidate.is_dir():
        raise UserError(f"--candidate {candidate} does not exist")
    opened = Artifact.open(candidate)
    candidate_manifest, multi_depth = opened.manifest, opened.multi_depth
    if depth is not None and not multi_depth:
        raise UserError(f"--depth picks a depth of a multi-depth export (onnx --speedups); {candidate} has one graph")
    if multi_depth and runtime != "ort":
        raise UserError(f"--candidate {candidate} is a multi-depth export; --runtime ort runs its depths, "
                        f"not {runtime}")
    onnx_section = candidate_manifest.get("onnx") if isinstance(candidate_manifest.get("onnx"), dict) else {}
    dtype = dtype or onnx_section.get("dtype") or "fp32"
    tolerance = tolerance_for(dtype) if tolerance is None else tolerance
    num_layers, vocab = adapter.num_layers(reference_config), adapter.shape(reference_config).vocab_size
    if multi_depth:
        _check_multi_depth_source(reference_dir, candidate, candidate_manifest)
    else:
        pruned_dir = _hf_source(candidate)
        lineage = _check_lineage(reference_dir, pruned_dir)
    common = {"reference": str(reference_dir), "candidate": str(candidate), "candidate_kind": artifact_kind(candidate),
              "runtime": runtime, "device": device, "dtype": dtype, "num_layers_original": num_layers,
              "device_name": _device_name(device)}
    options = {} if cuda_graph is None else {"cuda_graph": cuda_graph}
    if decode_kernels:
        options["decode_kernels"] = True
    opened = open_runtime(candidate, runtime, dtype, device, **options)
    with tempfile.TemporaryDirectory() as tmp:
        if multi_depth:
            if depth is not None:
                opened.decoder(depth)  # an unknown depth is refused, naming the export's
            tags = [depth] if depth is not None else opened.depths
            graphs = {g["tag"]: g for g in candidate_manifest["graphs"]}
            # (depth, kept, plan, runtime, the PyTorch checkpoint it must match): the reference pruned to its
            # layers, or the checkpoint of its own the depth was exported from (onnx --depth-model)
            targets = [(tag, opened.kept[tag], graphs[tag].get("plan"), opened.decoder(tag),
                        _depth_checkpoint(graphs[tag], (depth_references or {}).get(tag)) if graphs[tag].get("model") else
                        pruned_reference(reference_dir, num_layers, opened.kept[tag], Path(tmp) / tag))
                       for tag in tags]
            full_depth = next((tag for tag in opened.depths if opened.kept[tag] == list(range(num_layers))), None)
        else:
            expected = parity_reference(reference_dir, candidate, lineage["kept"], Path(tmp))
            targets = [(None, lineage["kept"], lineage.get("plan"), opened, expected)]
            full_depth = None
        full_speed = None
        if speed is not None:
            if full_depth is not None and reference_artifact is None:  # the export's own full depth
                full = opened.decoder(full_depth)
            else:
                if not quiet and reference_artifact is None and runtime in ("ort", "genai"):
                    print(f"building the full model's {runtime} export to time it beside the candidate "
                          "(--reference-artifact gives one already built) ...", file=sys.stderr, flush=True)
                full = open_runtime(full_depth_artifact(reference_dir, runtime, dtype, device, Path(tmp),
                                                        Path(reference_artifact) if reference_artifact else None,
                                                        candidate_manifest.get("builder", "torch")),
                                    runtime, dtype, device, **options)
            with progress_bar(len(speed.batches) * (speed.warmup + speed.runs), "timing the full model",
                              quiet=quiet) as bar:
                full_speed = measure_speed(full, speed, vocab, bar)
            del full
        reports = [_measure(common, target, parity_steps, tolerance, speed, full_speed, text, tasks, quiet,
                            hf_checkpoint=target[4] if multi_depth else pruned_dir, vocab=vocab, scratch=Path(tmp),
                            eval_samples=eval_samples)
                   for target in targets]
    for report in reports:
        report["cuda_graph"], report["decode_kernels"] = cuda_graph, decode_kernels
    if not multi_depth:
        return reports[0]
    return {**common, "candidate_kind": "onnx (multi-depth)", "multi_depth": True,
            "depths": {r["depth"]: r for r in reports},
            "parity": {"passed": all(r["parity"]["passed"] for r in reports)}}


def _measure(common: dict, target: tuple, parity_steps, tolerance, speed, full_speed, text, tasks, quiet,
             hf_checkpoint: Path, vocab: int, scratch: Path, eval_samples: int = 32) -> dict:
    """One report: the target's parity against its PyTorch checkpoint, its speed beside the full model's
    (`full_speed`) and, where asked, the quality of `hf_checkpoint` (the pruned checkpoint) against the
    reference's."""
    depth, kept, plan, runtime, expected = target
    reference_dir, device = Path(common["reference"]), common["device"]
    report = {**common, "kept": kept, "plan": plan, **({"depth": depth} if depth is not None else {})}
    report["parity"] = {"reference_checkpoint": "the reference, pruned afresh to the kept layers"
                        if scratch in expected.parents else str(expected),
                        **check_parity(runtime, expected, parity_steps, tolerance, device=device)}
    if speed is not None:
        with progress_bar(len(speed.batches) * (speed.warmup + speed.runs),
                          "timing" + (f" depth {depth}" if depth else " the candidate"), quiet=quiet) as bar:
            report["speed"] = {"settings": speed.__dict__, "full": full_speed,
                               "pruned": measure_speed(runtime, speed, vocab, bar)}
        report["speedup"] = speedups(report["speed"], plan or {})
    if text:
        from .quality import generality_report

        report.update(generality_report(reference_dir, hf_checkpoint, text, device, eval_samples))
    if tasks is not None:
        from .quality import score_tasks

        report["tasks"] = score_tasks(reference_dir, hf_checkpoint, tasks, device)
    return report


def _depth_checkpoint(graph: dict, given: Path | None) -> Path:
    """The checkpoint a depth of a multi-depth export came from (`onnx --depth-model`), as the user gives it
    (`--depth-reference DEPTH=DIR`; the path the manifest records is shown, never opened), checked to be the
    one exported: its config and manifest hashes as recorded (healing it again changes its manifest)."""
    tag, recorded = graph.get("tag"), graph.get("model")
    if given is None:
        raise UserError(f"depth {tag} was exported from its own checkpoint (recorded as {recorded}): give it with "
                        f"--depth-reference {tag}=DIR to check that depth's parity (or validate another --depth)")
    if checkpoint_hashes(given) != graph.get("model_hashes"):
        raise UserError(f"--depth-reference {tag}={given}: not the checkpoint depth {tag} was exported from, or "
                        "changed since (its config or manifest differs from the export's record)")
    return Path(given)


def _check_multi_depth_source(reference_dir: Path, candidate: Path, manifest: dict) -> None:
    """A multi-depth export names the full checkpoint it came from: refuse one from another model."""
    source = Path(manifest.get("source") or "")
    if (source / "config.json").is_file() and file_sha256(source / "config.json") != file_sha256(
            reference_dir / "config.json"):
        raise UserError(f"--candidate {candidate} was exported from {source}, not from --reference {reference_dir} "
                        "(their config.json differ)")


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


__all__ = ["SpeedSettings", "check_settings", "check_parity", "compare_runs", "measure_speed", "validate"]
