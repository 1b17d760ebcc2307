"""`ulsexport engine`: a TensorRT engine (model.plan) from a standard-ops ONNX export, through the
TensorRT Python API, one code path for `tensorrt` and `tensorrt_rtx_bindings` (`library.Library`
holds their differences).

The network comes from the ONNX parser (strongly typed unless a weakly typed precision flag is
asked for and the library has it); every graph input gets a shape range in every optimization
profile (`profiles.engine_profiles`); the workspace limit, the precision flag and the timing cache
are set on the builder config. The output folder holds model.plan, the timing cache where the
library uses one, the export's tokenizer and config files, and ulsexport.json: the export's
lineage (cache_to_original_layer, kept, plan) and the engine's facts. It appears whole or not at all.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..artifact import Artifact, BuildResult, artifact_path, graph_entry, write_manifest
from ..errors import UserError, first_line
from ..outputs import atomic_output_dir, io_error, resolve_path
from .library import load_library
from .ops import standard_ops_check
from .profiles import DEFAULT_MAX_SEQ, engine_profiles, parse_batch, resolve_precision

ENGINE_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
KIND = "tensorrt"
MAX_PARSER_ERRORS = 3  # named in the one-line refusal


def read_export(model: Path) -> dict:
    """The manifest of a standard-ops, concat-cache ONNX export at `model`, or a one-line refusal."""
    model = Path(model)
    manifest = Artifact.open(model).manifest if model.is_dir() else {}
    if manifest.get("kind") != "onnx" or "onnx" not in manifest:
        raise UserError(f"--model {model} is not an ONNX export of `ulsexport onnx` (no ulsexport.json of kind onnx)")
    onnx = manifest["onnx"]
    if not isinstance(onnx, dict):
        raise UserError(f"--model {model}: its manifest's onnx section is not a mapping; re-export it")
    if onnx.get("kv_cache", "concat") != "concat":
        raise UserError(f"--model {model} has the '{onnx.get('kv_cache')}' KV cache; TensorRT needs the concat "
                        "layout: ulsexport onnx --target tensorrt")
    foreign = standard_ops_check(artifact_path(model, onnx.get("file"), "onnx.file"))
    if foreign:
        raise UserError(f"--model {model} has non-standard ops TensorRT cannot parse ({', '.join(foreign)}); "
                        "export with: ulsexport onnx --target tensorrt")
    return manifest


def model_positions(model: Path) -> int | None:
    from ..serve.generate_model import model_limits

    return model_limits(Path(model))[1]


def gpu_facts() -> dict | None:
    """{"name", "compute_capability"} of the current CUDA device, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001  facts only: a broken CUDA setup shows up in the build itself
        return None


def parser_errors(parser) -> list[str]:
    """'node NAME (OpType): description' of each error the ONNX parser recorded."""
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        name = _call(error, "node_name") or f"#{_call(error, 'node')}"
        op = _call(error, "node_operator")
        errors.append(f"node {name}" + (f" ({op})" if op else "") + f": {_call(error, 'desc')}")
    return errors


def _call(obj, method):
    try:
        value = getattr(obj, method)
        return value() if callable(value) else value
    except Exception:  # noqa: BLE001  older libraries lack some of these
        return None


