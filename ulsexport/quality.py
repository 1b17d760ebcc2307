"""Quality measures: perplexity of a causal LM over held-out text."""
from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"text file {path} is empty")
    return text


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None = None) -> list[list[int]]:
    """The text's tokens, each paragraph encoded as BOS + text + EOS (where the tokenizer has them),
    cut into non-overlapping windows of `window` tokens."""
    ids: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for paragraph in (p for p in text.split("\n") if p.strip()):
        ids.extend(bos + tokenizer(paragraph, add_special_tokens=False)["input_ids"] + eos)
        if max_tokens and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def perplexity(model, windows: list[list[int]], batch_size: int = 8, progress=None) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token in `windows`."""
    import torch

    if not windows:
        raise UserError("no text to score: the text gave fewer than 2 tokens")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, :len(w)] = torch.tensor(w)
                mask[row, :len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            valid = mask[:, 1:].reshape(-1).bool()
            total_nll += nll[valid].sum().item()
            total_tokens += int(valid.sum())
            if progress is not None:
                progress.update(len(batch))
    return math.exp(total_nll / total_tokens)
