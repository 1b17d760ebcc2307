"""Seeded fuzz of the manifests `triton` and `serve` read (`ulsexport.json` of an ONNX export, of a
multi-depth export and of a Triton repository): paths (out of the folder, absolute, empty, a NUL, a
symlink out), wrong types and missing keys. Each case exits 0 or 2 (one line), never crashes, leaves
its inputs as they were, and writes nothing outside `--out`; on exit 0 no file of the repository lies
outside it. As test_reliability's fuzz does for safetensors headers.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from conftest import STORIES  # noqa: E402
from test_reliability import ODD_VALUES, _check_error_text, _describe, assert_no_crash, tree_digest  # noqa: E402
from test_serve import cli  # noqa: E402

FUZZ_SEED = 33
PATHS = ["../escaped.txt", "../../../../escaped.txt", "/abs/secret.txt", "SECRET", "", ".", "..", "a\0b",
         "link-out", "sub/../../escaped.txt", "model.onnx", "nothing.onnx", "tokenizer.model"]
PATH_KEYS = {"file", "external_data", "served_repository", "path", "name"}


def key_paths(data, prefix=()):
    """Every (path of keys and indexes) in a JSON value."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.append(prefix + (key,))
            found += key_paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data[:4]):
            found.append(prefix + (i,))
            found += key_paths(value, prefix + (i,))
    return found


def mutate(manifest: dict, rng: random.Random, secret: Path) -> str:
    """Change 1 to 3 places of `manifest`: a path field gets a hostile path, others an odd value or
    removal; returns what was done (for the failure message)."""
    done = []
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in key_paths(manifest) if p[0] not in ("source_manifest",)]
        path_fields = [p for p in paths if p[-1] in PATH_KEYS]
        where = rng.choice(path_fields) if path_fields and rng.random() < 0.5 else rng.choice(paths)
        parent = manifest
        for key in where[:-1]:
            parent = parent[key]
        how = rng.choice(["path", "odd", "delete"] if where[-1] in PATH_KEYS else ["odd", "odd", "delete"])
        if how == "delete":
            del parent[where[-1]]
        else:
            value = rng.choice(PATHS) if how == "path" else rng.choice(ODD_VALUES)
            parent[where[-1]] = value.replace("SECRET", str(secret)) if isinstance(value, str) else value
        done.append(f"{how} {'.'.join(map(str, where))}")
    return "; ".join(done)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from ulsexport.export.multi_depth import export_multi_depth
    from ulsexport.export.trace import export_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint

    root = tmp_path_factory.mktemp("manifest-fuzz")
    hf = prune_checkpoint(STORIES, root / "hf", plan_for_model(STORIES, 2), quiet=True).out_dir
    onnx = export_onnx(hf, root / "onnx", optimize=False, quiet=True).out_dir
    multi = export_multi_depth(STORIES, root / "multi", [1, 2], quiet=True).out_dir
    result = cli("triton", "--model", onnx, "--out", root / "repo", "--name", "stories")
    assert result.exit_code == 0, result.output
    return {"onnx": Path(onnx), "multi": Path(multi), "repo": root / "repo"}


def _cases():
    rng = random.Random(FUZZ_SEED)
    return [(kind, i, rng.randrange(1 << 30)) for kind in ("onnx", "multi", "repo") for i in range(12)]


@pytest.mark.parametrize("kind, index, seed", _cases(), ids=lambda v: str(v))
def test_manifest_fuzz(exports, tmp_path, kind, index, seed):
    rng = random.Random(seed)
    inputs, outs = tmp_path / "in" / "side", tmp_path / "outs"
    inputs.mkdir(parents=True)
    outs.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    escaped = [tmp_path / "in" / "escaped.txt", inputs / "escaped.txt"]
    for path in escaped:
        path.write_text("keep")
    folder = inputs / kind
    shutil.copytree(exports[kind], folder)
    if rng.random() < 0.25:
        (folder / "link-out").symlink_to(secret)
    manifest = json.loads((folder / "ulsexport.json").read_text())
    what = mutate(manifest, rng, secret)
    (folder / "ulsexport.json").write_text(json.dumps(manifest))
    before, outside = tree_digest(tmp_path / "in"), secret.read_text()
    if kind == "repo":
        from ulsexport.serve.server import served_models

        try:  # what `serve` reads before it starts anything
            model_repository, names = served_models(folder)
        except Exception as exc:  # noqa: BLE001 - the check below says which
            assert type(exc).__name__ == "UserError" and "\n" not in str(exc), f"{what}: {exc!r}"
        else:
            assert Path(model_repository).resolve().is_relative_to(folder.resolve()), what
            assert all(isinstance(n, str) and "/" not in n and n not in (".", "..") for n in names), what
    else:
        result = cli("triton", "--model", folder, "--out", outs / "repo")
        context = f"{what}\n{_describe(result)}"
        assert_no_crash(result)
        assert result.exit_code in (0, 2), context
        if result.exit_code == 2:
            _check_error_text(result.stderr, (), context)
            assert list(outs.iterdir()) == [], context
        else:
            repo = (outs / "repo").resolve()
            for path in repo.rglob("*"):
                assert not path.is_symlink() and path.resolve().is_relative_to(repo), f"{what}: {path}"
            assert "secret" not in {p.read_text(errors="replace") for p in repo.rglob("*.txt")}, what
    assert tree_digest(tmp_path / "in") == before, f"an input was modified: {what}"
    assert all(p.stat().st_nlink == 1 for p in [secret, *escaped]), f"a hard link was made: {what}"
    assert secret.read_text() == outside, what
