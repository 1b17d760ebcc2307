"""`ulsexport triton`: a Triton Inference Server model repository over an artifact.

Layout of REPO (written whole or not at all):

    REPO/ulsexport.json                 what it serves (source artifact, kept layers, runtime, models)
    REPO/models/                        the repository `ulsexport serve` (or any tritonserver) loads
        NAME/config.pbtxt               generate model, Python backend, dynamic batching
        NAME/1/model.py                 one import: ulsexport.serve.generate_model.TritonPythonModel
        NAME/1/artifact/                the artifact (hard links where the filesystem allows)
        NAME_stream/config.pbtxt        the same model, decoupled: one response per token
        NAME_stream/1/model.py
    REPO/onnxruntime/                   for Triton's full containers only (onnxruntime backend)
        NAME_step/config.pbtxt          one decoder step per request, KV cache as implicit state
        NAME_step/1/model.onnx

A multi-depth export (`ulsexport onnx --speedups 1,2`) is served whole: each request may name its
depth in the optional `depth` input ("full", "2x", ...; the export's default graph when left out),
and ulsexport.json lists the depths served (`depths`, `default_depth`). A single-depth artifact
serves one depth, "default". The step model is the default graph's.

Two generate models rather than one decoupled model: Triton refuses KServe /infer over HTTP for
decoupled models (so tritonclient's HTTP `infer` could not reach it), while per-token streaming
needs decoupled mode. The step model lives in its own repository folder because tritonserver with
model control off loads every model of the repository it is given, and the wheel's server has no
onnxruntime backend.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from ..artifact import BuildResult, artifact_kind, read_manifest, write_manifest
from ..errors import UserError
from ..outputs import atomic_output_dir
from .generate_model import DEFAULT_DEPTH, DEFAULT_MAX_TOKENS, model_limits

SERVED = "models"           # REPO/models: the repository that is served
STEP_REPOSITORY = "onnxruntime"
KIND = "triton-repository"

MODEL_PY = '''\
# Written by `ulsexport triton`. The implementation lives in the ulsexport package, which must be
# importable by the Python that the server's Python backend stub runs (pip install 'ulsexport[triton]').
# Settings: the `parameters` of ../config.pbtxt.
from ulsexport.serve.generate_model import TritonPythonModel  # noqa: F401
'''


def pbtxt_string(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(params: dict) -> str:
    return "\n".join(f'parameters {{ key: {pbtxt_string(k)} value {{ string_value: {pbtxt_string(v)} }} }}'
                     for k, v in params.items())


def generate_config(name: str, *, artifact: str, runtime: str, device: str, dtype: str | None, max_batch: int,
                    max_tokens: int, default_max_tokens: int, instances: int, queue_delay_us: int,
                    decoupled: bool, cuda_graph: bool = True) -> str:
    """config.pbtxt of a generate model (inputs and outputs of Triton's generate extension)."""
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    params = {"artifact": artifact, "runtime": runtime, "device": device, "dtype": dtype or "",
              "max_tokens": max_tokens, "default_max_tokens": default_max_tokens,
              "cuda_graph": "true" if cuda_graph else "false"}
    lines = [
        f"# Written by `ulsexport triton`: {'streaming (decoupled, one response per token)' if decoupled else 'one response per request'}.",
        f"name: {pbtxt_string(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true allow_ragged_batch: true },',
        '  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        '  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },',
        '  { name: "depth" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        "]",
        "output [",
        '  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }',
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
    ]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    lines.append(_parameters(params))
    return "\n".join(lines) + "\n"


_DTYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}


