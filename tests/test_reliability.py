"""Regression tests for issue 18: inputs destroyed by --force, corrupt checkpoints accepted, tracebacks
instead of one-line errors, runaway memory, signals that leave temporary directories behind.

Written against the command line only (`ulsexport.cli.main` in-process through click's CliRunner,
or `python -m ulsexport.cli` in a subprocess where a timeout, a memory cap or a signal is needed),
so that they survive the package's internal reorganisation. Every corrupted checkpoint is a copy of
the bundled stories260K (5 layers) edited in tmp_path.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import DATA, STORIES

from ulsexport.cli import main

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 20          # seconds a subprocess gets to answer a bad input
SUBPROCESS_MEMORY = 3 << 30      # address-space cap of subprocesses fed inputs that used to explode
HEAL_FAST = ["--steps", "3", "--batch", "2", "--seq-len", "32", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def cli(*args, quiet: bool = True):
    """Invoke the CLI in-process (CliRunner); --quiet before the subcommand unless quiet=False."""
    return CliRunner().invoke(main, (["--quiet"] if quiet else []) + [str(a) for a in args])


def _describe(result) -> str:
    text = f"exit {result.exit_code}\n--- output ---\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text += "\n--- exception ---\n" + "".join(traceback.format_exception(result.exception))
    return text


def assert_no_crash(result):
    """No exception escaped the CLI (CliRunner swallows tracebacks into result.exception)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), _describe(result)
    assert "Traceback" not in result.output, _describe(result)


def assert_one_line_error(result, *needles: str):
    """Exit 2 and exactly one line, starting with 'error: ', on stderr; no traceback."""
    assert_no_crash(result)
    assert result.exit_code == 2, _describe(result)
    _check_error_text(result.stderr, needles, _describe(result))


def _check_error_text(stderr: str, needles, context: str):
    err = stderr.strip()
    assert err.startswith("error: "), context
    assert "\n" not in err, f"more than one line:\n{context}"
    assert "Traceback" not in err, context
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in the message:\n{context}"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (SUBPROCESS_MEMORY, SUBPROCESS_MEMORY))


def subprocess_env() -> dict:
    """The environment of a subprocess: this checkout's package first on the path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "ulsexport.cli", *map(str, args)]


def run_capped(*args, cwd: Path, timeout: float = SUBPROCESS_TIMEOUT):
    """`python -m ulsexport.cli ARGS` with a memory cap and a timeout; fails the test on timeout."""
    try:
        return subprocess.run(cli_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory, env=subprocess_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"ulsexport {' '.join(map(str, args))} did not answer within {timeout} s")


def assert_one_line_error_proc(proc, *needles):
    context = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, context
    assert "Traceback" not in proc.stdout + proc.stderr, context
    _check_error_text(proc.stderr, needles, context)


def tree_digest(root: Path) -> str:
    """sha256 over every path, file content, mode and symlink target under `root`."""
    digest = hashlib.sha256()
    root = Path(root)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel} -> {os.readlink(path)}\n".encode())
        elif path.is_dir():
            digest.update(f"D {rel}\n".encode())
        else:
            digest.update(f"F {rel} {path.stat().st_mode & 0o777:o}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def leftovers(out: Path) -> list[str]:
    """Temporary or half-written directories of a run towards `out`, beside it."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") or (p.name.startswith(".") and "tmp" in p.name))


