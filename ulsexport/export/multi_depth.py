"""Several depths from one set of weights: one ONNX graph per speedup, every weight stored once.

Each depth is planned, pruned and exported as usual (`trace.export_onnx`, parity-checked against its
pruned checkpoint), into a scratch folder. Then the graphs are merged: every initializer of more than
`INLINE_BYTES` goes into one external data file, `weights.onnx.data`, once per distinct content, under
a name keyed by the original layer it came from (`layers.<original>.<rest of the name>`; tensors of no
layer `shared.<name>`), and each depth's graph is renamed to those names and points into that
file. A layer that several depths keep is stored once, so the folder holds about one full model, not
the sum of the depths. Each graph still loads on its own (`onnxruntime.InferenceSession(file)`);
`runtime.ort.MultiDepthDecoder` loads the shared weights once and gives them to a session per depth.

A depth can come from a checkpoint of its own (`depth_models`, `onnx --depth-model 2=DIR`) instead of a
plan: a student pruned from this model and healed alone, whose kept layers say which depth it is. The full
depth then stays exactly this model and the healed depth drafts for self-speculative decoding
(`runtime.speculative`) with the acceptance of its own healing. Its weights are its own: the tensors healing
changed (all of them, after full training) are stored beside the model's, so the folder holds the model plus
the draft, as a separate draft model would, not one model.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact import Artifact, BuildResult, artifact_path, checkpoint_hashes, file_sha256, write_manifest
from ..errors import UserError
from ..outputs import atomic_output_dir
from ..progress import progress_bar

WEIGHTS_FILE = "weights.onnx.data"
INLINE_BYTES = 1024       # smaller initializers (shapes, scalars) stay inside each graph
ALIGN = 4096              # each tensor starts on a page, so onnxruntime can map the file
PER_DEPTH_FILES = (".onnx", ".onnx.data", "ulsexport.json", "genai_config.json")
LAYER_NAME = re.compile(r"(^|[./_])layers[._](\d+)([._])")


def depth_tag(speedup: float, full: bool) -> str:
    return "full" if full else f"{speedup:g}x"


def export_multi_depth(model, out, speedups, strategy: str = "uls", calib=None, calib_tokens: int | None = None,
                       calib_device: str = "cpu", dtype: str = "fp32", device: str = "cpu", force: bool = False,
                       quiet: bool = False, depth_models: dict | None = None, **export_options) -> BuildResult:
    """Export checkpoint `model` at every speedup of `speedups` into `out`, the weights shared; the speedups
    of `depth_models` ({speedup: checkpoint folder}) from those checkpoints."""
    from ..checkpoint import load_model_info
    from ..plan.scoring import DEFAULT_CALIB_TOKENS, depth_plans
    from ..prune import prune_checkpoint
    from .trace import export_onnx

    start = time.perf_counter()
    model_dir, config, adapter = load_model_info(model)
    num_layers = adapter.num_layers(config)
    # depths from checkpoints of their own, checked before any plan is made (calibration can take minutes)
    given = {float(s): _GivenDepth.of(model_dir, config, adapter, float(s), folder)
             for s, folder in (depth_models or {}).items()}
    unknown = sorted(set(given) - {float(s) for s in speedups})
    if unknown:
        raise UserError(f"--depth-model {', '.join(f'{s:g}' for s in unknown)}: not one of --speedups")
    planned = [s for s in speedups if float(s) not in given]
    plans = depth_plans(model_dir, planned, strategy, calib, calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS,
                        device=calib_device, quiet=quiet) if planned else []
    plans = sorted(plans + [(s, d.plan) for s, d in given.items()], key=lambda item: item[0])
    with atomic_output_dir(Path(out), force, protect=(model_dir, *(d.folder for d in given.values()))) as tmp, \
            progress_bar(len(plans), "export depths", unit="depth", quiet=quiet) as bar:
        work = tmp / ".depths"
        depths = []
        for speedup, plan in plans:
            full = len(plan.kept) == num_layers
            tag = depth_tag(speedup, full)
            if tag in {d["tag"] for d in depths}:
                raise UserError(f"--speedups {speedup:g} keeps the same layers as another speedup; give each once")
            source = given.get(float(speedup))
            pruned = source.folder if source else prune_checkpoint(model_dir, work / tag / "hf", plan, quiet=True).out_dir
            exported = export_onnx(pruned, work / tag / "onnx", dtype, device, quiet=True, **export_options)
            depths.append({"tag": tag, "speedup": speedup, "plan": plan.to_dict(), "dir": exported.out_dir,
                           "manifest": exported.manifest, "model": source.record() if source else None})
            bar.update()
        manifest = merge_depths(depths, tmp, model_dir, config)
        planned_first = next((d for d in depths if not d["model"]), depths[0])   # --model's own side files
        for side in planned_first["dir"].iterdir():  # tokenizer and configs, the same for every depth
            if side.is_file() and not side.name.endswith(PER_DEPTH_FILES):
                shutil.copy2(side, tmp / side.name)
        shutil.rmtree(work)
        manifest["seconds"] = round(time.perf_counter() - start, 1)
        write_manifest(tmp, manifest)
    return BuildResult(Path(out), manifest, time.perf_counter() - start)


def merge_depths(depths: list[dict], out: Path, model_dir: Path, config: dict) -> dict:
    """Write every depth's graph into `out` over one shared weights file; the multi-depth manifest."""
    import onnx

    entries: dict[str, dict] = {}   # content key -> {"name", "offset", "length"}
    names: dict[str, str] = {}      # shared name -> content key (names must stay unique)
    graphs, own_bytes = [], 0
    with open(out / WEIGHTS_FILE, "wb") as data:
        for depth in depths:
            folder, section = depth["dir"], depth["manifest"]["onnx"]
            layers = {int(k): v for k, v in depth["manifest"]["cache_to_original_layer"].items()}
            proto = onnx.load(str(artifact_path(folder, section["file"], "onnx.file")), load_external_data=False)
            renames, duplicates = {}, []
            for tensor in proto.graph.initializer:
                raw = _tensor_bytes(tensor, folder)
                if len(raw) <= INLINE_BYTES:
                    continue
                own_bytes += len(raw)
                key = hashlib.sha256(raw).hexdigest() + f":{tensor.data_type}:{list(tensor.dims)}"
                if key not in entries:
                    name = _unique(_shared_name(tensor.name, layers), key, names)
                    data.write(b"\0" * (-data.tell() % ALIGN))
                    entries[key] = {"name": name, "offset": data.tell(), "length": len(raw)}
                    data.write(raw)
                entry = entries[key]
                if entry["name"] in renames.values():  # the same content twice in one graph: keep one
                    duplicates.append(tensor)
                renames[tensor.name] = entry["name"]
                _point_to_shared(tensor, entry)
            for tensor in duplicates:
                proto.graph.initializer.remove(tensor)
            _rename_initializers(proto.graph, renames)
            file = f"{depth['tag']}.onnx"
            onnx.save(proto, str(out / file))
            onnx_section = {**section, "file": file, "external_data": WEIGHTS_FILE}
            graphs.append({"file": file, "role": "decoder", "tag": depth["tag"], "speedup": depth["speedup"],
                           "kept": depth["plan"]["kept"],
                           "cache_to_original_layer": depth["manifest"]["cache_to_original_layer"],
                           "plan": depth["plan"], "onnx": onnx_section,
                           **(depth["model"] or {}),
                           "optimizations": depth["manifest"].get("optimizations"),
                           "parity_check": depth["manifest"].get("parity_check")})
        shared_bytes = data.tell()
    default = next((g for g in graphs if g["tag"] == "full"), graphs[0])
    return {
        "kind": "onnx",
        "multi_depth": True,
        "source": str(Path(model_dir).absolute()),
        "model_type": config["model_type"],
        "exporter": "torch.onnx.export(dynamo=True), one graph per depth over shared weights",
        "device": depths[0]["manifest"].get("device"),
        "onnx": default["onnx"],
        "cache_to_original_layer": default["cache_to_original_layer"],
        "kept": default["kept"],
        "plan": default["plan"],
        "default_graph": default["tag"],
        "graphs": graphs,
        "weights": {"file": WEIGHTS_FILE, "bytes": shared_bytes, "tensors": len(entries),
                    "bytes_if_each_depth_held_its_own": own_bytes},
    }


