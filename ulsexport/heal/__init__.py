"""Healing a pruned model: distillation from the original (`train`) over a packed text corpus (`corpus`)."""
from .train import EVAL_MAX_TOKENS, HealResult, HealSettings, distillation_loss, heal, prune_and_heal, work_dir

__all__ = ["EVAL_MAX_TOKENS", "HealResult", "HealSettings", "distillation_loss", "heal", "prune_and_heal", "work_dir"]