def copy_stories(dst: Path) -> Path:
    shutil.copytree(STORIES, dst)
    return dst


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def write_raw_header(path: Path, header_bytes: bytes, data: bytes) -> None:
    Path(path).write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def split_tensors(header: dict, data: bytes, names) -> tuple[dict, bytes]:
    """A new (header, data) holding only `names`, packed."""
    out, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in names:
        entry = header[name]
        begin, end = entry["data_offsets"]
        out[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
        chunks.append(data[begin:end])
        offset += end - begin
    return out, b"".join(chunks)


def tensor_names(header: dict) -> list[str]:
    return [n for n in header if n != "__metadata__"]


def assert_checkpoint_consistent(directory: Path):
    """Every weight file's header is sound (contiguous, in bounds) and the config's layer count
    matches the layers the tensors hold: what from_pretrained needs to load it."""
    import re

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    layers, names = set(), []
    for path in sorted(directory.glob("*.safetensors")):
        header, data = read_safetensors(path)
        spans = sorted(tuple(e["data_offsets"]) for n, e in header.items() if n != "__metadata__")
        position = 0
        for begin, end in spans:
            assert begin == position, f"{path.name}: tensors overlap or leave a gap at {begin}"
            position = end
        assert position == len(data), f"{path.name}: the header does not cover the data"
        for name in tensor_names(header):
            names.append(name)
            m = re.match(r"^(?:model\.)?layers\.(\d+)\.", name)
            if m:
                layers.add(int(m.group(1)))
    assert len(names) == len(set(names)), "a tensor is stored twice"
    assert layers == set(range(config["num_hidden_layers"])), (layers, config["num_hidden_layers"])


def load_with_transformers(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def make_pickle_model(dst: Path) -> Path:
    """stories260K with its weights as pytorch_model.bin (pickle) only."""
    import torch
    from safetensors.torch import load_file

    copy_stories(dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.002)
    pytest.fail(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test of this module on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A pruned stories260K (2 of 5 layers, with its manifest) and a short training text."""
    root = tmp_path_factory.mktemp("reliability")
    pruned = root / "pruned"
    result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", pruned)
    assert result.exit_code == 0, _describe(result)
    text = (DATA / "tinystories-valid-excerpt.txt").read_text()
    (root / "train.txt").write_text(text[:6000])
    return {"root": root, "pruned": pruned, "data": root / "train.txt"}


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A stories260K config over 100k tiny extra tensors (8 MB): pruning it takes seconds, long
    enough to catch a run between creating its temporary directory and renaming it."""
    d = tmp_path_factory.mktemp("slow") / "model"
    d.mkdir()
    shutil.copy(STORIES / "config.json", d / "config.json")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in range(100_000):
        header[f"extra.{i}"] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    for i in range(5):
        header[f"model.layers.{i}.input_layernorm.weight"] = {"dtype": "F32", "shape": [64],
                                                              "data_offsets": [offset, offset + 256]}
        offset += 256
    write_safetensors(d / "model.safetensors", header, bytes(offset))
    return d


# ----------------------------------------------------------------------------------------------
# 1. --force never deletes an input
# ----------------------------------------------------------------------------------------------

def _force_into_parent_args(kind: str, x: Path, shared) -> list:
    if kind == "prune":
        copy_stories(x / "model")
        return ["prune", "--model", x / "model", "--speedup", "2", "--out", x, "--force"]
    if kind == "onnx":
        shutil.copytree(shared["pruned"], x / "model")
        return ["onnx", "--model", x / "model", "--out", x, "--force", "--no-optimize"]
    shutil.copytree(shared["pruned"], x / "model")
    return ["heal", "--teacher", STORIES, "--student", x / "model", "--data", shared["data"], "--out", x,
            "--force", *HEAL_FAST]


@pytest.mark.parametrize("kind", ["prune", "heal", "onnx"])
def test_force_refuses_an_out_that_contains_the_input(kind, shared, tmp_path):
    x = tmp_path / "x"
    x.mkdir()
    args = _force_into_parent_args(kind, x, shared)
    (x / "notes.txt").write_text("the user's own file\n")
    before = tree_digest(x)
    result = cli(*args)
    assert (x / "model" / "config.json").is_file(), "the input was deleted"
    assert tree_digest(x) == before
    assert_one_line_error(result)


@pytest.mark.parametrize("out", [".", ""])
def test_force_with_out_dot_or_empty_never_empties_the_working_directory(out, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    copy_stories(work / "model")
    (work / "notes.txt").write_text("keep me\n")
    before = tree_digest(work)
    monkeypatch.chdir(work)
    result = cli("prune", "--model", "model", "--speedup", "2", "--out", out, "--force")
    assert tree_digest(work) == before, "the working directory was changed"
    assert_one_line_error(result)


def test_force_refuses_an_out_symlinked_to_a_directory_that_contains_the_input(tmp_path):
    x = tmp_path / "x"
    copy_stories(x / "model")
    link = tmp_path / "link"
    link.symlink_to(x, target_is_directory=True)
    before = tree_digest(x)
    result = cli("prune", "--model", x / "model", "--speedup", "2", "--out", link, "--force")
    assert tree_digest(x) == before
    assert link.is_symlink()
    assert_one_line_error(result)


def test_force_refuses_to_replace_a_directory_ulsexport_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work\n")
    result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out, "--force")
    assert (out / "thesis.tex").is_file(), "--force deleted a directory ulsexport did not write"
    assert_one_line_error(result)


def test_force_replaces_an_earlier_ulsexport_output(tmp_path):
    """Guard: what --force is for keeps working."""
    out = tmp_path / "out"
    assert cli("prune", "--model", STORIES, "--speedup", "2", "--out", out).exit_code == 0
    result = cli("prune", "--model", STORIES, "--keep", "0,1,4", "--out", out, "--force", "--json")
    assert result.exit_code == 0, _describe(result)
    assert json.loads((out / "ulsexport.json").read_text())["kept"] == [0, 1, 4]
    assert leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# 2. a tensor held in two weight files
# ----------------------------------------------------------------------------------------------

def _sharded_stories(d: Path) -> tuple[dict, bytes]:
    """stories260K as two shards and an index: layer 4 in shard 2, the rest in shard 1."""
    copy_stories(d)
    header, data = read_safetensors(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = tensor_names(header)
    second = [n for n in names if n.startswith("model.layers.4.")]
    first = [n for n in names if n not in second]
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {}
    for filename, group in files.items():
        write_safetensors(d / filename, *split_tensors(header, data, group))
        weight_map.update({n: filename for n in group})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return header, data


def _altered(header, data, name, fill: float) -> tuple[dict, bytes]:
    import numpy as np

    h, d = split_tensors(header, data, [name])
    return h, np.full(len(d) // 4, fill, dtype="<f4").tobytes()


def test_duplicate_tensor_in_two_index_shards_follows_the_index(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    d = tmp_path / "model"
    header, data = _sharded_stories(d)
    # shard 2 holds a second, different model.norm.weight; the index names shard 1's
    second = d / "model-00002-of-00002.safetensors"
    h2, d2 = read_safetensors(second)
    dup_h, dup_d = _altered(header, data, "model.norm.weight", 7.0)
    names2 = tensor_names(h2)
    merged_h = {**h2, "model.norm.weight": dict(dup_h["model.norm.weight"])}
    merged_h["model.norm.weight"]["data_offsets"] = [len(d2), len(d2) + len(dup_d)]
    write_safetensors(second, merged_h, d2 + dup_d)
    assert names2 and "model.norm.weight" in tensor_names(read_safetensors(second)[0])
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out)
    assert_no_crash(result)
    if result.exit_code == 2:  # refusing is allowed only if it names the duplicate
        assert "model.norm.weight" in result.stderr, _describe(result)
        return
    assert result.exit_code == 0, _describe(result)
    assert_checkpoint_consistent(out)
    tensors = {}
    for path in out.glob("*.safetensors"):
        tensors.update(load_file(path))
    original = np.frombuffer(data[slice(*header["model.norm.weight"]["data_offsets"])], "<f4")
    assert np.array_equal(tensors["model.norm.weight"], original), "the tensor the index names was not used"
    load_with_transformers(out)


def test_two_unindexed_safetensors_holding_one_tensor_are_refused(tmp_path):
    d = copy_stories(tmp_path / "model")
    header, data = read_safetensors(d / "model.safetensors")
    write_safetensors(d / "consolidated.safetensors", *_altered(header, data, "model.norm.weight", 7.0))
    before = tree_digest(d)
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out)
    assert tree_digest(d) == before
    assert not out.exists()
    assert_one_line_error(result, "model.norm.weight")


def test_stray_safetensors_beside_an_index_is_not_read(tmp_path):
    d = tmp_path / "model"
    header, data = _sharded_stories(d)
    write_safetensors(d / "consolidated.safetensors", *_altered(header, data, "model.norm.weight", 7.0))
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out)
    assert_no_crash(result)
    assert result.exit_code == 0, _describe(result)
    assert_checkpoint_consistent(out)
    load_with_transformers(out)


# ----------------------------------------------------------------------------------------------
# 3. layer indices in a recipe are integers
# ----------------------------------------------------------------------------------------------

def _recipe_text(tmp_path: Path, plan_lines: str, model: Path = STORIES, name: str = "t",
                 artifacts: Path | None = None, extra: str = "") -> str:
    artifacts = artifacts or tmp_path / "artifacts"
    return (f"name: {json.dumps(str(name))}\nmodel: {json.dumps(str(model))}\n"
            f"artifacts: {json.dumps(str(artifacts))}\nplan:\n{plan_lines}{extra}")


@pytest.mark.parametrize("field, value", [
    ("keep", "[0, 1.5, 4]"),
    ("keep", "[0, true, 4]"),
    ("keep", "[0, '1', 4]"),
    ("keep", "[0, null, 4]"),
    ("skip", "[2.0]"),
])
def test_recipe_layer_lists_must_hold_integers(field, value, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_text(tmp_path, f"  {field}: {value}\n"))
    result = cli("run", recipe)
    assert_one_line_error(result, "line 5")
    assert not (tmp_path / "artifacts" / "t" / "hf").exists()


def test_recipe_layer_lists_from_set_must_hold_integers(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_text(tmp_path, "  speedup: 2\n"))
    result = cli("run", recipe, "--set", "plan.keep=[0, 1.5, 4]")
    assert_one_line_error(result, "--set")
    assert not (tmp_path / "artifacts" / "t" / "hf").exists()


# ----------------------------------------------------------------------------------------------
# 4. `ulsexport run`: no forced replacement, no escape from artifacts/, reuse by content
# ----------------------------------------------------------------------------------------------

def test_run_refuses_to_replace_a_users_directory_in_artifacts(tmp_path):
    hf = tmp_path / "artifacts" / "t" / "hf"
    hf.mkdir(parents=True)
    (hf / "notes.txt").write_text("mine\n")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_text(tmp_path, "  speedup: 2\n"))
    result = cli("run", recipe)
    assert (hf / "notes.txt").is_file(), "run replaced a directory it did not write"
    assert_one_line_error(result)


@pytest.mark.parametrize("name", ["../../x", "../x", "ABSOLUTE"])
def test_run_name_cannot_write_outside_artifacts(name, tmp_path):
    artifacts = tmp_path / "a" / "b" / "artifacts"
    artifacts.mkdir(parents=True)
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_text(tmp_path, "  speedup: 2\n", name=name,
                                                             artifacts=artifacts))
    result = cli("run", recipe)
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "a" / "b" / "x").exists() \
        and not (tmp_path / "abs").exists(), "run wrote outside artifacts/"
    assert_one_line_error(result)


