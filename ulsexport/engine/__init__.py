"""TensorRT engines from the standard-ops ONNX export: `ulsexport onnx --target tensorrt`, then
`ulsexport engine`.

- `ops`: the check that a graph uses standard ONNX ops only (TensorRT's parser knows no com.microsoft op);
- `onnx_target`: the export of that graph (torch builder, no onnxruntime fusions, concat KV cache);
- `profiles`: the flags' pure parts: batch list, optimization profile shapes, precision;
- `library`: the one small adapter over `tensorrt` and `tensorrt_rtx_bindings` (TensorRT for RTX);
- `build`: the engine build, one code path for both libraries, whole or nothing;
- `triton`: a `tensorrt_plan` decoder-step config.pbtxt for Triton's TensorRT backend.

Nothing here imports a TensorRT library at import time; `ulsexport.runtime.tensorrt` runs the engines.
"""
from __future__ import annotations

from .build import ENGINE_FILE, KIND, TIMING_CACHE_FILE, build_engine
from .ops import standard_ops_check
from .profiles import engine_profiles, parse_batch, resolve_precision


__all__ = ["ENGINE_FILE", "KIND", "TIMING_CACHE_FILE", "build_engine", "engine_profiles", "parse_batch",
           "resolve_precision", "standard_ops_check"]
