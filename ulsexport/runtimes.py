"""Runtimes that decode greedily with a KV cache, behind one small interface, so that the validator
compares and times PyTorch, onnxruntime and onnxruntime-genai the same way.

A runtime is opened on an artifact folder and offers `greedy(input_ids, attention_mask, n)` returning
the new tokens, optionally each step's logits, and the seconds spent in the prefill and in the
decode steps (device work included: each phase ends with a synchronize).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import read_manifest


@dataclass
class GreedyRun:
    tokens: np.ndarray                                  # [batch, new_tokens]
    logits: list[np.ndarray] = field(default_factory=list)  # per step [batch, vocab] fp32, if kept
    prefill_seconds: float = 0.0                        # prompt pass, up to the first new token
    decode_seconds: float = 0.0                         # every later step


def artifact_kind(folder: Path) -> str:
    """'hf-checkpoint', 'onnx' or 'genai', from the folder's manifest (or its files)."""
    manifest = read_manifest(folder) or {}
    if (Path(folder) / "genai_config.json").is_file() and manifest.get("builder") == "genai":
        return "genai"
    if manifest.get("kind"):
        return manifest["kind"]
    if (Path(folder) / "config.json").is_file():
        return "hf-checkpoint"
    raise UserError(f"{folder} is neither a checkpoint nor an ulsexport artifact (no ulsexport.json)")


def position_ids_from_mask(mask):
    """Hugging Face generate's rule for left-padded batches: count real tokens; pads get position 1."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


class TorchRuntime:
    """A Hugging Face checkpoint in PyTorch, stepping its own loop (logits of the last token only)."""

    name = "torch"

    def __init__(self, folder: str | Path, dtype: str = "fp32", device: str = "cpu"):
        from .models import load_causal_lm

        self.model = load_causal_lm(folder, dtype, device)
        self.device = self.model.device

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def greedy(self, input_ids, attention_mask, new_tokens: int, keep_logits: bool = False) -> GreedyRun:
        import torch
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        cache = DynamicCache(config=self.model.config)
        tokens, logits = [], []
        seconds = []
        with torch.no_grad():
            for step in range(new_tokens):
                start = time.perf_counter()
                positions = position_ids_from_mask(mask)[:, -ids.shape[1]:]
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
                last = out.logits[:, -1]
                ids = last.argmax(-1, keepdim=True)
                self._sync()
                seconds.append(time.perf_counter() - start)
                tokens.append(ids)
                if keep_logits:
                    logits.append(last.float().cpu().numpy())
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return GreedyRun(torch.cat(tokens, 1).cpu().numpy(), logits, seconds[0], sum(seconds[1:]))


class OrtRuntime:
    """An ONNX export in onnxruntime (CPU, or CUDA with the cache bound on the GPU)."""

    name = "ort"

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from .ort_runner import OnnxDecoder

        self.decoder = OnnxDecoder(folder, device)

    def greedy(self, input_ids, attention_mask, new_tokens: int, keep_logits: bool = False) -> GreedyRun:
        out = self.decoder.greedy(input_ids, attention_mask, new_tokens, keep_logits=keep_logits)
        return GreedyRun(out.tokens, out.logits, out.step_seconds[0], sum(out.step_seconds[1:]))


def open_runtime(folder: str | Path, runtime: str, dtype: str = "fp32", device: str = "cpu"):
    """The runtime named `runtime` over artifact `folder`, refusing artifacts it cannot run."""
    kind = artifact_kind(Path(folder))
    if runtime in RUNTIMES and kind not in RUNTIMES[runtime][0]:
        raise UserError(f"--runtime {runtime} runs {' or '.join(RUNTIMES[runtime][0])} artifacts; "
                        f"{folder} is a {kind} artifact")
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime][1](folder, dtype, device)


def _genai_runtime(folder, dtype, device):
    from .genai import GenaiRuntime  # onnxruntime-genai is optional: imported only when asked for

    return GenaiRuntime(folder, dtype, device)


RUNTIMES = {
    "torch": (("hf-checkpoint",), lambda folder, dtype, device: TorchRuntime(folder, dtype, device)),
    "ort": (("onnx",), lambda folder, dtype, device: OrtRuntime(folder, device)),
    "genai": (("genai", "onnx"), _genai_runtime),  # an "onnx" export runs when it has a genai_config.json
}