def test_run_redoes_prune_when_the_model_changes_in_place(tmp_path):
    model = copy_stories(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe_text(tmp_path, "  speedup: 2\n", model=model))
    first = cli("run", recipe)
    assert first.exit_code == 0, _describe(first)
    # the same path, other weights: the embedding scaled by 2
    import numpy as np

    header, data = read_safetensors(model / "model.safetensors")
    begin, end = header["model.embed_tokens.weight"]["data_offsets"]
    new_embed = (np.frombuffer(data[begin:end], "<f4") * 2).astype("<f4").tobytes()
    write_safetensors(model / "model.safetensors", header, data[:begin] + new_embed + data[end:])
    second = cli("run", recipe)
    assert second.exit_code == 0, _describe(second)
    assert "prune: skipped" not in second.stderr, "a model swapped in place was reused as unchanged"
    out_header, out_data = read_safetensors(tmp_path / "artifacts" / "t" / "hf" / "model.safetensors")
    b, e = out_header["model.embed_tokens.weight"]["data_offsets"]
    assert out_data[b:e] == new_embed


# ----------------------------------------------------------------------------------------------
# 5. heal: non-finite settings and losses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [
    ["--temperature", "nan"],
    ["--temperature", "inf"],
    ["--lr", "inf"],
    ["--lr", "nan"],
    ["--kd-weight", "nan", "--loss", "kd+lm"],
])
def test_heal_refuses_non_finite_settings(setting, shared, tmp_path):
    out = tmp_path / "healed"
    result = cli("heal", "--teacher", STORIES, "--student", shared["pruned"], "--data", shared["data"],
                 "--out", out, "--json", *HEAL_FAST, *setting)
    assert not out.exists(), "a model was written"
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    assert leftovers(out) == []
    assert_one_line_error(result)


