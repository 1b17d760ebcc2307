"""The validator: does the artifact still compute what the pruned model computes, how much faster
is it than the full model on the same runtime, and what did pruning cost in quality.

Parity compares the candidate artifact, greedy-decoding through its runtime, with the Hugging Face
checkpoint it was made from in PyTorch fp32 (`generate`, the reference for "did the export change
anything"). Speed runs the full model and the pruned one on the same runtime, device and dtype in
this one process, warm-up runs excluded, and reports the median of several runs with the spread.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import file_sha256, read_manifest
from .export_onnx import relative_error
from .runtimes import GreedyRun, artifact_kind, open_runtime

TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2, "int4": 1.0}


@dataclass(frozen=True)
class SpeedSettings:
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1


def compare_runs(reference: GreedyRun, candidate: GreedyRun, tolerance: float) -> dict:
    """Per-step logit errors and token agreement; the first step and row where they part.

    Greedy tokens may part at a near tie: where the reference's own margin between its token and the
    candidate's is within the tolerance (relative to the step's largest logit), the candidate picked a
    token the reference scores equal up to the precision allowed, which is rounding, not a wrong graph
    (random-weight models in fp16 have many such ties). Parity passes when every compared step is within
    tolerance and the tokens are equal or part only at such a tie.
    """
    steps = []
    divergence = None
    for step, (ref, cand) in enumerate(zip(reference.logits, candidate.logits)):
        rows_same = reference.tokens[:, step] == candidate.tokens[:, step]
        steps.append({"step": step, "relative_error": relative_error(cand, ref),
                      "max_abs_error": float(np.abs(cand.astype(np.float64) - ref).max()),
                      "top1_agreement": float(np.mean(ref.argmax(-1) == cand.argmax(-1)))})
        if divergence is None and not rows_same.all():
            row = int(np.flatnonzero(~rows_same)[0])
            margin = float(ref[row, reference.tokens[row, step]] - ref[row, candidate.tokens[row, step]])
            divergence = {"step": step, "row": row, "reference_margin": margin / float(np.abs(ref).max()),
                          "near_tie": margin <= tolerance * float(np.abs(ref).max())}
        if divergence is not None:
            break  # after the tokens part, the two runs see different inputs
    worst = max(s["relative_error"] for s in steps)
    failed_step = next((s["step"] for s in steps if s["relative_error"] > tolerance), None)
    return {
        "tolerance": tolerance,
        "steps_compared": len(steps),
        "max_relative_error": worst,
        "max_abs_error": max(s["max_abs_error"] for s in steps),
        "min_top1_agreement": min(s["top1_agreement"] for s in steps),
        "greedy_tokens_equal": divergence is None,
        "first_divergence": divergence,
        "first_step_over_tolerance": failed_step,
        "passed": failed_step is None and (divergence is None or divergence["near_tie"]),
        "per_step": steps,
    }


def parity_prompt(vocab_size: int, batch: int = 2, prompt_len: int = 12, seed: int = 0):
    """Random token prompts, every row but the first left-padded by a few tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, :min(row * 3, prompt_len - 1)] = 0
    return ids, mask


def check_parity(candidate_runtime, reference_dir: Path, steps: int, tolerance: float, batch: int = 2,
                 device: str = "cpu") -> dict:
    """The candidate's greedy run against `generate` of the fp32 reference checkpoint, on `device`."""
    import torch

    from .export_onnx import torch_greedy
    from .models import load_causal_lm

    reference = load_causal_lm(reference_dir, "fp32", device)
    ids, mask = parity_prompt(reference.config.get_text_config().vocab_size, batch)
    ref_tokens, ref_logits = torch_greedy(reference, torch.from_numpy(ids).to(reference.device),
                                          torch.from_numpy(mask).to(reference.device), steps)
    del reference
    _free_device_memory()
    candidate = candidate_runtime.greedy(ids, mask, steps, keep_logits=True)
    return {"batch": batch, "prompt_len": ids.shape[1], "new_tokens": steps,
            **compare_runs(GreedyRun(ref_tokens, ref_logits), candidate, tolerance)}


