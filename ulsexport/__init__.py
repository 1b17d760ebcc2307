"""ulsexport: remove whole decoder layers (Unified Layer Skipping) and ship the result."""
from .errors import UserError  # noqa: E402
from .version import __version__  # noqa: E402
from .plan import LayerPlan, ModelShape, make_plan, plan_for_kept  # noqa: E402


def __getattr__(name):
    # Heavy entry points load on first use, so `import ulsexport` stays cheap and torch-free.
    lazy = {
        "prune_checkpoint": "prune", "plan_for_model": "prune",
        "adapter_for": "families", "ADAPTERS": "families",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["UserError", "LayerPlan", "ModelShape", "make_plan", "plan_for_kept",
           "prune_checkpoint", "plan_for_model", "adapter_for", "ADAPTERS", "__version__"]