@pytest.mark.parametrize("loss", ["kd", "lm"])
def test_heal_stops_when_the_loss_becomes_non_finite(loss, shared, tmp_path):
    out = tmp_path / "healed"
    result = cli("heal", "--teacher", STORIES, "--student", shared["pruned"], "--data", shared["data"],
                 "--out", out, "--json", "--loss", loss, "--lr", "1e30", *HEAL_FAST)
    assert_no_crash(result)
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout, "non-finite numbers in the JSON"
    assert result.exit_code in (1, 2), _describe(result)
    assert result.stderr.strip(), "no message"
    assert not out.exists(), "a model was written"
    assert leftovers(out) == []


def test_heal_stops_when_the_loss_becomes_non_finite_under_allowed_settings(shared, tmp_path, monkeypatch):
    """--lr 1e30 is refused as a setting now, so the loss check itself is driven here: the second
    step's loss is made NaN (as a diverging run's is)."""
    import ulsexport.heal.train as train

    real, calls = train._objective, []

    def diverging(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) >= 2 else value

    monkeypatch.setattr(train, "_objective", diverging)
    out = tmp_path / "healed"
    result = cli("heal", "--student", shared["pruned"], "--data", shared["data"], "--out", out, "--json",
                 "--loss", "lm", *HEAL_FAST)
    assert_no_crash(result)
    assert result.exit_code == 2, _describe(result)
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "loss" in last and "step 2" in last, _describe(result)
    assert not out.exists() and leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# 6. two prunes to one --out at once
# ----------------------------------------------------------------------------------------------

