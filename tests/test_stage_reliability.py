"""The README's guarantees for the newer stages (issue 33): `engine`'s timing cache, `run`'s unchanged
stages, `validate` on CUDA-less machines and over multi-depth exports, `open_runtime` over broken
multi-depth exports, and recipe values checked before the first stage runs."""
from __future__ import annotations

import pytest

from conftest import run_cli
from ulsexport.errors import UserError


def one_line_exit_2(result, says: str = "") -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output and says in result.stderr, result.stderr


# --- engine --timing-cache (item 4) ---

@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """A tiny 4-layer llama pruned to 2 layers and exported for TensorRT."""
    from ulsexport.engine.onnx_target import export_standard_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("trt")
    src = make_tiny_checkpoint("llama", root / "full", num_layers=4)
    prune_checkpoint(src, root / "hf", plan_for_model(src, 2), quiet=True)
    return export_standard_onnx(root / "hf", root / "onnx-trt", quiet=True).out_dir


@pytest.mark.parametrize("inside", ["model.onnx", "ulsexport.json", "new.cache", "."])
def test_a_timing_cache_inside_the_export_is_refused_and_the_export_untouched(trt_export, tmp_path, inside):
    from test_engine import FakeTensorRT
    from ulsexport.engine import build_engine

    before = {p.name: p.read_bytes() for p in trt_export.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="--timing-cache .* lies inside the --model export"):
        build_engine(trt_export, tmp_path / "trt", batch="1", max_seq=32, timing_cache=trt_export / inside,
                     library="tensorrt", quiet=True, trt_module=FakeTensorRT())
    assert {p.name: p.read_bytes() for p in trt_export.iterdir() if p.is_file()} == before
    assert not (tmp_path / "trt").exists()


def test_engine_cli_refuses_the_exports_graph_as_timing_cache(trt_export, tmp_path):
    from ulsexport.cli import main
    from ulsexport.cli.engine import engine

    main.commands.setdefault("engine", engine)
    graph = (trt_export / "model.onnx").read_bytes()
    result = run_cli("engine", "--model", trt_export, "--out", tmp_path / "trt", "--timing-cache",
                     trt_export / "model.onnx")
    one_line_exit_2(result, "lies inside the --model export")
    assert (trt_export / "model.onnx").read_bytes() == graph and not (tmp_path / "trt").exists()


def test_a_timing_cache_inside_out_or_a_folder_is_refused(trt_export, tmp_path):
    from test_engine import FakeTensorRT
    from ulsexport.engine import build_engine

    (tmp_path / "folder").mkdir()
    for cache, says in ((tmp_path / "trt" / "t.cache", "lies inside --out"), (tmp_path / "folder", "is a directory")):
        with pytest.raises(UserError, match=says):
            build_engine(trt_export, tmp_path / "trt", batch="1", max_seq=32, timing_cache=cache,
                         library="tensorrt", quiet=True, trt_module=FakeTensorRT())
    assert not (tmp_path / "trt").exists()


def test_the_timing_cache_is_written_whole_through_a_rename(trt_export, tmp_path, monkeypatch):
    import os

    from test_engine import FakeTensorRT
    from ulsexport.engine import build_engine

    cache = tmp_path / "caches" / "trt.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1])
    build_engine(trt_export, tmp_path / "trt", batch="1", max_seq=32, timing_cache=cache, library="tensorrt",
                 quiet=True, trt_module=FakeTensorRT())
    assert cache.read_bytes() == b"fake-timing-cache:old"
    assert [b for _, b in replaced] == [str(cache)] and sorted(p.name for p in cache.parent.iterdir()) == ["trt.cache"]


# --- run: a stage is unchanged only if its outputs are (item 10) ---

