"""A Hugging Face checkpoint in PyTorch: the eager runtime, and `generate` as the parity reference."""
from __future__ import annotations

from pathlib import Path

from ..compat import cache_argument
from .base import Runtime, position_ids_from_mask


def torch_greedy(model, input_ids, attention_mask, max_new_tokens: int):
    """The PyTorch reference: `generate` (greedy, KV cache, no early stop); (tokens, per-step logits)."""
    import torch

    with torch.no_grad():  # eos_token_id=None as a kwarg (not in a config, where it means "unset"): no early stop
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, input_ids.shape[1]:].cpu().numpy()
    return tokens, [step.float().cpu().numpy() for step in out.logits]


class DecodeState:
    def __init__(self, cache, mask):
        self.cache, self.mask = cache, mask


class TorchRuntime(Runtime):
    """A Hugging Face checkpoint in PyTorch, stepping its own loop (logits of the last token only)."""

    name = "torch"

    def __init__(self, model):
        self.model = model
        self.device = model.device

    @classmethod
    def open(cls, folder: str | Path, dtype: str = "fp32", device: str = "cpu") -> TorchRuntime:
        from ..models import load_causal_lm

        return cls(load_causal_lm(folder, dtype or "fp32", device))

    def _forward(self, ids, state: DecodeState):
        import torch

        positions = position_ids_from_mask(state.mask)[:, -ids.shape[1]:]
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=state.mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{cache_argument(self.model): state.cache})
        return out.logits[:, -1]

    def prefill(self, input_ids, attention_mask, max_new_tokens: int):
        import torch
        from transformers import DynamicCache

        state = DecodeState(DynamicCache(config=self.model.config), torch.as_tensor(attention_mask, device=self.device))
        return state, self._forward(torch.as_tensor(input_ids, device=self.device), state)

    def step(self, state: DecodeState, next_ids):
        import torch

        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        return self._forward(torch.as_tensor(next_ids, device=self.device)[:, None], state)

    def next_tokens(self, logits):
        import torch

        ids = logits.argmax(-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return ids

    def to_host(self, array):
        return array.float().cpu().numpy() if array.is_floating_point() else array.cpu().numpy()