def test_concurrent_prunes_to_one_out_one_wins_the_other_exits_2(slow_checkpoint, shared, tmp_path):
    """Deterministic interleaving without touching internals: the first run is stopped (SIGSTOP)
    once its temporary directory exists, i.e. after it checked --out; the second runs to its end;
    then the first continues. Exactly one may write --out; the other must exit 2."""
    out = tmp_path / "out"
    first = subprocess.Popen(cli_command("-q", "prune", "--model", slow_checkpoint, "--speedup", "2", "--out", out),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        wait_for(lambda: any(p.name.startswith(f".{out.name}.tmp") for p in tmp_path.iterdir()), 60,
                 "the first run's temporary directory", first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.Popen(cli_command("-q", "prune", "--model", shared["pruned"], "--keep", "0,1",
                                              "--out", out),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        try:
            second_out, second_err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it may wait for the first run: let that one go on
            first.send_signal(signal.SIGCONT)
            second_out, second_err = second.communicate(timeout=60)
        first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=60)
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    codes = sorted([first.returncode, second.returncode])
    context = f"first: {first.returncode} {first_err}\nsecond: {second.returncode} {second_err}"
    assert codes == [0, 2], f"both runs wrote --out (the later silently replaced the other):\n{context}"
    loser_err = first_err if first.returncode == 2 else second_err
    _check_error_text(loser_err, (), context)
    assert_checkpoint_consistent(out)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# 7. YAML aliases
# ----------------------------------------------------------------------------------------------

def _yaml_bomb(model: Path) -> str:
    lines = ["name:", "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    previous = "a"
    for anchor in "bcdefghi":
        lines.append(f"  - &{anchor} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = anchor
    lines.append(f"model: {json.dumps(str(model))}")
    return "\n".join(lines) + "\n"


def test_yaml_bomb_recipe_is_refused_quickly(tmp_path):
    recipe = write_recipe(tmp_path / "bomb.yaml", _yaml_bomb(STORIES))
    assert len(recipe.read_bytes()) < 600
    proc = run_capped("run", recipe, cwd=tmp_path)
    assert_one_line_error_proc(proc)


def test_recipe_with_a_harmless_alias_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"name: &n stories\nmodel: {json.dumps(str(STORIES))}\nartifacts: *n\n"
                          "plan:\n  speedup: 2\n")
    result = cli("run", recipe)
    assert_one_line_error(result)
    assert "alias" in result.stderr.lower() or "anchor" in result.stderr.lower(), _describe(result)
    assert not (tmp_path / "stories").exists()


# ----------------------------------------------------------------------------------------------
# 8. absurd layer counts answer at once
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["config plan", "config prune", "keep range on model", "keep range on count",
                                  "skip range on count"])
def test_huge_layer_counts_are_refused_without_building_lists(case, tmp_path):
    model = copy_stories(tmp_path / "model")
    if case.startswith("config"):
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] = 1_000_000_000
        (model / "config.json").write_text(json.dumps(config))
    args = {
        "config plan": ["plan", "--model", model, "--speedup", "2"],
        "config prune": ["prune", "--model", model, "--speedup", "2", "--out", tmp_path / "out"],
        "keep range on model": ["plan", "--model", model, "--keep", "0-1000000000"],
        "keep range on count": ["plan", "--num-layers", "5", "--keep", "0-1000000000"],
        "skip range on count": ["plan", "--num-layers", "5", "--skip", "1-1000000000"],
    }[case]
    proc = run_capped("-q", *args, cwd=tmp_path)
    assert_one_line_error_proc(proc)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# ----------------------------------------------------------------------------------------------
# 9. pickle needs the opt-in; shards stay inside the model directory
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_an_index_naming_a_pickle_shard_needs_allow_pickle(index_name, tmp_path):
    d = make_pickle_model(tmp_path / "model")
    from safetensors import safe_open

    with safe_open(STORIES / "model.safetensors", "np") as f:
        names = list(f.keys())
    (d / index_name).write_text(json.dumps({"metadata": {}, "weight_map": {n: "pytorch_model.bin" for n in names}}))
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out)
    assert not out.exists()
    assert_one_line_error(result, "--allow-pickle")


def test_onnx_refuses_a_pickle_only_model(shared, tmp_path):
    d = make_pickle_model(tmp_path / "model")
    out = tmp_path / "onnx"
    result = cli("onnx", "--model", d, "--out", out, "--no-optimize")
    assert not out.exists(), "the pickle was loaded without asking"
    assert_one_line_error(result, "pickle")


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_shard_paths_outside_the_model_directory_are_refused(where, allow_pickle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(STORIES / "model.safetensors", outside / "model.safetensors")
    d = copy_stories(tmp_path / "model")
    (d / "model.safetensors").unlink()
    shard = "../outside/model.safetensors" if where == "dotdot" else str(outside / "model.safetensors")
    header, _ = read_safetensors(outside / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: shard for n in tensor_names(header)}}))
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out, *(["--allow-pickle"] if allow_pickle else []))
    assert not out.exists(), "weights were read from outside the model directory"
    assert_one_line_error(result)


# ----------------------------------------------------------------------------------------------
# 10. one line, not a traceback
# ----------------------------------------------------------------------------------------------

def _edit_config(d: Path, **fields):
    config = json.loads((d / "config.json").read_text())
    config.update(fields)
    (d / "config.json").write_text(json.dumps(config))


def _edit_header(d: Path, edit):
    header, data = read_safetensors(d / "model.safetensors")
    edit(header)
    write_safetensors(d / "model.safetensors", header, data)


CHECKPOINT_CASES = {
    "num_hidden_layers is text": lambda d: _edit_config(d, num_hidden_layers="five"),
    "num_hidden_layers is null": lambda d: _edit_config(d, num_hidden_layers=None),
    "hidden_size is text": lambda d: _edit_config(d, hidden_size="big"),
    "vocab_size is a list": lambda d: _edit_config(d, vocab_size=[512]),
    "config is a list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "config is not UTF-8": lambda d: (d / "config.json").write_bytes(
        b'{"model_type": "llama", "name": "\xff\xfe"}'),
    "unknown dtype": lambda d: _edit_header(d, lambda h: h["model.norm.weight"].update(dtype="F99")),
    "missing data_offsets": lambda d: _edit_header(d, lambda h: h["model.norm.weight"].pop("data_offsets")),
    "data_offsets are text": lambda d: _edit_header(d, lambda h: h["model.norm.weight"].update(data_offsets="0-4")),
    "shape is text": lambda d: _edit_header(d, lambda h: h["model.norm.weight"].update(shape="64")),
    "header is a list": lambda d: write_raw_header(d / "model.safetensors", b"[1, 2, 3]     ", b""),
    "malformed index": lambda d: (d / "model.safetensors.index.json").write_text("{not json"),
    "index weight_map is a list": lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": ["model.safetensors"]}'),
}


