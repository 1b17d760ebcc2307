"""Layer plans: which decoder layers a target speedup keeps.

Pure Python (no torch): a plan depends only on the layer count, the target speedup and the
strategy, never on the input, which is what lets a pruned model batch and cache like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UserError

POSITIONAL_STRATEGIES = ("uls", "even", "top", "first")
# No model has anywhere near this many decoder layers; a count above it is a broken config, and
# refusing it keeps every per-layer list small.
MAX_LAYERS = 100_000


@dataclass(frozen=True)
class ModelShape:
    """What the per-token cost model needs to know about one model (weights read per token)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    mlp_matrices: int = 3          # 3 for gated (SwiGLU/GeGLU) MLPs, 2 for plain ones
    experts_per_token: int = 1     # MoE: experts a token passes through
    tie_word_embeddings: bool = False

    def layer_params(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attention = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = self.mlp_matrices * h * self.intermediate_size * self.experts_per_token
        return attention + mlp

    def outside_layers_params(self) -> int:
        # The LM head is a full vocab x hidden product every token; the embedding is one row read.
        return self.vocab_size * self.hidden_size + self.hidden_size


# Llama-2-7B proportions, used when a plan is made from a layer count alone.
LLAMA_7B_SHAPE = ModelShape(4096, 11008, 32, 32, 128, 32000)


@dataclass(frozen=True)
class LayerPlan:
    num_layers: int
    strategy: str
    speedup_target: float | None
    kept: tuple[int, ...]
    predicted_speedup_layers: float
    predicted_speedup_cost_model: float
    cost_model_shape: str = "model config"
    scores: dict = field(default_factory=dict)

    @property
    def skipped(self) -> tuple[int, ...]:
        keep = set(self.kept)
        return tuple(i for i in range(self.num_layers) if i not in keep)

    @property
    def new_to_original(self) -> dict[int, int]:
        return dict(enumerate(self.kept))

    def to_dict(self) -> dict:
        out = {
            "num_layers": self.num_layers,
            "strategy": self.strategy,
            "speedup_target": self.speedup_target,
            "kept": list(self.kept),
            "skipped": list(self.skipped),
            "predicted_speedup": {
                "layers": round(self.predicted_speedup_layers, 4),
                "cost_model": round(self.predicted_speedup_cost_model, 4),
            },
            "cost_model_shape": self.cost_model_shape,
        }
        if self.scores:
            out["scores"] = self.scores
        return out


def num_kept_for_speedup(num_layers: int, speedup: float) -> int:
    """K = int(L / s), as in the ULS authors' code; refuses plans that keep fewer than 2 layers."""
    if not speedup > 1:
        raise UserError(f"speedup must be greater than 1 (got {speedup})")
    kept = int(num_layers / speedup)
    if kept < 2:
        raise UserError(
            f"speedup {speedup} keeps {kept} of {num_layers} layers; a plan needs at least 2"
        )
    return kept


def uls_layers(num_layers: int, num_kept: int) -> list[int]:
    """The ULS authors' rule: keep 0 and L-1, then every `interval`-th layer while fewer than K."""
    interval = int(num_layers / (num_kept - 1))
    kept = [0, num_layers - 1]
    for idx in range(1, num_layers - 1):
        if len(kept) >= num_kept:
            break
        if idx % interval == 0:
            kept.append(idx)
    return sorted(kept)


def even_layers(num_layers: int, num_kept: int) -> list[int]:
    """K layers spread evenly from 0 to L-1 (first and last kept), rounding to the nearest layer."""
    step = (num_layers - 1) / (num_kept - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(num_kept)]


def top_layers(num_layers: int, num_kept: int) -> list[int]:
    """Skip the L-K layers just below the last one."""
    return list(range(num_kept - 1)) + [num_layers - 1]


def first_layers(num_layers: int, num_kept: int) -> list[int]:
    """Keep the first K layers: what exiting early amounts to."""
    return list(range(num_kept))


POSITIONAL_RULES = {
    "uls": uls_layers,
    "even": even_layers,
    "top": top_layers,
    "first": first_layers,
}


def parse_index_list(text: str, option: str, num_layers: int | None = None) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]. Ranges are checked before they are expanded: a reversed one
    (8-3) is refused, and so is one past `num_layers` (or past MAX_LAYERS when no count is known)."""
    limit = MAX_LAYERS if num_layers is None else num_layers
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise UserError(f"{option}: '{part}' is not a layer index or range like 3-5") from None
        if lo > hi:
            raise UserError(f"{option}: range '{part}' runs backwards; write it {hi}-{lo}")
        if hi >= limit:
            where = f"out of range 0..{num_layers - 1}" if num_layers is not None else \
                f"beyond any model (at most {MAX_LAYERS} layers)"
            raise UserError(f"{option}: layer {hi} in '{part}' is {where}")
        out.extend(range(lo, hi + 1))
    return out


def validate_indices(indices: list[int], num_layers: int, option: str) -> None:
    if not isinstance(indices, (list, tuple)):
        raise UserError(f"{option}: expected a list of layer indices, not {_brief(indices)}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"{option}: layer indices are whole numbers, not {_brief(i)}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{option}: layer {bad[0]} is out of range 0..{num_layers - 1}")
    seen: set[int] = set()
    for i in indices:
        if i in seen:
            raise UserError(f"{option}: layer {i} is listed twice")
        seen.add(i)


def cost_model_speedup(num_layers: int, num_kept: int, shape: ModelShape) -> float:
    layer, rest = shape.layer_params(), shape.outside_layers_params()
    return (num_layers * layer + rest) / (num_kept * layer + rest)


def plan_for_kept(
    num_layers: int,
    kept: list[int],
    strategy: str,
    speedup: float | None = None,
    shape: ModelShape | None = None,
    scores: dict | None = None,
    option: str = "--keep",
) -> LayerPlan:
    """A plan for a given list of kept layers, whichever strategy chose them."""
    _check_count(num_layers)
    validate_indices(kept, num_layers, option)
    if len(kept) < 2:
        raise UserError(f"a plan must keep at least 2 layers (keeps {len(kept)})")
    shape_note = "model config" if shape is not None else "Llama-2-7B proportions (no --model given)"
    shape = shape or LLAMA_7B_SHAPE
    return LayerPlan(
        num_layers=num_layers,
        strategy=strategy,
        speedup_target=speedup,
        kept=tuple(sorted(kept)),
        predicted_speedup_layers=num_layers / len(kept),
        predicted_speedup_cost_model=cost_model_speedup(num_layers, len(kept), shape),
        cost_model_shape=shape_note,
        scores=scores or {},
    )


def make_plan(
    num_layers: int,
    speedup: float | None = None,
    strategy: str = "uls",
    keep: list[int] | None = None,
    skip: list[int] | None = None,
    shape: ModelShape | None = None,
) -> LayerPlan:
    """A plan from a positional strategy and a speedup, or from an explicit --keep / --skip list."""
    _check_count(num_layers)
    if num_layers < 2:
        raise UserError(f"a model needs at least 2 layers to prune (has {num_layers})")
    if keep is not None and skip is not None:
        raise UserError("give either --keep or --skip, not both")
    if (keep is not None or skip is not None) and speedup is not None:
        option = "--keep" if keep is not None else "--skip"
        raise UserError(f"{option} gives the layers explicitly; drop --speedup (or drop {option})")
    if skip is not None:
        validate_indices(skip, num_layers, "--skip")
        dropped = set(skip)
        return plan_for_kept(num_layers, [i for i in range(num_layers) if i not in dropped],
                             "explicit", speedup, shape, option="--skip")
    if keep is not None:
        return plan_for_kept(num_layers, keep, "explicit", speedup, shape)
    if strategy not in POSITIONAL_RULES:
        raise UserError(f"unknown strategy '{strategy}'; choose one of {', '.join(POSITIONAL_RULES)}")
    if speedup is None:
        raise UserError("give --speedup, or an explicit --keep / --skip list")
    kept = POSITIONAL_RULES[strategy](num_layers, num_kept_for_speedup(num_layers, speedup))
    return plan_for_kept(num_layers, kept, strategy, speedup, shape)


def _check_count(num_layers) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise UserError(f"a layer count is a whole number, not {_brief(num_layers)}")
    if num_layers > MAX_LAYERS:
        raise UserError(f"{num_layers} layers: ulsexport handles at most {MAX_LAYERS}")


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def plan_from_dict(data: dict, shape: ModelShape | None = None) -> LayerPlan:
    """Rebuild a plan recorded in a manifest."""
    return plan_for_kept(data["num_layers"], list(data["kept"]), data.get("strategy", "explicit"),
                         data.get("speedup_target"), shape, data.get("scores"))


def describe(plan: LayerPlan) -> str:
    d = plan.to_dict()
    ps = d["predicted_speedup"]
    return (
        f"strategy {plan.strategy}, target {plan.speedup_target or '-'}: keeps {len(plan.kept)} of "
        f"{plan.num_layers} layers\n"
        f"  kept:    {_ranges(plan.kept)}\n"
        f"  skipped: {_ranges(plan.skipped) or '-'}\n"
        f"  predicted speedup: {ps['layers']:.2f}x by layer count, "
        f"{ps['cost_model']:.2f}x by per-token cost model ({plan.cost_model_shape})"
    )


def _ranges(indices) -> str:
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
        else:
            if run:
                out.append(_fmt_run(run))
            run = [i]
    if run:
        out.append(_fmt_run(run))
    return ",".join(out)


def _fmt_run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


__all__ = [
    "LayerPlan", "ModelShape", "make_plan", "plan_for_kept", "plan_from_dict", "num_kept_for_speedup",
    "uls_layers", "even_layers", "top_layers", "first_layers", "parse_index_list", "describe", "MAX_LAYERS",
]
