"""Greedy text from an artifact: one prompt in, its continuation out, at one depth or self-speculatively
(a pruned depth drafts, the full depth verifies: the full depth's tokens, `runtime.speculative`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import Artifact, artifact_kind
from .errors import UserError

MAX_NEW_TOKENS = 100_000


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]                     # the new tokens, through the first EOS
    text: str
    seconds: float
    depth: str | None = None
    speculative: dict = field(default_factory=dict)   # SpeculativeRun.summary() where drafted

    def to_dict(self) -> dict:
        out = {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "seconds": round(self.seconds, 6),
               "tokens_per_second": round(len(self.ids) / self.seconds, 3) if self.seconds else None}
        if self.depth:
            out["depth"] = self.depth
        if self.speculative:
            out["speculative"] = self.speculative
        return out


def generate(model: str | Path, prompt: str, max_tokens: int = 64, depth: str | None = None,
             speculative: str | None = None, draft_tokens: int = 4, device: str = "cpu", runtime: str | None = None,
             chat: bool = False, adaptive: bool = False) -> Generation:
    """Greedy continuation of `prompt` by the artifact `model`, stopping after EOS or `max_tokens`.
    `depth` picks a depth of a multi-depth export; `speculative` (a pruned depth's tag) drafts with it
    `draft_tokens` at a time (`adaptive`: at most that many, chosen each round) and verifies with the full
    depth; `chat` wraps the prompt in the tokenizer's
    chat template."""
    from .runtime import default_runtime, open_runtime
    from .tokenizer import load_tokenizer

    folder = Path(model)
    if not folder.is_dir():
        raise UserError(f"--model {model}: no such artifact folder")
    if not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-tokens {max_tokens} must be between 1 and {MAX_NEW_TOKENS}")
    if depth and speculative:
        raise UserError("give --depth or --speculative, not both (speculative decoding keeps the full depth's tokens)")
    multi = Artifact.open(folder).multi_depth
    if (depth or speculative) and not multi:
        raise UserError(f"{folder} has one depth; --depth and --speculative need a multi-depth export "
                        "(ulsexport onnx --speedups 1,2 ...)")
    tokenizer = load_tokenizer(folder)
    ids = _prompt_ids(tokenizer, prompt, chat)
    input_ids, mask = np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    if speculative:
        from .runtime.ort import MultiDepthDecoder
        from .runtime.speculative import speculative_greedy

        decoder = MultiDepthDecoder(folder, device)   # on CUDA: the captured speculative loop
        run = speculative_greedy(decoder, input_ids, mask, max_tokens, speculative, draft_tokens, eos_id=eos,
                                 adaptive=adaptive)
        new, stats = run.tokens[0], run.summary()
    else:
        opened = open_runtime(folder, runtime or default_runtime(artifact_kind(folder)), device=device)
        options = {"depth": depth} if depth else {}
        new = [int(t) for t in opened.greedy(input_ids, mask, max_tokens, **options).tokens[0]]
        new, stats = (new[:new.index(eos) + 1] if eos in new else new), {}
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(ids, new, text, seconds, depth, stats)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not prompt:
        raise UserError("--prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