def measure_speed(runtime, settings: SpeedSettings, vocab_size: int, progress=None) -> dict:
    """Median (and min..max) prefill, decode and end-to-end tokens/s per batch size."""
    out = {}
    for batch in settings.batches:
        rng = np.random.default_rng(batch)
        ids = rng.integers(3, vocab_size, (batch, settings.prompt_len), dtype=np.int64)
        mask = np.ones_like(ids)
        runs = []
        for i in range(settings.warmup + settings.runs):
            run = runtime.greedy(ids, mask, settings.new_tokens)
            if i >= settings.warmup:
                runs.append(run)
            if progress is not None:
                progress.update(1)
        prefill = [batch * settings.prompt_len / r.prefill_seconds for r in runs]
        decode = [batch * (settings.new_tokens - 1) / r.decode_seconds for r in runs]
        total = [batch * settings.new_tokens / (r.prefill_seconds + r.decode_seconds) for r in runs]
        out[str(batch)] = {name: _summary(values) for name, values in
                           (("prefill_tokens_per_s", prefill), ("decode_tokens_per_s", decode),
                            ("end_to_end_tokens_per_s", total))}
    return out


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def parity_reference(reference_dir: Path, candidate: Path, kept: list[int], workdir: Path) -> Path:
    """The PyTorch checkpoint the candidate must match.

    An export is compared with the checkpoint it was exported from. A pruned checkpoint is compared
    with the reference pruned afresh to the same layers (so a corrupted tensor shows), unless it was
    healed, when its own weights are the reference.
    """
    manifest = read_manifest(candidate) or {}
    if artifact_kind(candidate) != "hf-checkpoint":
        source = Path(manifest.get("source", ""))
        if not (source / "config.json").is_file():
            raise UserError(f"the checkpoint {candidate} was exported from ({source}) is not there any more; "
                            "parity needs it as the reference")
        return source
    if "healing" in manifest:
        return candidate
    from .plan import plan_for_kept
    from .prune import prune_checkpoint

    plan = plan_for_kept(manifest["num_layers_original"], kept, "explicit")
    return prune_checkpoint(reference_dir, workdir / "pruned-reference", plan, quiet=True).out_dir


def _hf_source(candidate: Path) -> Path:
    """The Hugging Face checkpoint behind an artifact (the artifact itself for a checkpoint)."""
    if artifact_kind(candidate) == "hf-checkpoint":
        return candidate
    return Path((read_manifest(candidate) or {}).get("source", ""))


def full_depth_artifact(reference: Path, runtime: str, dtype: str, device: str, workdir: Path,
                        given: Path | None, builder: str = "torch") -> Path:
    """The full model as the same kind of artifact as the candidate (same runtime, same builder)."""
    if given is not None:
        return given
    if runtime == "torch":
        return reference
    if runtime in ("ort", "genai"):
        from .export_onnx import onnx_builder

        return onnx_builder(builder)(reference, workdir / f"full-{builder}", dtype, device, quiet=True).out_dir
    raise UserError(f"--runtime {runtime} needs --reference-artifact: the full model built the same way")


def _check_lineage(reference: Path, candidate_source: Path) -> dict:
    manifest = read_manifest(candidate_source) or {}
    expected = manifest.get("source_config_sha256")
    if expected and expected != file_sha256(reference / "config.json"):
        raise UserError(f"{candidate_source} was not pruned from {reference} (its config hash differs)")
    if "kept" not in manifest:
        raise UserError(f"{candidate_source} has no ulsexport.json with kept layers; prune it with ulsexport")
    return manifest


