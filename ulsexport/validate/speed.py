"""Speed: the full and the pruned model on the same runtime, device and dtype, in one process."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class SpeedSettings:
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1


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
        decode = [batch * (settings.new_tokens - 1) / r.decode_seconds if r.decode_seconds > 0 else float("nan")
                  for r in runs]
        total = [batch * settings.new_tokens / (r.prefill_seconds + r.decode_seconds) for r in runs]
        out[str(batch)] = {name: _summary(values) for name, values in
                           (("prefill_tokens_per_s", prefill), ("decode_tokens_per_s", decode),
                            ("end_to_end_tokens_per_s", total))}
    return out


def _summary(values: list[float]) -> dict:
    if not values:
        raise UserError("no timed runs (--runs must be at least 1)")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def full_depth_artifact(reference: Path, runtime: str, dtype: str, device: str, workdir: Path,
                        given: Path | None, builder: str = "torch") -> Path:
    """The full model as the same kind of artifact as the candidate (same runtime, same builder)."""
    if given is not None:
        return given
    if runtime == "torch":
        return reference
    if runtime in ("ort", "genai"):
        from ..export import get_builder

        return get_builder(builder).build(reference, workdir / f"full-{builder}", dtype, device, quiet=True).out_dir
    raise UserError(f"--runtime {runtime} needs --reference-artifact: the full model built the same way")


def speedups(speed: dict, plan: dict) -> dict:
    out = {"target": plan.get("speedup_target"), "predicted": plan.get("predicted_speedup"), "measured": {}}
    for batch, full in speed["full"].items():
        pruned = speed["pruned"][batch]
        out["measured"][batch] = {
            metric: pruned[metric]["median"] / full[metric]["median"] for metric in full
        }
    return out
