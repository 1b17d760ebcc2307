"""The ULS authors' own scheme in eager PyTorch: the prompt through every layer, the generated tokens
through the kept layers only, attending to those layers' prompt caches. The reference that the
multi-depth runtime's `prefill_depth="full"` is checked against, and what the scheme buys or costs
in continuation perplexity against plain pruning."""
from __future__ import annotations

import math

import numpy as np

from ..runtime.base import GreedyRun


def kept_layer_cache(cache, kept: list[int]):
    """A DynamicCache holding only the `kept` layers of `cache`, renumbered 0..K-1 (no copy)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(cache.layers[k].keys, cache.layers[k].values) for k in kept])


def scheme_greedy(full_model, pruned_model, kept: list[int], input_ids, attention_mask, new_tokens: int) -> GreedyRun:
    """Greedy tokens and per-step logits: the first new token from the full model's prompt pass, every
    later one from the pruned model over the kept layers' caches."""
    from ..runtime.pytorch import DecodeState, TorchRuntime

    full, pruned = TorchRuntime(full_model), TorchRuntime(pruned_model)
    state, logits = full.prefill(input_ids, attention_mask, new_tokens)
    state = DecodeState(kept_layer_cache(state.cache, kept), state.mask)
    tokens, steps = [], []
    for step in range(new_tokens):
        if step:
            logits = pruned.step(state, tokens[-1])
        steps.append(pruned.to_host(logits).astype(np.float32))
        tokens.append(logits.argmax(-1))
    return GreedyRun(np.stack([t.cpu().numpy() for t in tokens], 1), steps)


def continuation_perplexity(full_model, pruned_model, kept: list[int], windows: list[list[int]],
                            prompt_len: int) -> dict:
    """Teacher-forced perplexity of each window's tokens after its first `prompt_len`: under plain pruning
    (the pruned model over the whole window) and under the scheme (the prompt through the full model,
    the continuation through the kept layers on the prompt's kept caches)."""
    import torch
    from transformers import DynamicCache

    from ..compat import cache_argument, output_cache

    totals = {"pruned": 0.0, "full_prefill": 0.0}
    count = 0
    name_full, name_pruned = cache_argument(full_model), cache_argument(pruned_model)
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window], device=full_model.device)
            targets = ids[0, prompt_len:]
            plain = pruned_model(input_ids=ids).logits[0, prompt_len - 1:-1].float()
            totals["pruned"] += torch.nn.functional.cross_entropy(plain, targets, reduction="sum").item()
            prompt = full_model(input_ids=ids[:, :prompt_len], use_cache=True,
                                **{name_full: DynamicCache(config=full_model.config)})
            first = prompt.logits[0, -1:].float()
            rest = pruned_model(input_ids=ids[:, prompt_len:-1], use_cache=True,
                                **{name_pruned: kept_layer_cache(output_cache(prompt), kept)}).logits[0].float()
            logits = torch.cat([first, rest])
            totals["full_prefill"] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return {name: math.exp(total / count) for name, total in totals.items()} | {"tokens": count,
                                                                                "prompt_len": prompt_len}
