"""The `ulsexport.json` manifest that travels with every artifact: which original layers it holds."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import __version__

MANIFEST_NAME = "ulsexport.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(directory: Path, data: dict) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps({"tool": "ulsexport", "version": __version__, **data}, indent=2) + "\n")
    return path