def test_run_redoes_a_stage_whose_output_was_damaged(tmp_path):
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "recipes" / "stories260k-demo.yaml"
    fast = ["--set", f"artifacts={tmp_path}", "--set", "validate.batches=[1]", "--set", "validate.prompt_len=8",
            "--set", "validate.new_tokens=2", "--set", "validate.runs=1", "--set", "validate.parity_steps=4",
            "--set", "validate.text=null"]
    first = run_cli("run", demo, *fast)
    assert first.exit_code == 0, first.output
    graph = tmp_path / "stories260k-uls-2x" / "onnx" / "model.onnx"
    whole = graph.read_bytes()
    graph.write_bytes(whole[:len(whole) // 3])
    again = run_cli("run", demo, *fast)
    assert again.exit_code == 0, again.output
    assert "prune: skipped (unchanged)" in again.stderr
    assert "onnx: ran (its outputs had changed since it wrote them)" in again.stderr
    assert graph.read_bytes() == whole  # the export is rebuilt byte for byte: the report validated it
    assert "parity: PASS" in again.stdout
    third = run_cli("run", demo, *fast)
    assert third.exit_code == 0 and third.stderr.count("skipped (unchanged)") == 3, third.output


# --- open_runtime over broken multi-depth exports (item 17) ---

@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A 4-layer tiny llama exported at depths full and 2x over one weights file."""
    from ulsexport.export.multi_depth import export_multi_depth
    from ulsexport.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("multi")
    src = make_tiny_checkpoint("llama", root / "hf", num_layers=4)
    return src, export_multi_depth(src, root / "multi", [1, 2], quiet=True).out_dir


def _truncate(path, keep=lambda n: n // 2):
    path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])


def _edit_manifest(folder, change):
    import json

    manifest = json.loads((folder / "ulsexport.json").read_text())
    change(manifest)
    (folder / "ulsexport.json").write_text(json.dumps(manifest))


BROKEN_MULTI_DEPTH = {
    "weights truncated": (lambda d: _truncate(d / "weights.onnx.data"), "weights.onnx.data holds"),
    "weights empty": (lambda d: _truncate(d / "weights.onnx.data", lambda n: 0), "weights.onnx.data is empty"),
    "weights missing": (lambda d: (d / "weights.onnx.data").unlink(), "weights.onnx.data is missing"),
    "depth graph missing": (lambda d: (d / "2x.onnx").unlink(), "2x.onnx is missing"),
    "depth graph truncated": (lambda d: _truncate(d / "2x.onnx", lambda n: 200), "could not load it"),
    "graph that does not exist": (lambda d: _edit_manifest(d, lambda m: m["graphs"][1].update(file="nope.onnx")),
                                  "nope.onnx is missing"),
    "graph outside the folder": (lambda d: _edit_manifest(d, lambda m: m["graphs"][1].update(file="../2x.onnx")),
                                 "outside"),
    "graph at an absolute path": (lambda d: _edit_manifest(d, lambda m: m["graphs"][1].update(file="/etc/hostname")),
                                  "absolute path"),
    "graph without its onnx section": (lambda d: _edit_manifest(d, lambda m: m["graphs"][1].pop("onnx")),
                                       "graph 2 of its manifest has no onnx"),
    "default graph not listed": (lambda d: _edit_manifest(d, lambda m: m.update(default_graph="9x")),
                                 "lack the default graph '9x'"),
    "weights file outside": (lambda d: _edit_manifest(d, lambda m: m["weights"].update(file="../w.data")), "outside"),
    "no graphs": (lambda d: _edit_manifest(d, lambda m: m.update(graphs=None)), "lists no graphs"),
}


@pytest.mark.parametrize("case", list(BROKEN_MULTI_DEPTH))
def test_open_runtime_refuses_a_broken_multi_depth_export_in_one_line(multi, tmp_path, case):
    import shutil

    from ulsexport.runtime import open_runtime

    _, out = multi
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.copy(out / "2x.onnx", tmp_path / "2x.onnx")  # what "../2x.onnx" would name
    break_it, says = BROKEN_MULTI_DEPTH[case]
    break_it(broken)
    with pytest.raises(UserError) as error:
        open_runtime(broken, "ort")
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("file", ["../model.onnx", "/etc/hostname"])
def test_engine_and_ort_refuse_a_graph_path_out_of_the_export(trt_export, tmp_path, file):
    import shutil

    from test_engine import FakeTensorRT
    from ulsexport.engine import build_engine
    from ulsexport.runtime import open_runtime

    export = tmp_path / "export"
    shutil.copytree(trt_export, export)
    shutil.copy(trt_export / "model.onnx", tmp_path / "model.onnx")
    _edit_manifest(export, lambda m: m["onnx"].update(file=file))
    with pytest.raises(UserError, match="outside|absolute path"):
        build_engine(export, tmp_path / "trt", batch="1", max_seq=32, library="tensorrt", quiet=True,
                     trt_module=FakeTensorRT())
    with pytest.raises(UserError, match="outside|absolute path"):
        open_runtime(export, "ort")
    assert not (tmp_path / "trt").exists()


# --- validate --device cuda without CUDA (item 16) ---

@pytest.mark.parametrize("extra", [[], ["--decode-kernels", "--runtime", "ort"], ["--device", "gpu"]])
def test_validate_on_cuda_without_cuda_is_one_line(trt_export, monkeypatch, extra):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = trt_export.parent
    result = run_cli("validate", "--reference", root / "full", "--candidate", root / "hf", "--device", "cuda",
                     "--no-speed", "--parity-steps", "2", *extra)
    one_line_exit_2(result, "use cpu" if "gpu" not in extra else "--device must be cpu or cuda")


# --- validate a multi-depth export (item 21) ---

FAST_VALIDATE = ["--runtime", "ort", "--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--runs", "1",
                 "--warmup", "0", "--parity-steps", "4"]


def test_validate_checks_every_depth_of_a_multi_depth_export(multi, tmp_path):
    import json

    src, out = multi
    result = run_cli("validate", "--reference", src, "--candidate", out, *FAST_VALIDATE, "--json", tmp_path / "r.json",
                     "--report", tmp_path / "r.md", "--plot", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["depths"]) == ["full", "2x"] and report["parity"]["passed"]
    assert report["depths"]["full"]["kept"] == [0, 1, 2, 3] and len(report["depths"]["2x"]["kept"]) == 2
    for depth in report["depths"].values():
        assert depth["parity"]["passed"] and depth["parity"]["steps_compared"] == 4
        assert set(depth["speedup"]["measured"]) == {"1"}
    assert "depth full" in result.stdout and "depth 2x" in result.stdout
    assert (tmp_path / "r.png").stat().st_size > 0


def test_validate_one_depth_or_refuse_an_unknown_one(multi, tmp_path):
    import json

    src, out = multi
    result = run_cli("validate", "--reference", src, "--candidate", out, "--depth", "2x", *FAST_VALIDATE, "--no-speed",
                     "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert list(json.loads((tmp_path / "r.json").read_text())["depths"]) == ["2x"]
    one_line_exit_2(run_cli("validate", "--reference", src, "--candidate", out, "--depth", "9x", *FAST_VALIDATE),
                    "no depth '9x' in this export; it has: full, 2x")
    one_line_exit_2(run_cli("validate", "--reference", src, "--candidate", out, "--no-speed"),
                    "is a multi-depth export; --runtime ort runs its depths")


# --- recipe values checked before the first stage runs (items 22 and 11) ---

RECIPE_HEAD = "name: t\nmodel: {model}\nartifacts: {artifacts}\nplan:\n  speedup: 2\n"


@pytest.mark.parametrize("section, field, value", [
    ("triton", "device", "gpu"), ("triton", "instances", "0"), ("triton", "name", "'..'"),
    ("triton", "queue_delay_us", str(2**70)), ("triton", "instances", "1000000"), ("triton", "max_batch", "3000000000"),
    ("triton", "runtime", "onnxruntime"), ("plan", "device", "gpu"), ("plan", "strategy", "BEST"),
    ("heal", "lr", "5"), ("heal", "loss", "mse"), ("onnx", "dtype", "int4"), ("onnx", "builder", "trt"),
    ("validate", "runtime", "trt"), ("validate", "device", "gpu"), ("validate", "prompt_len", str(2**40)),
])
@pytest.mark.parametrize("via_set", [False, True])
def test_bad_recipe_values_are_refused_before_any_stage_naming_the_line(tmp_path, section, field, value, via_set):
    from conftest import STORIES

    text = RECIPE_HEAD.format(model=STORIES, artifacts=tmp_path / "artifacts")
    sections = {"heal": "heal:\n  data: x.txt\n", "onnx": "onnx:\n  device: cpu\n", "validate": "validate:\n",
                "triton": "onnx:\ntriton:\n"}
    text += sections.get(section, "")
    if via_set:
        args = ["--set", f"{section}.{field}={value}"]
    else:
        text = text.replace(f"{section}:\n", f"{section}:\n  {field}: {value}\n", 1)
        args = []
        line = max(i for i, l in enumerate(text.splitlines(), 1) if l.startswith(f"  {field}:"))
    (tmp_path / "r.yaml").write_text(text)
    result = run_cli("run", tmp_path / "r.yaml", *args)
    one_line_exit_2(result, f"'{section}.{field}' must be" if (section, field) != ("onnx", "dtype")
                    else "the torch builder exports fp32, fp16, not int4")
    assert ("(--set)" if via_set else f"line {line}:") in result.stderr
    assert " --" not in result.stderr.replace("(--set)", ""), "the message names a CLI flag"
    assert not (tmp_path / "artifacts").exists(), "a stage ran before the recipe's values were checked"


@pytest.mark.parametrize("section, says", [("validate:\n  device: cuda\n", "the recipe's 'validate.device' cuda: "),
                                           ("heal:\n  data: missing.txt\n", "'heal.data' missing.txt does"),
                                           ("validate:\n  text: gone.txt\n", "the recipe's 'validate.text' gone.txt")])
def test_a_recipe_device_or_file_this_machine_lacks_is_refused_before_any_stage(tmp_path, monkeypatch, section, says):
    import torch
    from conftest import STORIES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE_HEAD.format(model=STORIES, artifacts=tmp_path / "artifacts") + section)
    one_line_exit_2(run_cli("run", tmp_path / "r.yaml"), says)
    assert not (tmp_path / "artifacts").exists()


# --- plan: --strategy in any case, every strategy listed, --device checked (issue 35) ---

def test_plan_strategy_in_any_case():
    import json

    from conftest import DATA, STORIES

    lower = run_cli("plan", "--num-layers", "32", "--speedup", "2", "--strategy", "uls", "--json")
    upper = run_cli("plan", "--num-layers", "32", "--speedup", "2", "--strategy", "ULS", "--json")
    assert upper.exit_code == 0 and json.loads(upper.stdout) == json.loads(lower.stdout), upper.output
    bi = run_cli("plan", "--model", STORIES, "--speedup", "2", "--strategy", "BI", "--calib",
                 DATA / "tinystories-valid-excerpt.txt", "--json")
    assert bi.exit_code == 0 and json.loads(bi.stdout)["strategy"] == "bi", bi.output
    one_line_exit_2(run_cli("plan", "--num-layers", "32", "--speedup", "2", "--strategy", "Bi"),
                    "--strategy bi scores the layers on calibration text: give --model")


def test_plan_unknown_strategy_lists_every_one_and_a_bad_device_is_refused():
    from conftest import STORIES

    one_line_exit_2(run_cli("plan", "--num-layers", "32", "--speedup", "2", "--strategy", "best"),
                    "choose one of uls, even, top, first, bi, angular, greedy-ppl")
    one_line_exit_2(run_cli("plan", "--model", STORIES, "--speedup", "2", "--strategy", "best"),
                    "choose one of uls, even, top, first, bi, angular, greedy-ppl")
    one_line_exit_2(run_cli("plan", "--num-layers", "32", "--speedup", "2", "--device", "gpu"),
                    "--device must be cpu or cuda")


def test_a_recipe_field_given_twice_is_refused(tmp_path):
    from ulsexport.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel: m\nonnx:\n  builder: torch\n  dtype: fp32\n  builder: genai\n")
    with pytest.raises(UserError, match=r"line 6: 'onnx.builder' is given twice \(line 4 too\)"):
        load_recipe(path)
