"""Loading checkpoints into PyTorch, and the model-level helpers other stages share."""
from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import UserError
from .precision import resolve_device, torch_dtype


def load_causal_lm(path: str | Path, dtype: str = "fp32", device: str = "cpu", allow_pickle: bool = False):
    """An eval-mode AutoModelForCausalLM with eager-compatible attention, on `device`.

    The weights are checked first as pruning checks them (shards inside the directory, headers
    sound); a checkpoint whose weights are pickle files is refused unless `allow_pickle`.
    """
    from transformers import AutoModelForCausalLM

    from .checkpoint import checkpoint_tensors, load_model_info, weight_files

    model_dir, _, _ = load_model_info(path)
    files = weight_files(model_dir, allow_pickle)
    if all(f.suffix == ".safetensors" for f in files):
        checkpoint_tensors(model_dir)  # headers only: refuses duplicates, overlaps, bad offsets
    with transformers_bars(False):  # a bar per load, seconds each: ours say what the stage is doing
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype),
                                                     use_safetensors=True if not allow_pickle else None)
    return model.to(resolve_device(device)).eval()


@contextlib.contextmanager
def transformers_bars(enabled: bool):
    """transformers' own loading and saving bars on or off for a block (restored after)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was_enabled else logging.disable_progress_bar)()


def decoder_layers(model):
    """The ModuleList of decoder layers, wherever the family keeps it."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise UserError(f"could not find the decoder layers of {type(model).__name__}")


def continue_prompts(model, prompts: list[list[int]], new_tokens: int, temperature: float = 0.0,
                     generator=None) -> list[list[int]]:
    """`new_tokens` tokens after each prompt, greedy (temperature 0) or sampled; EOS does not stop a row.
    Prompts of several lengths run as one left-padded batch over the model's KV cache."""
    import torch

    from .compat import cache_argument, output_cache

    cache_name = cache_argument(model)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    chosen = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        for step in range(new_tokens):
            logits = out.logits[:, -1].float()
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            chosen.append(token)
            if step + 1 == new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_name: output_cache(out)})
    return torch.cat(chosen, dim=1).tolist() if chosen else [[] for _ in prompts]