@dataclass(frozen=True)
class _GivenDepth:
    """A depth taken from a checkpoint of its own (`--depth-model SPEEDUP=DIR`): a student `ulsexport prune` made
    from --model (healed or not), whose manifest says which of --model's layers it keeps."""
    folder: Path
    plan: object                # LayerPlan
    hashes: dict                # checkpoint_hashes(folder), as exported

    @classmethod
    def of(cls, model_dir: Path, config: dict, adapter, speedup: float, folder) -> _GivenDepth:
        from ..checkpoint import CONFIG_NAME, load_model_info
        from ..plan.positional import plan_for_kept

        option = f"--depth-model {speedup:g}={folder}"
        if not speedup > 1:
            raise UserError(f"{option}: a pruned depth's speedup is above 1 (the full depth is --model itself)")
        folder_dir, folder_config, folder_adapter = load_model_info(folder)
        artifact = Artifact.open(folder_dir)
        kept, num_layers = artifact.kept, adapter.num_layers(config)
        if not isinstance(kept, list) or not kept or artifact.record is None:
            raise UserError(f"{option}: not a student `ulsexport prune` made from --model (its ulsexport.json "
                            "names no kept layers)")
        if artifact.get("num_layers_original") != num_layers or \
                artifact.get("source_config_sha256") != file_sha256(model_dir / CONFIG_NAME):
            raise UserError(f"{option}: not pruned from {model_dir} itself (its manifest records another source "
                            "config or layer count)")
        if folder_adapter.num_layers(folder_config) != len(kept) or len(kept) >= num_layers:
            raise UserError(f"{option}: keeps {folder_adapter.num_layers(folder_config)} layers (its manifest: "
                            f"{len(kept)}) of {num_layers}; a pruned depth keeps fewer, as its manifest says")
        if folder_adapter.model_type != adapter.model_type or folder_adapter.shape(folder_config) != adapter.shape(config):
            raise UserError(f"{option}: not a pruning of {model_dir} (its family or shape differs)")
        plan = artifact.get("plan")
        plan = plan if isinstance(plan, dict) else {}
        target = plan.get("speedup_target")
        if isinstance(target, (int, float)) and not isinstance(target, bool) and target != speedup:
            raise UserError(f"{option}: it was pruned for speedup {target:g}, not {speedup:g}")
        strategy = plan.get("strategy") if isinstance(plan.get("strategy"), str) else "given"
        return cls(folder_dir.absolute(),
                   plan_for_kept(num_layers, kept, strategy, speedup, adapter.shape(config), option="--depth-model"),
                   checkpoint_hashes(folder_dir))

    def record(self) -> dict:
        """What the export's graph entry says of it (validate checks the checkpoint against it)."""
        return {"model": str(self.folder), "model_hashes": self.hashes}