@pytest.mark.parametrize("command", ["plan", "prune"])
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_broken_checkpoint_is_one_line_exit_2(case, command, tmp_path):
    d = copy_stories(tmp_path / "model")
    CHECKPOINT_CASES[case](d)
    before = tree_digest(d)
    out = tmp_path / "out"
    args = ["--model", d, "--speedup", "2"] + (["--out", out] if command == "prune" else [])
    result = cli(command, *args)
    assert_no_crash(result)
    assert tree_digest(d) == before
    if command == "plan" and result.exit_code == 0 and case in ("unknown dtype", "missing data_offsets",
                                                                 "data_offsets are text", "shape is text",
                                                                 "header is a list", "malformed index",
                                                                 "index weight_map is a list"):
        return  # plan reads only the config: weights it never opens may be broken
    assert_one_line_error(result)
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("case", ["parent is a file", "parent is read-only"])
def test_unwritable_out_is_one_line_exit_2(case, tmp_path):
    if case == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif os.geteuid() == 0:  # root ignores permission bits; sysfs refuses mkdir even to root
        out = Path("/sys/ulsexport-reliability-test")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    try:
        result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out)
    finally:
        if case == "parent is read-only" and os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o755)
    assert_one_line_error(result)


def _fake_onnx_artifact(shared, d: Path) -> Path:
    """An ONNX export folder (manifest as `ulsexport onnx` writes it) whose model.onnx is corrupt."""
    shutil.copytree(shared["pruned"], d)
    for path in d.glob("*.safetensors"):
        path.unlink()
    kv = [[f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(2)]
    present = [[f"present.{i}.key", f"present.{i}.value"] for i in range(2)]
    manifest = {"tool": "ulsexport", "version": "0.1.0", "kind": "onnx", "source": str(shared["pruned"]),
                "model_type": "llama", "device": "cpu", "builder": "torch",
                "onnx": {"file": "model.onnx", "external_data": None, "dtype": "fp32", "opset": 20,
                         "inputs": ["input_ids", "attention_mask", "position_ids"],
                         "outputs": ["logits", *[n for p in present for n in p]],
                         "cache_inputs": kv, "cache_outputs": present, "num_kv_heads": 4, "head_dim": 8,
                         "kv_cache": "concat", "max_sequence_length": None},
                "cache_to_original_layer": {"0": 0, "1": 4}}
    (d / "ulsexport.json").write_text(json.dumps(manifest))
    (d / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe" * 20)
    return d


VALIDATE_FAST = ["--runtime", "torch", "--parity-steps", "2", "--batch", "1", "--prompt-len", "4",
                 "--new-tokens", "4", "--runs", "1", "--warmup", "0"]


@pytest.mark.parametrize("case, extra", [
    ("new tokens 0", ["--new-tokens", "0"]),
    ("new tokens 1", ["--new-tokens", "1"]),
    ("batch 0", ["--batch", "0"]),
    ("batch not a number", ["--batch", "1,x"]),
    ("runs 0", ["--runs", "0"]),
    ("parity steps 0", ["--parity-steps", "0"]),
    ("report in a missing folder", ["--report", "MISSING/report.md"]),
    ("json in a missing folder", ["--json", "MISSING/report.json"]),
    ("corrupt model.onnx", ["--runtime", "ort", "--no-speed"]),
])
def test_validate_bad_settings_are_one_line_exit_2(case, extra, shared, tmp_path):
    candidate = shared["pruned"]
    if case == "corrupt model.onnx":
        candidate = _fake_onnx_artifact(shared, tmp_path / "onnx")
    extra = [str(tmp_path / "missing" / a[len("MISSING/"):]) if a.startswith("MISSING/") else a for a in extra]
    result = cli("validate", "--reference", STORIES, "--candidate", candidate, *VALIDATE_FAST, *extra)
    assert_one_line_error(result)
    assert not (tmp_path / "missing").exists()


def test_recipe_not_utf8_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(_recipe_text(tmp_path, "  speedup: 2\n").encode() + b"# caf\xe9\n")
    assert_one_line_error(cli("run", recipe))


@pytest.mark.parametrize("field, value, is_type", [
    ("batches", '[1, "x"]', True),
    ("batches", "[[1]]", True),
    ("batches", "[1.5]", True),
    ("batches", "[0]", False),
    ("runs", "0", False),
    ("new_tokens", "1", False),
])
def test_recipe_validate_values_are_checked_before_anything_runs(field, value, is_type, tmp_path):
    fields = {"runtime": "torch", "parity_steps": "2", "prompt_len": "4", "new_tokens": "4", "runs": "1",
              field: value}
    extra = "validate:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items())
    text = _recipe_text(tmp_path, "  speedup: 2\n", extra=extra)
    line = max(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith(f"{field}:"))
    recipe = write_recipe(tmp_path / "r.yaml", text)
    result = cli("run", recipe)
    if is_type:  # a wrongly typed item is refused when the recipe is read, with its line
        assert_one_line_error(result, f"line {line}")
        assert not (tmp_path / "artifacts" / "t").exists(), "the recipe ran before its fields were checked"
    else:
        assert_one_line_error(result)


# ----------------------------------------------------------------------------------------------
# 11. signals, leftovers, dangling symlinks
# ----------------------------------------------------------------------------------------------

def _start_and_wait_for_tmp(args, out: Path, timeout=60):
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    wait_for(lambda: any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir()), timeout,
             "the run's temporary directory", proc)
    return proc


def test_sigterm_during_prune_cleans_up_like_ctrl_c(slow_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_wait_for_tmp(["-q", "prune", "--model", slow_checkpoint, "--speedup", "2", "--out", out], out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    assert leftovers(out) == [], "SIGTERM left a temporary directory"
    assert stderr.strip() and "Traceback" not in stderr, f"no message, or a traceback: {stderr!r}"


def test_sigterm_during_heal_cleans_up_like_ctrl_c(shared, tmp_path):
    out = tmp_path / "healed"
    proc = _start_and_wait_for_tmp(["-q", "heal", "--teacher", STORIES, "--student", shared["pruned"], "--data",
                                    shared["data"], "--out", out, "--steps", "100000", "--batch", "2",
                                    "--seq-len", "32", "--device", "cpu"], out)
    time.sleep(1.0)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    tmp_dirs = [n for n in leftovers(out) if n.startswith(f".{out.name}.tmp")]
    assert tmp_dirs == [], "SIGTERM left a temporary directory"
    assert stderr.strip() and "Traceback" not in stderr, f"no message, or a traceback: {stderr!r}"


def test_leftovers_of_a_killed_run_are_removed_or_named_by_the_next(slow_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_wait_for_tmp(["-q", "prune", "--model", slow_checkpoint, "--speedup", "2", "--out", out], out)
    proc.kill()
    proc.communicate()
    stale = leftovers(out)
    assert stale, "precondition: SIGKILL leaves the temporary directory"
    result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out)
    assert_no_crash(result)
    still_there = [n for n in stale if (tmp_path / n).exists()]
    unnamed = [n for n in still_there if n not in result.output]
    assert unnamed == [], f"a dead run's {unnamed} was neither removed nor named:\n{_describe(result)}"


def test_dangling_symlink_as_out_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out)
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    assert leftovers(out) == [], "a temporary directory was left behind"
    assert_one_line_error(result)


# ----------------------------------------------------------------------------------------------
# 12. smaller ones
# ----------------------------------------------------------------------------------------------

def test_overlapping_tensor_offsets_are_refused(tmp_path):
    d = copy_stories(tmp_path / "model")

    def overlap(header):
        a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
        assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    _edit_header(d, overlap)
    out = tmp_path / "out"
    result = cli("prune", "--model", d, "--speedup", "2", "--out", out)
    assert not out.exists()
    assert_one_line_error(result)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_output_directory_mode_follows_the_umask(umask, tmp_path):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, _describe(result)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)


@pytest.mark.parametrize("option, value", [("--skip", "8-3"), ("--keep", "0,4,8-3"), ("--keep", "0,9,5-4")])
def test_reversed_ranges_are_refused(option, value):
    result = cli("plan", "--num-layers", "10", option, value)
    assert_one_line_error(result, value.split(",")[-1])


@pytest.mark.parametrize("command", ["plan", "prune"])
@pytest.mark.parametrize("args", [
    ["--keep", "0,4", "--speedup", "2"],
    ["--skip", "2", "--speedup", "2"],
    ["--keep", "0,4", "--strategy", "even"],
    ["--skip", "2", "--strategy", "top"],
])
def test_explicit_lists_conflict_with_speedup_and_strategy(command, args, tmp_path):
    out = tmp_path / "out"
    result = cli(command, "--model", STORIES, *args, *(["--out", out] if command == "prune" else []))
    assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("length", [243, 250, 255])
def test_long_out_names_work(length, tmp_path):
    out = tmp_path / ("o" * length)
    result = cli("prune", "--model", STORIES, "--speedup", "2", "--out", out)
    assert_no_crash(result)
    assert result.exit_code == 0, _describe(result)
    assert (out / "ulsexport.json").is_file()
    again = cli("prune", "--model", STORIES, "--keep", "0,2,4", "--out", out, "--force")
    assert again.exit_code == 0, _describe(again)
    assert leftovers(out) == []


@pytest.mark.parametrize("args", [
    ["plan", "-q", "--num-layers", "10", "--speedup", "2"],
    ["prune", "-q", "--model", STORIES, "--speedup", "2", "--out", "OUT"],
    ["prune", "--model", STORIES, "--speedup", "2", "--out", "OUT", "--quiet"],
])
def test_quiet_flag_is_accepted_after_the_subcommand(args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = cli(*args, quiet=False)
    assert result.exit_code == 0, _describe(result)


# ----------------------------------------------------------------------------------------------
# fuzz: seeded random corruption; exit 0 or 2, never a crash, inputs untouched, nothing left over
# ----------------------------------------------------------------------------------------------

FUZZ_SEED = 18
ODD_VALUES = ["five", "", -1, 0, 1, 2.5, None, [], [1, 2], {}, {"a": 1}, True, False, 10**6, "5", 1e-300,
              "F32", "llama", [[0, 4]]]
CONFIG_FIELDS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "model_type", "tie_word_embeddings",
                 "rope_parameters", "max_position_embeddings", "torch_dtype", "dtype"]
RECIPE_POOLS = {  # mostly well-typed values at the edges, some of the wrong type
    "speedup": ["2", "3", "1", "0", "-2", "1.5", "1e308", ".nan", ".inf", "'2'", "[2]", "null", "true"],
    "strategy": ["uls", "even", "top", "first", "bi", "x", "''", "3", "[uls]"],
    "keep": ["[0, 4]", "[0, 1.5, 4]", "[4, 0]", "[0, 0, 4]", "[-1, 4]", "[0, true, 4]", "[0, '2', 4]", "[]",
             "[[0]]", "0", "[0, 1, 2, 3, 4, 5]", "[0, 4.0]", "[0, 2.5, 3, 4]"],
    "skip": ["[1]", "[1.5]", "[2, 2]", "[5]", "[true]", "['1']", "[]", "1", "[0, 1, 2, 3]", "[1.0, 2.0]"],
    "calib_tokens": ["64", "0", "-1", "1.5", "x"],
    "device": ["cpu", "cuda:x", "gpu", "1"],
}
RECIPE_FIELDS = ["speedup", "strategy", "keep", "keep", "skip", "skip", "calib_tokens", "device"]


def _fuzz_cases():
    rng = random.Random(FUZZ_SEED)
    cases = []
    for i in range(12):
        cases.append(("header", i, rng.randrange(1 << 30)))
    for i in range(12):
        cases.append(("config", i, rng.randrange(1 << 30)))
    for i in range(12):
        cases.append(("recipe", i, rng.randrange(1 << 30)))
    return cases


def _mutate_header(d: Path, rng: random.Random):
    path = d / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    how = rng.choice(["bytes", "field", "field", "length"])
    if how == "bytes":  # random bytes inside the header
        for _ in range(rng.randint(1, 6)):
            raw[8 + rng.randrange(n)] = rng.randrange(256)
        path.write_bytes(bytes(raw))
    elif how == "length":
        raw[:8] = struct.pack("<Q", rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1]))
        path.write_bytes(bytes(raw))
    else:
        header, data = json.loads(raw[8:8 + n]), bytes(raw[8 + n:])
        name = rng.choice(tensor_names(header))
        key = rng.choice(["dtype", "shape", "data_offsets", "name"])
        value = rng.choice(ODD_VALUES + [[0, 1 << 62], [10, 2], [-4, 0], ["a", "b"], [0], "BF16", "I64",
                                         [1 << 40, 1 << 40]])
        if key == "name":
            header[rng.choice(["model.layers.99.x", "model.layers.-1.x", "model.layers.1.x" + "y" * 10,
                               "__metadata__"])] = header.pop(name)
        else:
            header[name][key] = value
        write_safetensors(path, header, data)