def validate(reference, candidate, runtime: str = "torch", device: str = "cpu", dtype: str | None = None,
             speed: SpeedSettings | None = SpeedSettings(), parity_steps: int = 32, tolerance: float | None = None,
             text=None, tasks=None, reference_artifact=None, quiet: bool = False) -> dict:
    """Validate artifact `candidate` against the original checkpoint `reference`; returns the report."""
    from .progress import progress_bar
    from .prune import load_model_info

    reference_dir, reference_config, adapter = load_model_info(reference)
    candidate = Path(candidate)
    if not candidate.is_dir():
        raise UserError(f"--candidate {candidate} does not exist")
    candidate_manifest = read_manifest(candidate) or {}
    dtype = dtype or (candidate_manifest.get("onnx") or {}).get("dtype") or "fp32"
    if dtype not in TOLERANCES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(TOLERANCES)}")
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    pruned_dir = _hf_source(candidate)
    lineage = _check_lineage(reference_dir, pruned_dir)
    vocab = adapter.shape(reference_config).vocab_size
    report = {
        "reference": str(reference_dir), "candidate": str(candidate), "candidate_kind": artifact_kind(candidate),
        "runtime": runtime, "device": device, "dtype": dtype, "kept": lineage["kept"],
        "num_layers_original": adapter.num_layers(reference_config), "plan": lineage.get("plan"),
        "device_name": _device_name(device),
    }
    candidate_runtime = open_runtime(candidate, runtime, dtype, device)
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
                                   "full": measure_speed(open_runtime(full, runtime, dtype, device), speed, vocab, bar),
                                   "pruned": measure_speed(candidate_runtime, speed, vocab, bar)}
            report["speedup"] = _speedups(report["speed"], lineage.get("plan") or {})
    if text is not None:
        report["perplexity"] = _perplexities(reference_dir, pruned_dir, text, device)
    if tasks is not None:
        report["tasks"] = score_tasks(reference_dir, pruned_dir, tasks, device)
    return report


def _speedups(speed: dict, plan: dict) -> dict:
    out = {"target": plan.get("speedup_target"), "predicted": plan.get("predicted_speedup"), "measured": {}}
    for batch, full in speed["full"].items():
        pruned = speed["pruned"][batch]
        out["measured"][batch] = {
            metric: pruned[metric]["median"] / full[metric]["median"] for metric in full
        }
    return out


def _perplexities(reference_dir: Path, pruned_dir: Path, text, device: str) -> dict:
    from .models import load_causal_lm, load_tokenizer
    from .quality import perplexity, read_text, token_windows

    windows = token_windows(load_tokenizer(pruned_dir), read_text(text), 256, max_tokens=100_000)
    return {"text": str(text), "tokens": sum(len(w) for w in windows),
            "full": perplexity(load_causal_lm(reference_dir, "fp32", device), windows),
            "pruned": perplexity(load_causal_lm(pruned_dir, "fp32", device), windows)}


def score_tasks(reference_dir: Path, pruned_dir: Path, tasks, device: str, max_new_tokens: int = 64) -> dict:
    """BLEU (sacrebleu) and ROUGE-L (rouge-score) of greedy outputs for a JSONL of prompt/reference."""
    import json

    import sacrebleu
    import torch
    from rouge_score import rouge_scorer

    from .models import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in Path(tasks).read_text().splitlines() if line.strip()]
    if not rows or not all({"prompt", "reference"} <= set(r) for r in rows):
        raise UserError(f"{tasks} must be JSONL with 'prompt' and 'reference' on every line")
    tokenizer = load_tokenizer(pruned_dir)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out = {}
    for name, folder in (("full", reference_dir), ("pruned", pruned_dir)):
        model = load_causal_lm(folder, "fp32", device)
        outputs = []
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids.to(model.device)
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        refs = [r["reference"] for r in rows]
        out[name] = {"bleu": sacrebleu.corpus_bleu(outputs, [refs]).score,
                     "rougeL": 100 * statistics.mean(scorer.score(r, o)["rougeL"].fmeasure
                                                     for r, o in zip(refs, outputs))}
    out["examples"] = len(rows)
    return out


def _free_device_memory() -> None:
    """Hand memory PyTorch cached back to the device, for runtimes (onnxruntime) that allocate their own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"
