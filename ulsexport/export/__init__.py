"""Builders of ONNX artifacts, in one registry that the CLI, recipes and the validator read.

- `trace`: torch.onnx export of the transformers model (every supported family), checked against
  PyTorch, fused for onnxruntime by `ort_fusions`;
- `genai`: onnxruntime-genai's own model builder;
- `tensorrt`: the torch builder's graph with standard ONNX ops only, for `ulsexport engine` (`ulsexport.engine`).

Adding a builder is one module with a `build(model, out, dtype, device, force=, quiet=, **options)`
function and one line in BUILDERS.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Builder:
    name: str
    module: str            # where the build function lives, imported on first use (optional packages)
    function: str
    summary: str           # one line for --help
    dtypes: tuple[str, ...]
    runtime: str           # the runtime its artifacts run in unless told otherwise
    options: dict[str, str] | None = None  # the builder's own keyword options -> their CLI flag

    def build(self, model, out, dtype: str = "fp32", device: str = "cpu", force: bool = False, quiet: bool = False,
              **options):
        """Build artifact `out` from checkpoint `model`; options left at None are the builder's defaults."""
        own = self.options or {}
        given = {k: v for k, v in options.items() if v is not None}
        foreign = [k for k in given if k not in own]
        if foreign:
            flags = sorted({flag for b in BUILDERS.values() for k, flag in (b.options or {}).items() if k in foreign})
            owners = [b.name for b in BUILDERS.values() if set(foreign) <= set(b.options or {})]
            raise UserError(f"{', '.join(flags) or ', '.join(foreign)} apply to --builder {' or '.join(owners) or '?'} "
                            f"only")
        build = getattr(importlib.import_module(self.module, __name__), self.function)
        return build(model, out, dtype, device, force=force, quiet=quiet, **given)


BUILDERS: dict[str, Builder] = {b.name: b for b in [
    Builder("torch", ".trace", "export_onnx",
            "torch.onnx export, every supported family, loads in onnxruntime and onnxruntime-genai",
            ("fp32", "fp16"), "ort",
            {"opset": "--opset", "optimize": "--no-optimize", "attention": "--attention", "kv_cache": "--kv-cache",
             "allow_pickle": "--allow-pickle"}),
    Builder("genai", ".genai", "build_genai",
            "onnxruntime-genai's model builder (fused kernels, fastest on CUDA; fewer families)",
            ("fp32", "fp16", "int4"), "genai"),
    Builder("tensorrt", "..engine.onnx_target", "export_standard_onnx",
            "standard ONNX ops only (no onnxruntime fusions), concat KV cache: the input of `ulsexport engine`",
            ("fp32", "fp16"), "ort", {"opset": "--opset", "allow_pickle": "--allow-pickle"}),
]}
DEFAULT_BUILDER = "torch"


def get_builder(name: str) -> Builder:
    if name not in BUILDERS:
        raise UserError(f"unknown builder '{name}'; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name]