def _tensor_bytes(tensor, folder: Path) -> bytes:
    """An initializer's little-endian bytes, from the graph or from its external data file."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(artifact_path(folder, info.get("location"), f"the data file of {tensor.name}"), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if tensor.raw_data:
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _shared_name(name: str, cache_to_original: dict[int, int]) -> str:
    """The initializer's name with its layer index made the original layer's: layers.<original>.rest."""
    match = LAYER_NAME.search(name)
    if not match:  # prefixed, so that it never meets a name of a graph's own
        return f"shared.{name}"
    original = cache_to_original[int(match.group(2))]
    return f"layers.{original}.{name[match.end():]}"


def _unique(name: str, key: str, names: dict[str, str]) -> str:
    candidate, n = name, 1
    while candidate in names and names[candidate] != key:
        n += 1
        candidate = f"{name}.{n}"
    names[candidate] = key
    return candidate


def _point_to_shared(tensor, entry: dict) -> None:
    import onnx

    tensor.name = entry["name"]
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", entry["offset"]), ("length", entry["length"])):
        item = tensor.external_data.add()
        item.key, item.value = key, str(value)


def _rename_initializers(graph, renames: dict[str, str]) -> None:
    """Point every node input (and graph output) that names an initializer at its new name."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attribute in node.attribute:  # subgraphs (If, Loop) see the outer initializers too
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_initializers(sub, renames)
    for output in graph.output:
        if output.name in renames:
            output.name = renames[output.name]
