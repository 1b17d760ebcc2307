"""config.pbtxt of a decoder-step model for Triton's TensorRT backend (`platform: "tensorrt_plan"`):
one forward pass of the engine per request of a sequence, each cache tensor an implicit sequence
state (past_key_values.{i}.* in, present.{i}.* out: the concat layout, each step's present one
position longer than its past), starting empty (past length 0, which every profile allows).

Triton's TensorRT backend is in its full containers only (not in the nvidia-pytriton wheel), so
`ulsexport serve` does not load it; `write_step_model` lays out the model folder for them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path



def plan_step_config(name: str, manifest: dict) -> str:
    """The config.pbtxt text for engine artifact `manifest` (kind tensorrt) served as model `name`.
    Triton pairs implicit states by sorting their names, so past and present names must sort alike."""
    from ..serve.repository import pbtxt_string, step_config

    engine = manifest["engine"]
    comments = (
        f"# Written by ulsexport for Triton's TensorRT backend ({engine['library']} {engine['version']}, "
        f"{engine['precision']}); runs on compute capability {' '.join(engine['runs_on'] or ['of the build GPU'])}.",
        "# One decoder step per request of a sequence (sequence_id, sequence_start/end); the KV cache is kept",
        "# by Triton as implicit state. attention_mask covers the past and the new tokens.")
    return step_config(name, manifest["onnx"], ('platform: "tensorrt_plan"',
                                                f'default_model_filename: {pbtxt_string(engine["file"])}'),
                       comments, kind="KIND_GPU")


def write_step_model(artifact: Path, folder: Path, name: str, manifest: dict) -> Path:
    """folder/name/config.pbtxt and folder/name/1/model.plan (a hard link where the filesystem allows)."""
    from ..artifact import artifact_path
    from ..errors import UserError

    engine = manifest.get("engine")
    if not isinstance(engine, dict) or not isinstance(manifest.get("onnx"), dict):
        raise UserError(f"{artifact}'s manifest has no `engine` or `onnx` section; build the engine again")
    src = artifact_path(artifact, engine.get("file"), "engine.file")
    if Path(engine["file"]).name != engine["file"]:  # config.pbtxt names it as the model folder's own file
        raise UserError(f"{artifact}'s manifest: engine.file must be a file of the folder itself, not {engine['file']}")
    if not src.is_file():
        raise UserError(f"{artifact}: the engine file {engine['file']} is missing; build the engine again")
    model = Path(folder) / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(plan_step_config(name, manifest))
    dst = model / "1" / src.name
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return model
