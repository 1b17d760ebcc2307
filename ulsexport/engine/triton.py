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

from ..errors import UserError

TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}


def _string(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_step_config(name: str, manifest: dict) -> str:
    """The config.pbtxt text for engine artifact `manifest` (kind tensorrt) served as model `name`.
    Triton pairs implicit states by sorting their names, so past and present names must sort alike."""
    onnx, engine = manifest["onnx"], manifest["engine"]
    inputs = [n for pair in onnx["cache_inputs"] for n in pair]
    outputs = [n for pair in onnx["cache_outputs"] for n in pair]
    if [outputs[inputs.index(n)] for n in sorted(inputs)] != sorted(outputs):
        raise UserError("the engine's cache names do not sort alike (past vs present); cannot pair them as states")
    dtype = TYPES[onnx["dtype"]]  # I/O types are the graph's, whatever precision the engine computes in
    heads, head_dim = onnx["num_kv_heads"], onnx["head_dim"]
    vocab = onnx["io_shapes"]["logits"][-1]
    max_batch = min(engine["batch"][-1], 1)
    lines = [
        f"# Written by ulsexport for Triton's TensorRT backend ({engine['library']} {engine['version']}, "
        f"{engine['precision']}); runs on compute capability {' '.join(engine['runs_on'] or ['of the build GPU'])}.",
        "# One decoder step per request of a sequence (sequence_id, sequence_start/end); the KV cache is kept",
        "# by Triton as implicit state. attention_mask covers the past and the new tokens.",
        f"name: {_string(name)}",
        'platform: "tensorrt_plan"',
        f'default_model_filename: {_string(engine["file"])}',
        f"max_batch_size: {max_batch}  # one sequence a batch: rows would need one cache length (concat layout)",
        "input [",
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },',
        '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }' + (
            "," if "position_ids" in onnx["inputs"] else ""),
    ]
    if "position_ids" in onnx["inputs"]:
        lines.append('  { name: "position_ids" data_type: TYPE_INT64 dims: [ -1 ] }')
    lines += ["]", "output [", f'  {{ name: "logits" data_type: {dtype} dims: [ -1, {vocab} ] }}', "]",
              "sequence_batching {", "  max_sequence_idle_microseconds: 60000000", "  state ["]
    states = [f'    {{ input_name: {_string(i)} output_name: {_string(o)} data_type: {dtype} '
              f'dims: [ {heads}, -1, {head_dim} ] initial_state {{ data_type: {dtype} dims: [ {heads}, 0, {head_dim} ] '
              f'zero_data: true name: {_string("empty " + i)} }} }}' for i, o in zip(inputs, outputs)]
    lines += [",\n".join(states), "  ]", "}", "instance_group [ { count: 1 kind: KIND_GPU } ]"]
    return "\n".join(lines) + "\n"


def write_step_model(artifact: Path, folder: Path, name: str, manifest: dict) -> Path:
    """folder/name/config.pbtxt and folder/name/1/model.plan (a hard link where the filesystem allows)."""
    model = Path(folder) / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(plan_step_config(name, manifest))
    src, dst = Path(artifact) / manifest["engine"]["file"], model / "1" / manifest["engine"]["file"]
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return model
