"""An artifact's tokenizer: transformers' AutoTokenizer where transformers is installed, else its
tokenizer.json read by `tokenizers` alone.

The second path is for the Triton Python backend's stub environment, which needs numpy < 2 (the
nvidia-pytriton 0.7.0 stub crashes on string and int64 tensors with numpy 2) and so cannot hold a
torch/transformers stack built against numpy 2. It covers what the generate model uses (encode with
the tokenizer's own special tokens, decode, the pad/eos ids, the vocabulary size) and refuses a
tokenizer whose config asks transformers to add tokens beyond tokenizer.json's post-processor, which
only transformers would apply.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_ADDS_TOKENS = ("add_bos_token", "add_eos_token")


def load_tokenizer(path: str | Path):
    if importlib.util.find_spec("transformers") is None:
        return JsonTokenizer(path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(path))
    except Exception as exc:  # many causes, all meaning "no usable tokenizer here"
        raise UserError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    # ulsexport tokenizes whole texts and cuts them into windows itself: transformers' warning that a text is
    # longer than the model's positions ("Token indices sequence length is longer ...") is noise here
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


@dataclass
class Encoding:
    input_ids: list[int]


class JsonTokenizer:
    """tokenizer.json through `tokenizers`, answering as a transformers tokenizer does for the calls above."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / TOKENIZER_JSON).is_file():
            raise UserError(f"could not load a tokenizer from {folder}: without transformers installed only a "
                            f"{TOKENIZER_JSON} can be read, and there is none")
        config_path = folder / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if any(config.get(key) for key in _ADDS_TOKENS):
            raise UserError(f"could not load a tokenizer from {folder}: its {TOKENIZER_CONFIG} sets "
                            f"{' or '.join(_ADDS_TOKENS)}, which only transformers applies; install transformers")
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
        for role in ("bos", "eos", "pad", "unk"):
            token = config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            setattr(self, f"{role}_token_id", self.backend.token_to_id(token) if token else None)

    def __call__(self, text: str) -> Encoding:
        return Encoding(self.backend.encode(text).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)