def step_config(name: str, onnx: dict, model_lines: tuple[str, ...] = ('backend: "onnxruntime"',),
                comments: tuple[str, ...] | None = None, kind: str = "KIND_AUTO") -> str:
    """config.pbtxt of a decoder-step model (the onnxruntime backend by default; `model_lines` name
    another, e.g. TensorRT's plan): one forward pass of the concat-cache graph per request, each cache
    tensor an implicit sequence state (past_key_values.{i}.* in, present.{i}.* out). Triton pairs states
    by sorting their names, so the pairs must sort alike."""
    inputs = [n for pair in onnx["cache_inputs"] for n in pair]
    outputs = [n for pair in onnx["cache_outputs"] for n in pair]
    if [outputs[inputs.index(n)] for n in sorted(inputs)] != sorted(outputs):
        raise UserError("the export's cache names do not sort alike (past vs present); cannot pair them as states")
    dtype = _DTYPES[onnx["dtype"]]  # I/O types are the graph's
    heads, head_dim = onnx["num_kv_heads"], onnx["head_dim"]
    vocab = onnx["io_shapes"]["logits"][-1]
    comments = comments or (
        "# Written by `ulsexport triton` for Triton's full containers (onnxruntime backend); not loaded by",
        "# `ulsexport serve` (the nvidia-pytriton wheel has no onnxruntime backend). One decoder step per",
        "# request of a sequence (sequence_id, sequence_start/end); the KV cache is kept by Triton as",
        "# implicit state. attention_mask covers the past and the new tokens; position_ids count from 0.")
    lines = [*comments, f"name: {pbtxt_string(name)}", *model_lines,
             "max_batch_size: 1  # rows of one batch would need one cache length (concat layout)",
             "input [",
             '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },',
             '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }' + (
                 "," if "position_ids" in onnx["inputs"] else "")]
    if "position_ids" in onnx["inputs"]:
        lines.append('  { name: "position_ids" data_type: TYPE_INT64 dims: [ -1 ] }')
    lines += ["]", "output [", f'  {{ name: "logits" data_type: {dtype} dims: [ -1, {vocab} ] }}', "]",
              "sequence_batching {", "  max_sequence_idle_microseconds: 60000000", "  state ["]
    states = [f'    {{ input_name: {pbtxt_string(i)} output_name: {pbtxt_string(o)} data_type: {dtype} '
              f'dims: [ {heads}, -1, {head_dim} ] initial_state {{ data_type: {dtype} dims: [ {heads}, 0, {head_dim} ] '
              f'zero_data: true name: {pbtxt_string("empty " + i)} }} }}' for i, o in zip(inputs, outputs)]
    lines += [",\n".join(states), "  ]", "}", f"instance_group [ {{ count: 1 kind: {kind} }} ]"]
    return "\n".join(lines) + "\n"


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def default_name(artifact: Path) -> str:
    """artifacts/NAME/onnx -> NAME; any other folder -> its own name; made URL-safe."""
    artifact = Path(artifact).resolve()
    stem = artifact.parent.name if artifact.name in ("onnx", "genai", "hf", "healed") else artifact.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "ulsexport"


