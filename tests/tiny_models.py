"""Tiny random checkpoints, one per supported family: they live in ulsexport.testing (shared with benchmarks/)."""
from ulsexport.testing import (FAMILIES, SLIDING_WINDOW, TINY_CONFIGS, VOCAB, make_tiny_checkpoint,  # noqa: F401
                               save_word_tokenizer, tiny_config)

__all__ = ["FAMILIES", "SLIDING_WINDOW", "TINY_CONFIGS", "VOCAB", "make_tiny_checkpoint", "save_word_tokenizer",
           "tiny_config"]
