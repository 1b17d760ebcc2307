"""The onnx stage: its settings (`OnnxSettings`, declared once: the CLI's options and a recipe's `onnx:` section
build it) and the one call that turns them into an export (`export`), for the CLI, recipes and the API."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifact import BuildResult
from ..errors import UserError
from . import DEFAULT_BUILDER, get_builder


@dataclass(frozen=True)
class OnnxSettings:
    builder: str = DEFAULT_BUILDER
    dtype: str = "fp32"
    device: str = "cpu"
    opset: int | None = None            # torch builder: torch.onnx's default
    no_optimize: bool = False           # torch builder: skip onnxruntime's fusions
    attention: str | None = None        # torch builder: gqa (default) or mha
    kv_cache: str | None = None         # torch builder: shared (default) or concat
    target: str = "ort"                 # tensorrt: standard ONNX ops, the input of `ulsexport engine`
    speedups: tuple[float, ...] | None = None   # several depths over one set of weights
    strategy: str = "uls"               # their plans
    calib: Path | None = None           # their calibration text
    depth_models: tuple[tuple[float, Path], ...] | None = None   # depths taken from checkpoints of their own
    allow_pickle: bool = False


def export(model, out, settings: OnnxSettings = OnnxSettings(), force: bool = False, quiet: bool = False) -> BuildResult:
    """Export checkpoint `model` to `out` as `settings` say: one depth with the builder, several depths over
    one weights file (`speedups`), or the standard-ops graph for TensorRT (`target`)."""
    s = settings
    options = dict(opset=s.opset, optimize=False if s.no_optimize else None, attention=s.attention,
                   kv_cache=s.kv_cache, allow_pickle=s.allow_pickle or None)
    builder = s.builder
    if s.target not in ("ort", "tensorrt"):
        raise UserError(f"--target {s.target}: choose ort or tensorrt")
    if s.target == "tensorrt":
        if builder != DEFAULT_BUILDER or s.speedups:
            raise UserError("--target tensorrt is the torch builder's graph of one depth: drop --builder/--speedups")
        builder = "tensorrt"
    if s.speedups:
        from .multi_depth import export_multi_depth

        if builder != DEFAULT_BUILDER:
            raise UserError("--speedups builds with --builder torch only")
        return export_multi_depth(model, out, list(s.speedups), s.strategy, s.calib, dtype=s.dtype, device=s.device,
                                  force=force, quiet=quiet, depth_models=dict(s.depth_models or ()),
                                  **{k: v for k, v in options.items() if v is not None})
    if s.depth_models:
        raise UserError("--depth-model names a depth of a multi-depth export: it goes with --speedups")
    if s.strategy != "uls" or s.calib:
        raise UserError("--strategy and --calib go with --speedups (to prune one depth: ulsexport prune)")
    return get_builder(builder).build(model, out, s.dtype, s.device, force=force, quiet=quiet, **options)
