"""Where the transformers API differs across the supported range (5.17 to the newest), in one place.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache` (the old
name warns and goes in 5.40); 5.17 knows only the old name.
"""
from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name (`in` on an output maps the old name: use keys)."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]
