"""Loading checkpoints into PyTorch, and the model-level helpers other stages share."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .precision import resolve_device, torch_dtype


def load_causal_lm(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """An eval-mode AutoModelForCausalLM with eager-compatible attention, on `device`."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import load_model_info

    model_dir, _, _ = load_model_info(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except Exception as exc:  # many causes, all meaning "no usable tokenizer here"
        raise UserError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None


def decoder_layers(model):
    """The ModuleList of decoder layers, wherever the family keeps it."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise UserError(f"could not find the decoder layers of {type(model).__name__}")