def build_engine(model, out, precision: str | None = None, batch: str | tuple[int, ...] | None = None,
                 max_seq: int | None = None, timing_cache: str | Path | None = None, library: str | None = None,
                 workspace_gb: float | None = None, force: bool = False, quiet: bool = False,
                 trt_module=None) -> BuildResult:
    """Build `out`/model.plan from the ONNX export `model` (see the module docstring).

    `precision` None: the graph's own. `batch`: '1,8,32' or a tuple; one optimization profile each.
    `max_seq`: positions the engine covers (default min(4096, the model's)). `timing_cache`: a file
    loaded if it exists and written back after the build. `library`: 'tensorrt' or 'tensorrt-rtx'
    (default: the first installed). `trt_module`: a module object used instead of importing the
    library (tests pass a fake)."""
    start = time.perf_counter()
    model, out = Path(model), Path(out)
    batches = batch if isinstance(batch, tuple) else parse_batch(batch)
    if workspace_gb is not None and workspace_gb <= 0:
        raise UserError(f"--workspace-gb must be more than 0 (got {workspace_gb:g})")
    manifest = read_export(model)
    cache_in = check_timing_cache(timing_cache, model, out) if timing_cache else None
    onnx = manifest["onnx"]
    positions = model_positions(model)
    if max_seq is None:
        max_seq = min(DEFAULT_MAX_SEQ, positions) if positions else DEFAULT_MAX_SEQ
    if positions and max_seq > positions:
        raise UserError(f"--max-seq {max_seq} passes the model's {positions} positions")
    profiles = engine_profiles(onnx, batches, max_seq)
    lib, trt = load_library(library, trt_module)
    mode = resolve_precision(onnx["dtype"], precision, lib.weak_precision_flags(trt))
    with atomic_output_dir(out, force, protect=(model,)) as tmp:
        graph = artifact_path(model, onnx["file"], "onnx.file")
        plan, facts = _build(trt, lib, graph, profiles, mode, workspace_gb, cache_in, quiet)
        with open(tmp / ENGINE_FILE, "wb") as f:
            f.write(plan)
        del plan
        cache_facts = None
        if lib.timing_cache and facts.get("timing_cache") is not None:
            blob = facts["timing_cache"]
            (tmp / TIMING_CACHE_FILE).write_bytes(blob)
            saved = None
            if cache_in:
                write_file_atomically(cache_in, blob)
                saved = str(cache_in)
            cache_facts = {"file": TIMING_CACHE_FILE, "bytes": len(blob), "loaded_from": facts["timing_cache_loaded"],
                           "saved_to": saved}
        copy_side_files(model, tmp)
        engine = {
            "file": ENGINE_FILE, "library": lib.name, "module": lib.module, "version": lib.version(trt),
            "precision": mode["precision"], "strongly_typed": mode["strongly_typed"],
            "builder_flag": mode["builder_flag"], "batch": list(batches), "max_sequence_length": max_seq,
            "profiles": profiles, "workspace_bytes": facts["workspace_bytes"],
            "timing_cache": cache_facts if lib.timing_cache else
            {"used": False, "why": f"timing cache calls are no-ops in {lib.title} (1.2 and later)"},
            "build_seconds": round(facts["build_seconds"], 3), "engine_bytes": (tmp / ENGINE_FILE).stat().st_size,
            "built_on": gpu_facts(), "runs_on": list(lib.runs_on) if lib.runs_on else None,
            "runs_on_note": lib.runs_on_note,
        }
        result = {
            "kind": KIND, "source": str(model.absolute()), "model_type": manifest.get("model_type"),
            "engine": engine, "onnx": onnx,
            "cache_to_original_layer": manifest["cache_to_original_layer"],
            "kept": manifest.get("kept"), "plan": manifest.get("plan"), "source_manifest": manifest,
        }
        result["graphs"] = [graph_entry(ENGINE_FILE, result["cache_to_original_layer"], kv_cache="concat",
                                        library=lib.name)]
        write_manifest(tmp, result)
    return BuildResult(out, Artifact.open(out).manifest, time.perf_counter() - start)


def check_timing_cache(path, model: Path, out: Path) -> Path:
    """The resolved --timing-cache, refused where writing it back would replace an input or land
    in --out (which the build replaces whole)."""
    cache = resolve_path(path)
    for folder, what in ((model, "the --model export"), (out, "--out")):
        folder = resolve_path(folder)
        if cache == folder or folder in cache.parents:
            raise UserError(f"--timing-cache {path} lies inside {what} ({folder}); the build writes the cache "
                            "back there: give a file outside every input and --out")
    if cache.is_dir():
        raise UserError(f"--timing-cache {path} is a directory; give a file name")
    return cache


def write_file_atomically(path: Path, data: bytes) -> None:
    """`path` holding `data`, whole or not at all: written beside it under a temporary name, then renamed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise io_error(exc, f"writing the timing cache {path}") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def copy_side_files(model: Path, dst: Path) -> None:
    """The export's tokenizer, generation and model config files (not its graph, manifest or genai config)."""
    from ..checkpoint import copy_side_files as copy

    copy(model, dst, skip=("genai_config.json",))


def _build(trt, lib, onnx_path: Path, profiles: list[dict], mode: dict, workspace_gb, cache_in, quiet):
    """(serialized plan, facts): the library calls of one build."""
    logger = trt.Logger(trt.Logger.ERROR if quiet else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001  pybind's 'factory function returned nullptr' without a GPU
        raise UserError(f"{lib.title} could not make a builder (it needs a CUDA GPU and driver): "
                        f"{first_line(exc)}") from None
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        shown = "; ".join(errors[:MAX_PARSER_ERRORS]) + (f"; and {len(errors) - MAX_PARSER_ERRORS} more"
                                                        if len(errors) > MAX_PARSER_ERRORS else "")
        raise UserError(f"{lib.title}'s ONNX parser refused {onnx_path.name}: {shown or 'no error recorded'}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    unprofiled = [n for n in inputs if n not in profiles[0]]
    if unprofiled:
        raise UserError(f"the network has inputs the export manifest does not list: {', '.join(unprofiled)}")
    config = builder.create_builder_config()
    workspace = int(workspace_gb * 2**30) if workspace_gb else None
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if mode["builder_flag"]:
        config.set_flag(getattr(trt.BuilderFlag, mode["builder_flag"]))
    loaded = None
    if lib.timing_cache:
        blob = cache_in.read_bytes() if cache_in and cache_in.is_file() else b""
        loaded = str(cache_in.absolute()) if blob else None
        config.set_timing_cache(config.create_timing_cache(blob), False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name in inputs:
            profile.set_shape(name, shapes[name]["min"], shapes[name]["opt"], shapes[name]["max"])
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        raise UserError(f"{lib.title} could not build the engine (its log above says why)")
    facts = {"build_seconds": seconds, "workspace_bytes": workspace, "timing_cache_loaded": loaded}
    if lib.timing_cache:
        facts["timing_cache"] = bytes(memoryview(config.get_timing_cache().serialize()))
    return plan, facts


__all__ = ["ENGINE_FILE", "KIND", "TIMING_CACHE_FILE", "build_engine", "gpu_facts", "parser_errors", "read_export"]
