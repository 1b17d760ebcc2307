"""Parity: an artifact's greedy run, step by step, against the PyTorch fp32 checkpoint it must match."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Artifact, artifact_kind
from ..errors import UserError
from ..precision import relative_error
from ..runtime.base import GreedyRun


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
            divergence = {"step": step, "row": row, **tie(ref, row, int(reference.tokens[row, step]),
                                                          int(candidate.tokens[row, step]), tolerance)}
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


def tie(logits: np.ndarray, row: int, expected: int, got: int, tolerance: float) -> dict:
    """Where greedy tokens part: the reference's margin between its token and the other (relative to the
    step's largest logit), and whether it is a near tie, within `tolerance`."""
    scale = float(np.abs(logits).max())
    margin = float(logits[row, expected] - logits[row, got])
    return {"reference_margin": margin / scale, "near_tie": margin <= tolerance * scale}


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

    from ..models import load_causal_lm
    from ..runtime.pytorch import torch_greedy

    reference = load_causal_lm(reference_dir, "fp32", device)
    ids, mask = parity_prompt(reference.config.get_text_config().vocab_size, batch)
    ref_tokens, ref_logits = torch_greedy(reference, torch.from_numpy(ids).to(reference.device),
                                          torch.from_numpy(mask).to(reference.device), steps)
    del reference
    free_device_memory()
    candidate = candidate_runtime.greedy(ids, mask, steps, keep_logits=True)
    return {"batch": batch, "prompt_len": ids.shape[1], "new_tokens": steps,
            **compare_runs(GreedyRun(ref_tokens, ref_logits), candidate, tolerance)}


def parity_reference(reference_dir: Path, candidate: Path, kept: list[int], workdir: Path) -> Path:
    """The PyTorch checkpoint the candidate must match.

    An export is compared with the checkpoint it was exported from. A pruned checkpoint is compared
    with the reference pruned afresh to the same layers (so a corrupted tensor shows), unless it was
    healed, when its own weights are the reference.
    """
    manifest = Artifact.open(candidate).manifest
    if artifact_kind(candidate) != "hf-checkpoint":
        source = Path(manifest.get("source", ""))
        if not (source / "config.json").is_file():
            raise UserError(f"the checkpoint {candidate} was exported from ({source}) is not there any more; "
                            "parity needs it as the reference")
        return source
    if "healing" in manifest:
        return candidate
    return pruned_reference(reference_dir, manifest["num_layers_original"], kept, workdir / "pruned-reference")


def pruned_reference(reference_dir: Path, num_layers: int, kept: list[int], out: Path) -> Path:
    """The reference checkpoint pruned afresh to `kept` into `out` (the reference itself where every layer is kept)."""
    from ..plan import plan_for_kept
    from ..prune import prune_checkpoint

    if list(kept) == list(range(num_layers)):
        return reference_dir
    plan = plan_for_kept(num_layers, kept, "explicit")
    return prune_checkpoint(reference_dir, out, plan, quiet=True).out_dir


def free_device_memory() -> None:
    """Hand memory PyTorch cached back to the device, for runtimes (onnxruntime) that allocate their own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