def write_repository(artifact: str | Path, out: str | Path, name: str | None = None, device: str = "cpu",
                     runtime: str | None = None, dtype: str | None = None, instances: int = 1, max_batch: int = 8,
                     max_tokens: int | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                     queue_delay_us: int = 2000, force: bool = False, cuda_graph: bool = True) -> BuildResult:
    """Write a Triton model repository serving `artifact` (see the module docstring); whole or nothing."""
    from ..runtime import RUNTIMES, default_runtime

    start = time.perf_counter()
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise UserError(f"--model {artifact} is not a directory (an artifact from `ulsexport onnx` or `prune`)")
    kind = artifact_kind(artifact)
    if kind == KIND:
        raise UserError(f"--model {artifact} is already a Triton repository; give the artifact it serves")
    runtime = runtime or default_runtime(kind)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    if kind not in RUNTIMES[runtime].kinds:
        raise UserError(f"--runtime {runtime} runs {' or '.join(RUNTIMES[runtime].kinds)} artifacts; "
                        f"{artifact} is a {kind} artifact")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device}")
    _, positions = model_limits(artifact)
    if max_tokens is None:  # 512, or what the model's positions leave room for
        max_tokens = min(512, positions - 1) if positions else 512
    for flag, value in (("--max-batch", max_batch), ("--instances", instances), ("--max-tokens", max_tokens),
                        ("--default-max-tokens", default_max_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if queue_delay_us < 0:
        raise UserError(f"--queue-delay-us must be 0 or more (got {queue_delay_us})")
    name = name or default_name(artifact)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a URL path)")
    if not any((artifact / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{artifact} has no tokenizer files; the server tokenizes text_input with the artifact's own")
    if positions and max_tokens >= positions:
        raise UserError(f"--max-tokens {max_tokens} leaves no room for a prompt in the model's {positions} positions")
    source = read_manifest(artifact) or {}
    onnx = source.get("onnx") or {}  # a multi-depth export's: its default graph's
    if source.get("multi_depth"):
        if runtime != "ort":
            raise UserError(f"{artifact} is a multi-depth export; --runtime ort serves its depths, not {runtime}")
        depths = [{"tag": g["tag"], "speedup": g.get("speedup"), "kept": g.get("kept"), "file": g.get("file")}
                  for g in source.get("graphs") or []]
        default_depth = source.get("default_graph")
        if not depths or default_depth not in [d["tag"] for d in depths]:
            raise UserError(f"{artifact}'s manifest lists no graphs or no default_graph among them; re-export it")
    else:
        depths = [{"tag": DEFAULT_DEPTH, "speedup": (source.get("plan") or {}).get("speedup_target"),
                   "kept": source.get("kept"), "file": onnx.get("file")}]
        default_depth = DEFAULT_DEPTH
    stream_name = f"{name}_stream"
    common = dict(runtime=runtime, device=device, dtype=dtype, max_batch=max_batch, max_tokens=max_tokens,
                  default_max_tokens=min(default_max_tokens, max_tokens), instances=instances, cuda_graph=cuda_graph,
                  queue_delay_us=queue_delay_us)
    with atomic_output_dir(Path(out), force, protect=(artifact,)) as tmp:
        served = tmp / SERVED
        for model, decoupled in ((name, False), (stream_name, True)):
            (served / model / "1").mkdir(parents=True)
            (served / model / "1" / "model.py").write_text(MODEL_PY)
            where = "1/artifact" if not decoupled else f"../{name}/1/artifact"
            (served / model / "config.pbtxt").write_text(generate_config(model, artifact=where, decoupled=decoupled,
                                                                         **common))
        shutil.copytree(artifact, served / name / "1" / "artifact", copy_function=_link_or_copy)
        models = [{"name": name, "role": "generate", "path": f"{SERVED}/{name}", "served": True},
                  {"name": stream_name, "role": "generate_stream", "path": f"{SERVED}/{stream_name}", "served": True}]
        step = {"written": False}
        step_name = f"{name}_step"
        if kind != "onnx":
            step["reason"] = f"the step model needs an ONNX export; {artifact} is a {kind} artifact"
        elif onnx.get("kv_cache") != "concat":
            step["reason"] = (f"the artifact's KV cache is '{onnx.get('kv_cache')}' (one buffer bound as past and "
                              "present); Triton's implicit state needs the concat layout (ulsexport onnx --kv-cache concat)")
        elif onnx.get("external_data") and not (artifact / onnx["external_data"]).is_file():
            step["reason"] = f"the external data file {onnx['external_data']} is missing"
        else:
            folder = tmp / STEP_REPOSITORY / step_name / "1"
            folder.mkdir(parents=True)
            _link_or_copy(artifact / onnx["file"], folder / "model.onnx")
            if onnx.get("external_data"):
                _link_or_copy(artifact / onnx["external_data"], folder / onnx["external_data"])
            (folder.parent / "config.pbtxt").write_text(step_config(step_name, onnx))
            step.update(written=True, depth=default_depth,
                        note="for Triton's full containers (onnxruntime backend); not served by "
                             "`ulsexport serve`: the nvidia-pytriton wheel has no onnxruntime backend")
            models.append({"name": step_name, "role": "decoder_step", "path": f"{STEP_REPOSITORY}/{step_name}",
                           "served": False})
        manifest = {
            "kind": KIND, "source": str(artifact.resolve()), "source_kind": kind,
            "kept": source.get("kept"), "cache_to_original_layer": source.get("cache_to_original_layer"),
            "runtime": runtime, "device": device, "dtype": dtype or onnx.get("dtype"), "instances": instances,
            "max_batch": max_batch, "max_tokens": max_tokens, "default_max_tokens": common["default_max_tokens"],
            "positions": positions, "queue_delay_us": queue_delay_us,
            "stop": "a row stops at an eos token or its max_tokens",
            "multi_depth": bool(source.get("multi_depth")), "depths": depths, "default_depth": default_depth,
            "served_repository": SERVED, "models": models, "step_model": step,
        }
        write_manifest(tmp, manifest)
        manifest = read_manifest(tmp)
    return BuildResult(Path(out), manifest, time.perf_counter() - start)


# The recipe's `triton:` section: field -> (type, default), in recipe.SCHEMA's form.
RECIPE_FIELDS: dict[str, tuple[type | tuple, object]] = {
    "name": (str, None), "device": (str, "cpu"), "runtime": (str, None), "instances": (int, 1),
    "max_batch": (int, 8), "max_tokens": (int, None), "default_max_tokens": (int, DEFAULT_MAX_TOKENS),
    "queue_delay_us": (int, 2000),
}


def recipe_stage(section: dict, out: Path, quiet: bool = False) -> BuildResult:
    """A recipe's last stage: out/triton over out/onnx (or out/hf when the recipe has no onnx stage),
    named after the recipe's folder unless the section names it."""
    out = Path(out)
    artifact = out / "onnx" if (out / "onnx").is_dir() else out / "hf"
    values = {field: section.get(field, default) for field, (_, default) in RECIPE_FIELDS.items()}
    values["name"] = values["name"] or re.sub(r"[^A-Za-z0-9_.-]+", "-", out.name)
    return write_repository(artifact, out / "triton", force=True, **values)