def _mutate_config(d: Path, rng: random.Random):
    config = json.loads((d / "config.json").read_text())
    for _ in range(rng.randint(1, 2)):
        config[rng.choice(CONFIG_FIELDS)] = rng.choice(ODD_VALUES)
    (d / "config.json").write_text(json.dumps(config))


def _fuzz_recipe(inputs: Path, work: Path, model: Path, rng: random.Random) -> Path:
    fields = dict.fromkeys(rng.sample(RECIPE_FIELDS, rng.randint(1, 3)))
    lines = "".join(f"  {field}: {rng.choice(RECIPE_POOLS[field])}\n" for field in fields)
    name = rng.choice(["t", "t", "t", "", "a/b", "-", "x" * 300])
    return write_recipe(inputs / "r.yaml", _recipe_text(inputs, lines, model=model, name=name,
                                                        artifacts=work / "artifacts"))


@pytest.mark.parametrize("kind, index, seed", _fuzz_cases(), ids=lambda v: str(v))
def test_fuzz(kind, index, seed, tmp_path, monkeypatch):
    rng = random.Random(seed)
    inputs, work, outs = tmp_path / "inputs", tmp_path / "work", tmp_path / "outs"
    model = copy_stories(inputs / "model")
    work.mkdir()
    outs.mkdir()
    out = outs / "out"
    if kind == "header":
        _mutate_header(model, rng)
    elif kind == "config":
        _mutate_config(model, rng)
    else:
        _fuzz_recipe(inputs, work, model, rng)
    before = tree_digest(inputs)
    monkeypatch.chdir(outs)
    if kind == "recipe":
        result = cli("run", inputs / "r.yaml")
    else:
        result = cli("prune", "--model", model, "--speedup", "2", "--out", out)
    assert_no_crash(result)
    assert result.exit_code in (0, 2), _describe(result)
    assert tree_digest(inputs) == before, "an input was modified"
    if result.exit_code == 2:
        _check_error_text(result.stderr, (), _describe(result))
    if kind == "recipe":
        stray = [p for p in work.rglob(".*") if "tmp" in p.name] + list(outs.iterdir())
        assert stray == [], f"left behind: {stray}"
        if result.exit_code == 0:
            for hf in work.rglob("hf"):
                assert_checkpoint_consistent(hf)
    elif result.exit_code == 0:
        assert_checkpoint_consistent(out)
    else:
        assert list(outs.iterdir()) == [], f"left beside --out: {list(outs.iterdir())}"
