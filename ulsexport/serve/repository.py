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
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifact import Artifact, BuildResult, artifact_kind, artifact_path, write_manifest
from ..errors import UserError
from ..outputs import atomic_output_dir, resolve_path
from .generate_model import BATCHING, DEFAULT_DEPTH, DEFAULT_MAX_TOKENS, model_limits

SERVED = "models"           # REPO/models: the repository that is served
STEP_REPOSITORY = "onnxruntime"
KIND = "triton-repository"
# Bounds of the settings (Triton accepts larger ones and then cannot load the model, or runs out of memory)
MAX_BATCH, MAX_INSTANCES, MAX_QUEUE_DELAY_US, MAX_TOKENS_LIMIT = 4096, 64, 60_000_000, 1_000_000
SAMPLE_TEXT = "Once upon a time, a little robot said hello to 42 friends."

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
                    decoupled: bool, cuda_graph: bool = True, batching: str = "auto", draft_depth: str | None = None,
                    draft_tokens: int = 4, decode_kernels: bool = False) -> str:
    """config.pbtxt of a generate model (inputs and outputs of Triton's generate extension)."""
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    params = {"artifact": artifact, "runtime": runtime, "device": device, "dtype": dtype or "",
              "max_tokens": max_tokens, "default_max_tokens": default_max_tokens,
              "cuda_graph": "true" if cuda_graph else "false", "batching": batching,
              "draft_depth": draft_depth or "", "draft_tokens": draft_tokens,
              "decode_kernels": "true" if decode_kernels else "false"}
    lines = [
        f"# Written by `ulsexport triton`: {'streaming (decoupled, one response per token)' if decoupled else 'one response per request'}.",
        f"name: {pbtxt_string(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true allow_ragged_batch: true },',
        # INT64: Triton casts a JSON number to the input's type, so an INT32 input would wrap 2**32+1 to 1
        '  { name: "max_tokens" data_type: TYPE_INT64 dims: [ 1 ] optional: true },',
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


def plain_path(path: Path, what: str) -> Path:
    """Refuse a path tritonserver's Python backend cannot load models from: its stub takes the model's
    path as a command-line argument split at spaces, and fails on non-ASCII characters."""
    text = str(resolve_path(path))
    if re.search(r"[^\x21-\x7e]", text):
        raise UserError(f"{what} {text} holds a space or a non-ASCII character; tritonserver's Python backend "
                        "cannot load models from such a path (its stub splits the path at spaces): choose a plain path")
    return path


def _graph_complete(artifact: Path, file, what: str) -> None:
    """The ONNX graph `file` of `artifact` parses, and each external tensor lies inside its data file."""
    import onnx

    path = artifact_path(artifact, file, what)
    if not path.is_file():
        raise UserError(f"{artifact}: {what} {file} is missing; re-export the artifact")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: a truncated or foreign file
        raise UserError(f"{artifact}: {what} {file} is not a complete ONNX graph ({type(exc).__name__}); "
                        "re-export the artifact") from None
    if not proto.graph.node or not proto.graph.output:
        raise UserError(f"{artifact}: {what} {file} holds no graph (truncated?); re-export the artifact")
    sizes: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location")
        if location not in sizes:
            data = artifact_path(artifact, location, f"the weights file of {file}")
            sizes[location] = data.stat().st_size if data.is_file() else -1
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        if sizes[location] < 0:
            raise UserError(f"{artifact}: the weights file {location} of {file} is missing; re-export the artifact")
        if end > sizes[location]:
            raise UserError(f"{artifact}: the weights file {location} of {file} holds {sizes[location]} bytes, "
                            f"short of the {end} its tensor {tensor.name} needs (truncated?); re-export the artifact")


def check_artifact(artifact: Path, kind: str, source: dict) -> None:
    """Refuse, in one line, an artifact that would not load in the server: every graph (each depth's)
    and its weights present, inside the folder and complete, and a tokenizer that round-trips text."""
    from ..tokenizer import load_tokenizer

    if kind == "onnx":
        if source.get("multi_depth"):
            from ..runtime.ort import multi_depth_files

            multi_depth_files(artifact, source)   # the runtime's own checks: graphs, tags, files, the weights' size
            for i, graph in enumerate(source["graphs"]):
                _graph_complete(artifact, graph["file"], f"graphs[{i}].file")
        else:
            onnx = source.get("onnx")
            if not isinstance(onnx, dict):
                raise UserError(f"{artifact}'s manifest has no `onnx` section; re-export it")
            _graph_complete(artifact, onnx.get("file"), "onnx.file")
            if onnx.get("external_data") is not None:
                artifact_path(artifact, onnx["external_data"], "onnx.external_data")
    if kind == "genai":
        from ..runtime.genai import check_genai_config

        check_genai_config(artifact)
    tokenizer = load_tokenizer(artifact)
    try:
        back = tokenizer.decode(tokenizer(SAMPLE_TEXT).input_ids, skip_special_tokens=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the server could not tokenize
        back = f"{type(exc).__name__}: {exc}"
    if " ".join(str(back).split()) != SAMPLE_TEXT:
        raise UserError(f"{artifact}'s tokenizer does not round-trip text ({SAMPLE_TEXT!r} came back as "
                        f"{str(back)[:60]!r}): a tokenizer file is missing or broken")


def default_name(artifact: Path) -> str:
    """artifacts/NAME/onnx -> NAME; any other folder -> its own name; made URL-safe."""
    artifact = Path(artifact).resolve()
    stem = artifact.parent.name if artifact.name in ("onnx", "genai", "hf", "healed") else artifact.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "ulsexport"


def write_repository(artifact: str | Path, out: str | Path, name: str | None = None, device: str = "cpu",
                     runtime: str | None = None, dtype: str | None = None, instances: int = 1, max_batch: int = 8,
                     max_tokens: int | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                     queue_delay_us: int = 2000, force: bool = False, cuda_graph: bool = True,
                     batching: str = "auto", draft_depth: str | None = None, draft_tokens: int = 4,
                     decode_kernels: bool = False) -> BuildResult:
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
    if batching not in BATCHING:
        raise UserError(f"--batching must be one of {', '.join(BATCHING)}, not {batching!r}")
    _, positions = model_limits(artifact)
    if max_tokens is None:  # 512, or what the model's positions leave room for
        max_tokens = min(512, positions - 1) if positions else 512
    for flag, value, low, high in (("--max-batch", max_batch, 1, MAX_BATCH),
                                   ("--instances", instances, 1, MAX_INSTANCES),
                                   ("--max-tokens", max_tokens, 1, MAX_TOKENS_LIMIT),
                                   ("--default-max-tokens", default_max_tokens, 1, MAX_TOKENS_LIMIT),
                                   ("--queue-delay-us", queue_delay_us, 0, MAX_QUEUE_DELAY_US)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{flag} must be a whole number (got {value!r})")
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value})")
        if value > high:
            raise UserError(f"{flag} must be at most {high} (got {value})")
    name = name or default_name(artifact)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a URL path)")
    if not any((artifact / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{artifact} has no tokenizer files; the server tokenizes text_input with the artifact's own")
    if positions and max_tokens >= positions:
        raise UserError(f"--max-tokens {max_tokens} leaves no room for a prompt in the model's {positions} positions")
    plain_path(Path(out), "--out")
    opened = Artifact.open(artifact)
    source, onnx = opened.manifest, opened.onnx  # multi-depth: the default graph's
    if opened.multi_depth:
        if runtime != "ort":
            raise UserError(f"{artifact} is a multi-depth export; --runtime ort serves its depths, not {runtime}")
        graphs = source.get("graphs")
        if not isinstance(graphs, list) or not all(isinstance(g, dict) and isinstance(g.get("tag"), str)
                                                   for g in graphs):
            raise UserError(f"{artifact}'s manifest: `graphs` must be a list of graphs, each with a tag; re-export it")
        depths = [{"tag": g["tag"], "speedup": g.get("speedup"), "kept": g.get("kept"), "file": g.get("file")}
                  for g in graphs]
        default_depth = source.get("default_graph")
        if not depths or default_depth not in [d["tag"] for d in depths]:
            raise UserError(f"{artifact}'s manifest lists no graphs or no default_graph among them; re-export it")
    else:
        depths = [{"tag": DEFAULT_DEPTH, "speedup": (source.get("plan") or {}).get("speedup_target"),
                   "kept": source.get("kept"), "file": onnx.get("file")}]
        default_depth = DEFAULT_DEPTH
    if decode_kernels and (device != "cuda" or runtime != "ort" or source.get("multi_depth")):
        raise UserError("--decode-kernels serves with ulsexport's CUDA kernels: it needs --device cuda, --runtime ort "
                        "and a single-depth ONNX export (each depth of a multi-depth export would hold its own "
                        "transposed copy of the weights)")
    if draft_depth is not None:
        tags = [d["tag"] for d in depths]
        if not source.get("multi_depth") or draft_depth not in tags or draft_depth == default_depth:
            raise UserError(f"--draft-depth {draft_depth!r}: speculative requests need a multi-depth export and one of "
                            f"its pruned depths ({', '.join(t for t in tags if t != default_depth) or 'none here'})")
        if batching == "static" or batching == "auto" and device != "cpu":
            raise UserError("--draft-depth runs on the decode engine: add --batching continuous")
        if not 1 <= draft_tokens <= 16:
            raise UserError(f"--draft-tokens {draft_tokens} must be between 1 and 16")
    check_artifact(artifact, kind, source)
    stream_name = f"{name}_stream"
    common = dict(runtime=runtime, device=device, dtype=dtype, max_batch=max_batch, max_tokens=max_tokens,
                  default_max_tokens=min(default_max_tokens, max_tokens), instances=instances, cuda_graph=cuda_graph,
                  queue_delay_us=queue_delay_us, batching=batching, draft_depth=draft_depth, draft_tokens=draft_tokens,
                  decode_kernels=decode_kernels)
    with atomic_output_dir(Path(out), force, protect=(artifact,)) as tmp:
        served = tmp / SERVED
        for model, decoupled in ((name, False), (stream_name, True)):
            (served / model / "1").mkdir(parents=True)
            (served / model / "1" / "model.py").write_text(MODEL_PY)
            where = "1/artifact" if not decoupled else f"../{name}/1/artifact"
            (served / model / "config.pbtxt").write_text(generate_config(model, artifact=where, decoupled=decoupled,
                                                                         **common))
        def inside(src, dst):  # a symlink in the artifact must not bring in a file from outside it
            return _link_or_copy(artifact_path(artifact, os.path.relpath(src, artifact), "a file of the artifact"), dst)
        shutil.copytree(artifact, served / name / "1" / "artifact", copy_function=inside)
        models = [{"name": name, "role": "generate", "path": f"{SERVED}/{name}", "served": True},
                  {"name": stream_name, "role": "generate_stream", "path": f"{SERVED}/{stream_name}", "served": True}]
        step = {"written": False}
        step_name = f"{name}_step"
        if kind != "onnx":
            step["reason"] = f"the step model needs an ONNX export; {artifact} is a {kind} artifact"
        elif onnx.get("kv_cache") != "concat":
            step["reason"] = (f"the artifact's KV cache is '{onnx.get('kv_cache')}' (one buffer bound as past and "
                              "present); Triton's implicit state needs the concat layout (ulsexport onnx --kv-cache concat)")
        elif onnx.get("external_data") and not artifact_path(artifact, onnx["external_data"],
                                                             "onnx.external_data").is_file():
            step["reason"] = f"the external data file {onnx['external_data']} is missing"
        else:
            folder = tmp / STEP_REPOSITORY / step_name / "1"
            folder.mkdir(parents=True)
            _link_or_copy(artifact_path(artifact, onnx["file"], "onnx.file"), folder / "model.onnx")
            if onnx.get("external_data"):  # the graph names it as is: it must be a plain file name
                data = artifact_path(artifact, onnx["external_data"], "onnx.external_data")
                if data.parent != artifact.resolve() or Path(onnx["external_data"]).name != onnx["external_data"]:
                    raise UserError(f"{artifact}'s manifest: onnx.external_data must be a file of the folder itself")
                _link_or_copy(data, folder / data.name)
            try:
                config = step_config(step_name, onnx)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise UserError(f"{artifact}'s manifest: its onnx section is malformed ({type(exc).__name__}: "
                                f"{exc}); re-export the artifact") from None
            (folder.parent / "config.pbtxt").write_text(config)
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
            "positions": positions, "queue_delay_us": queue_delay_us, "batching": batching,
            "decode_kernels": decode_kernels,
            "draft_depth": draft_depth, "draft_tokens": draft_tokens if draft_depth else None,
            "stop": "a row stops at an eos token or its max_tokens",
            "multi_depth": bool(source.get("multi_depth")), "depths": depths, "default_depth": default_depth,
            "served_repository": SERVED, "models": models, "step_model": step,
        }
        write_manifest(tmp, manifest)
        manifest = Artifact.open(tmp).manifest
    return BuildResult(Path(out), manifest, time.perf_counter() - start)


@dataclass(frozen=True)
class TritonSettings:
    """The triton stage's settings, declared once: the CLI's options and a recipe's `triton:` section build
    it; `write` writes the repository."""
    name: str | None = None                # default: artifacts/NAME/onnx -> NAME
    device: str = "cpu"
    runtime: str | None = None             # default: the artifact's own
    instances: int = 1
    max_batch: int = 8
    max_tokens: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    queue_delay_us: int = 2000
    no_cuda_graph: bool = False
    batching: str = "auto"
    draft_depth: str | None = None
    draft_tokens: int = 4
    decode_kernels: bool = False

    def write(self, artifact, out, force: bool = False) -> BuildResult:
        fields = asdict(self)
        return write_repository(artifact, out, force=force, cuda_graph=not fields.pop("no_cuda_graph"), **fields)


# The recipe's `triton:` section: field -> (type, default), in recipe.SCHEMA's form; the defaults are TritonSettings'.
RECIPE_FIELDS: dict[str, tuple[type | tuple, object]] = {f: (t, getattr(TritonSettings, f)) for f, t in [
    ("name", str), ("device", str), ("runtime", str), ("instances", int), ("max_batch", int), ("max_tokens", int),
    ("default_max_tokens", int), ("queue_delay_us", int), ("no_cuda_graph", bool), ("batching", str),
    ("draft_depth", str), ("draft_tokens", int), ("decode_kernels", bool)]}


def recipe_stage(section: dict, out: Path, quiet: bool = False) -> BuildResult:
    """A recipe's last stage: out/triton over out/onnx (or out/hf when the recipe has no onnx stage),
    named after the recipe's folder unless the section names it."""
    out = Path(out)
    artifact = out / "onnx" if (out / "onnx").is_dir() else out / "hf"
    values = {field: section.get(field, default) for field, (_, default) in RECIPE_FIELDS.items()}
    values["name"] = values["name"] or re.sub(r"[^A-Za-z0-9_.-]+", "-", out.name)
    return TritonSettings(**values).write(artifact, out / "triton", force=True)
