"""The pure parts of an engine build: the --batch list, the optimization profiles' shapes, precision.

One optimization profile per --batch value B, each for batch 1..B (opt B), so that the engine holds
kernels tuned for each listed batch and a batch runs in the smallest profile that holds it. Every
profile covers the new tokens of a pass (1..--max-seq, opt 1: decode steps are most of the passes),
the past of each `past_key_values.{i}.*` input (0..--max-seq - 1, opt half of that), and an
attention mask over past plus new tokens (1..--max-seq). Dims are matched by the names the export
gives them in the manifest's `io_shapes`; fixed dims (heads, head size) stay as they are.
"""
from __future__ import annotations

from ..errors import UserError

DEFAULT_BATCH = "1,8"
DEFAULT_MAX_SEQ = 4096
# the export's symbolic dims (ulsexport.export.trace) -> their (min, opt, max), from batch B and --max-seq S
BATCH_DIM, SEQ_DIM, PAST_DIM, TOTAL_DIM = "batch", "sequence_length", "past_sequence_length", "total_sequence_length"
PRECISIONS = ("fp32", "fp16", "bf16")


def parse_batch(text: str | None) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): sorted, each once, every one at least 1."""
    text = DEFAULT_BATCH if text is None else text
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--batch '{text}' is not a list of batch sizes like 1,8,32") from None
    if not values:
        raise UserError(f"--batch '{text}' names no batch size; give e.g. 1,8,32")
    if min(values) < 1:
        raise UserError(f"--batch sizes must be at least 1 (got {min(values)})")
    return tuple(sorted(set(values)))


def dim_ranges(batch: int, max_seq: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dim in the profile for batches up to `batch`."""
    if max_seq < 2:
        raise UserError(f"--max-seq must be at least 2 (one past position and one new token; got {max_seq})")
    past_max = max_seq - 1
    past_opt = past_max // 2
    return {BATCH_DIM: (1, batch, batch), SEQ_DIM: (1, 1, max_seq), PAST_DIM: (0, past_opt, past_max),
            TOTAL_DIM: (1, past_opt + 1, max_seq)}


def engine_profiles(onnx: dict, batches: tuple[int, ...], max_seq: int) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles of an export's inputs: one per batch in `batches`, each
    {input name: {"min": shape, "opt": shape, "max": shape}} over every graph input (input_ids,
    attention_mask, position_ids if any, and every past_key_values.{i}.key/value).

    `onnx` is the export manifest's `onnx` section (its `inputs`, `cache_inputs` and `io_shapes`)."""
    cache = [n for pair in onnx["cache_inputs"] for n in pair]
    names = [*onnx["inputs"], *cache]
    shapes = onnx["io_shapes"]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise UserError(f"the export manifest has no shapes for inputs {missing}; re-export with `ulsexport onnx`")
    profiles = []
    for batch in batches:
        ranges = dim_ranges(batch, max_seq)
        profile = {}
        for name in names:
            shape = {"min": [], "opt": [], "max": []}
            for dim in shapes[name]:
                if isinstance(dim, int):
                    low = opt = high = dim
                elif dim in ranges:
                    low, opt, high = ranges[dim]
                else:
                    raise UserError(f"input {name} has a dim '{dim}' that no --batch/--max-seq flag sets "
                                    f"(known: {', '.join(ranges)})")
                shape["min"].append(low), shape["opt"].append(opt), shape["max"].append(high)
            profile[name] = shape
        profiles.append(profile)
    return profiles


def resolve_precision(graph_dtype: str, requested: str | None, weak_flags: tuple[str, ...] = ()) -> dict:
    """How the engine gets its precision: {"precision", "strongly_typed", "builder_flag"}.

    A strongly typed network computes in the graph's own types (an fp16 export gives an fp16 engine);
    that is the only mode of TensorRT for RTX. A library that still has weakly typed networks
    (`weak_flags`: the BuilderFlag names it offers, "FP16" and/or "BF16") can build an fp32 graph in
    fp16 or bf16 with the flag instead."""
    if requested not in (None, *PRECISIONS):
        raise UserError(f"unknown precision '{requested}'; choose one of {', '.join(PRECISIONS)}")
    if requested is None or requested == graph_dtype:
        return {"precision": graph_dtype, "strongly_typed": True, "builder_flag": None}
    flag = requested.upper()
    if graph_dtype == "fp32" and flag in weak_flags:
        return {"precision": requested, "strongly_typed": False, "builder_flag": flag}
    if graph_dtype == "fp32":
        how = "export with `ulsexport onnx --target tensorrt --dtype fp16`" if requested == "fp16" else \
            "ulsexport exports fp32 and fp16 only"
        raise UserError(f"--{requested}: this library builds strongly typed networks only, so the engine computes "
                        f"in the graph's fp32; {how}")
    raise UserError(f"--{requested}: the graph is {graph_dtype}; a {graph_dtype} graph builds a {graph_dtype} engine "
                    f"(leave out the flag, or export fp32 for a weakly typed build)")
