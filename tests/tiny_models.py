"""Tiny random checkpoints, one per supported family, built from configs with a fixed seed."""
from __future__ import annotations

from pathlib import Path

VOCAB = 128
SLIDING_WINDOW = 8  # prompts plus generation in the tests run well past this

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=SLIDING_WINDOW),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3),
    "qwen3": dict(_COMMON, head_dim=8, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                  max_window_layers=3),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8),
    "phi3": dict(_COMMON, sliding_window=SLIDING_WINDOW),
    "olmo2": dict(_COMMON),
    "granite": dict(_COMMON),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(model_type: str, num_layers: int = 8, overrides: dict | None = None):
    from transformers import AutoConfig

    from ulsexport.adapters import ADAPTERS

    kwargs = {**TINY_CONFIGS[model_type], **(overrides or {})}
    kwargs[ADAPTERS[model_type].num_layers_field] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_checkpoint(model_type: str, directory: Path, num_layers: int = 8, seed: int = 0,
                         overrides: dict | None = None) -> Path:
    """Save a random model of `model_type` (config fields `overrides` changed) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, overrides))
    with torch.no_grad():  # larger weights than the default init, so layers change the output a lot
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return Path(directory)


def save_word_tokenizer(directory, vocab_size):
    """A word-level tokenizer over t0..tN: onnxruntime-genai's builder copies a tokenizer and fails without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(directory)
