"""`ulsexport onnx --target tensorrt`: the torch builder's graph with standard ONNX ops only.

That is the plain torch.onnx graph (constants folded, no onnxruntime fusions: `optimize=False`) with
the concat KV cache (past_key_values.{i}.* in, present.{i}.* out, separate tensors), checked against
PyTorch like every torch export and then checked for non-standard ops before it is written.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..artifact import Artifact, BuildResult, write_manifest
from ..errors import UserError
from ..outputs import atomic_output_dir
from .ops import standard_ops_check

TARGET = "tensorrt"


def export_standard_onnx(model, out, dtype: str = "fp32", device: str = "cpu", force: bool = False,
                         quiet: bool = False, opset: int | None = None, allow_pickle: bool = False) -> BuildResult:
    """Export checkpoint `model` to `out` for TensorRT (see the module docstring); whole or nothing."""
    from ..export.trace import ONNX_FILE, export_onnx

    start = time.perf_counter()
    out = Path(out)
    with atomic_output_dir(out, force, protect=(Path(model),)) as tmp:
        inner = tmp / "graph"
        export_onnx(model, inner, dtype, device, opset=opset, optimize=False, kv_cache="concat", quiet=quiet,
                    allow_pickle=allow_pickle)
        foreign = standard_ops_check(inner / ONNX_FILE)
        if foreign:
            raise UserError(f"the exported graph has non-standard ops TensorRT cannot parse: {', '.join(foreign)}")
        for path in inner.iterdir():
            shutil.move(str(path), tmp / path.name)
        inner.rmdir()
        manifest = dict(Artifact.open(tmp).manifest)
        manifest.pop("tool", None), manifest.pop("version", None)
        manifest["target"] = TARGET
        manifest["standard_ops"] = True
        write_manifest(tmp, manifest)
    return BuildResult(out, Artifact.open(out).manifest, time.perf_counter() - start)
