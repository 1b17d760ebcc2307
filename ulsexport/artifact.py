"""What an artifact is: the `ulsexport.json` manifest that travels with it, its kind, and its lineage
(which original layer each of its layers, or cache entries, came from)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .version import __version__
from .errors import UserError

MANIFEST_NAME = "ulsexport.json"
GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class BuildResult:
    """What a stage that writes an artifact returns: where, its manifest, and how long it took."""
    out_dir: Path
    manifest: dict
    seconds: float


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hashes(folder: Path) -> dict[str, str | None]:
    """sha256 of a checkpoint's config and manifest (None for one it lacks): what says it is still the one
    an export recorded (healing it again rewrites its manifest)."""
    return {name: file_sha256(Path(folder) / name) if (Path(folder) / name).is_file() else None
            for name in ("config.json", MANIFEST_NAME)}


@dataclass(frozen=True)
class Artifact:
    """A folder ulsexport reads: its manifest (`ulsexport.json`) read and checked once, and typed views of
    the fields that cross modules. The manifest is input: never trusted to name paths outside the folder
    (`path`), never written back. Open one with `Artifact.open(folder)`; a folder without a manifest (a
    plain checkpoint) opens too, with `record` None."""
    folder: Path
    record: dict | None

    @classmethod
    def open(cls, folder) -> Artifact:
        return cls(Path(folder), read_manifest(folder))

    @property
    def manifest(self) -> dict:
        """The manifest's fields ({} without one)."""
        return self.record or {}

    def get(self, key: str, default=None):
        return self.manifest.get(key, default)

    @property
    def kind(self) -> str:
        return artifact_kind(self.folder, self.record)

    @property
    def multi_depth(self) -> bool:
        return bool(self.manifest.get("multi_depth"))

    @property
    def onnx(self) -> dict:
        """The export's `onnx` record (graph file, inputs; {} for other kinds)."""
        value = self.manifest.get("onnx")
        return value if isinstance(value, dict) else {}

    @property
    def kept(self) -> list | None:
        """The original layers this artifact keeps, in order (None: all, or not recorded)."""
        return self.manifest.get("kept")

    @property
    def trained_depths(self) -> list:
        """Joint healing's depths (plans and kept layers), [] for other checkpoints."""
        return self.manifest.get("trained_depths") or []

    @property
    def healing(self) -> dict | None:
        return self.manifest.get("healing")

    def path(self, relative, what: str = "a file") -> Path:
        """A path the manifest names, checked to lie inside the folder (`artifact_path`)."""
        return artifact_path(self.folder, relative, what)


def read_manifest(directory: Path) -> dict | None:
    """The raw manifest (None without one); the rest of the package reads it through `Artifact`."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; it is not an ulsexport manifest") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not an ulsexport manifest (not a JSON object)")
    return data


def artifact_path(folder, relative, what: str = "a file") -> Path:
    """`folder/relative` for a path read from `folder`'s manifest, resolved (symlinks too) and checked to lie
    inside `folder`: a manifest is input, never trusted to name an absolute path or one out of its folder."""
    where = f"{Path(folder) / MANIFEST_NAME}: {what}"
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise UserError(f"{where} must be a path relative to its folder (a non-empty string), not {relative!r}")
    if os.path.isabs(relative):
        raise UserError(f"{where} is an absolute path ({relative}); it must lie inside {folder}")
    base = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(base, relative))
    if not path.startswith(base.rstrip(os.sep) + os.sep):
        raise UserError(f"{where} ({relative}) lies outside {folder}; a manifest may name only files inside it")
    return Path(path)


def finite_json(data, path: str = "", replaced: list | None = None):
    """`data` with every NaN or infinite float replaced by None (JSON has no such numbers); the
    dotted paths replaced are appended to `replaced`."""
    if isinstance(data, float) and not math.isfinite(data):
        if replaced is not None:
            replaced.append(path or "$")
        return None
    if isinstance(data, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), replaced) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", replaced) for i, v in enumerate(data)]
    return data


def json_text(data, indent: int | None = 2, note_field: str | None = "non_finite_values") -> str:
    """Strict JSON (never NaN or Infinity): non-finite numbers become null, and where `data` is a
    mapping and `note_field` is given, the paths so replaced are listed under `note_field`."""
    replaced: list = []
    clean = finite_json(data, replaced=replaced)
    if replaced and note_field and isinstance(clean, dict):
        clean[note_field] = replaced
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_manifest(directory: Path, data: dict) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json_text({"tool": "ulsexport", "version": __version__, **data}) + "\n")
    return path


def artifact_kind(folder: Path, record: dict | None = None) -> str:
    """'hf-checkpoint', 'onnx', 'genai', 'tensorrt' or 'triton-repository', from the folder's manifest
    (`record`, read here if not given) or its files."""
    manifest = (record if record is not None else read_manifest(folder)) or {}
    if (Path(folder) / GENAI_CONFIG).is_file() and manifest.get("builder") == "genai":
        return "genai"
    if manifest.get("kind"):
        return manifest["kind"]
    if (Path(folder) / "config.json").is_file():
        return "hf-checkpoint"
    raise UserError(f"{folder} is neither a checkpoint nor an ulsexport artifact (no ulsexport.json)")


def original_layer_of(manifest: dict | None, index: int) -> int:
    """Follow a chain of prune manifests from a layer index back to the layer of the first source."""
    while manifest and "new_to_original" in manifest:
        index = int(manifest["new_to_original"][str(index)])
        manifest = manifest.get("source_manifest")
    return index


def lineage(source_manifest: dict | None, num_layers: int) -> dict:
    """The manifest fields of an export that say where each cache index came from: original layer,
    plan, kept layers and the source's own manifest."""
    fields = {"cache_to_original_layer": {str(i): original_layer_of(source_manifest, i) for i in range(num_layers)}}
    if source_manifest:
        fields.update(kept=source_manifest.get("kept"), plan=source_manifest.get("plan"),
                      source_manifest=source_manifest)
    return fields


def graph_entry(file: str, cache_to_original_layer: dict, role: str = "decoder", **extra) -> dict:
    """One entry of an export manifest's `graphs` list: a graph file, its role, and its layers."""
    kept = [cache_to_original_layer[str(i)] for i in range(len(cache_to_original_layer))]
    return {"file": file, "role": role, "kept": kept,
            "cache_to_original_layer": cache_to_original_layer, **extra}
