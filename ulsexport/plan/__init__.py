"""Which layers stay: positional plans (uls, even, top, first, explicit), plans scored from
calibration data (`scoring`: bi, angular, greedy-ppl) and their side-by-side comparison (`compare`)."""
from .positional import (POSITIONAL_STRATEGIES, LayerPlan, ModelShape, cost_model_speedup, describe, make_plan,
                         num_kept_for_speedup, parse_index_list, plan_for_kept, plan_from_dict)

__all__ = ["POSITIONAL_STRATEGIES", "LayerPlan", "ModelShape", "cost_model_speedup", "describe", "make_plan",
           "num_kept_for_speedup", "parse_index_list", "plan_for_kept", "plan_from_dict"]
