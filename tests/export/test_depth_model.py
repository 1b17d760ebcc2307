"""A depth of a multi-depth export taken from a checkpoint of its own (`onnx --speedups 1,2 --depth-model
2=DIR`): a student pruned from the model and healed alone drafts, the full depth stays the model itself.
The "healed" student here is a pruned tiny Llama whose weights were changed (healing's effect, without its
minutes): the export must hold its weights, its graph must match it, speculative decoding must give the full
depth's tokens, and validate must check the depth against that checkpoint, not the reference pruned afresh."""
import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

pytest.importorskip("onnxruntime")

from conftest import MULTI_DEPTH_SHAPE as SHAPE, run_cli, silence_layers  # noqa: E402
from ulsexport.artifact import read_manifest  # noqa: E402
from ulsexport.errors import UserError  # noqa: E402
from ulsexport.export.multi_depth import export_multi_depth  # noqa: E402
from ulsexport.prune import plan_for_model, prune_checkpoint  # noqa: E402
from ulsexport.runtime.ort import MultiDepthDecoder  # noqa: E402
from ulsexport.runtime.speculative import speculative_greedy  # noqa: E402
from ulsexport.testing import make_tiny_checkpoint  # noqa: E402
from ulsexport.validate import validate  # noqa: E402

KEEP = [0, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth-model")
    src = make_tiny_checkpoint("llama", root / "hf", num_layers=4, overrides=SHAPE)
    silence_layers(src, (1, 2))   # the 2x depth (0, 3) computes what the full one does
    student = prune_checkpoint(src, root / "student", plan_for_model(src, keep=KEEP), quiet=True).out_dir
    weights = load_file(student / "model.safetensors")
    for name, tensor in weights.items():   # "healing": every layer weight moved a little, embeddings kept
        if ".layers." in name and tensor.ndim == 2:
            tensor.add_(0.02 * tensor.std() * (1 + tensor.abs().sqrt()))
    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    plain = export_multi_depth(src, root / "plain", [1, 2], quiet=True).out_dir
    out = export_multi_depth(src, root / "multi", [1, 2], depth_models={2: student}, quiet=True).out_dir
    return {"src": src, "student": student, "plain": plain, "out": out, "root": root}


def _graphs(folder):
    return {g["tag"]: g for g in read_manifest(folder)["graphs"]}


def _prompt():
    ids = np.random.default_rng(3).integers(3, 128, (2, 7), dtype=np.int64)
    return ids, np.ones_like(ids)


def test_the_depth_is_the_students_and_the_full_depth_the_models(built):
    graphs = _graphs(built["out"])
    assert graphs["2x"]["model"] == str(built["student"].absolute()) and "model" not in graphs["full"]
    assert graphs["2x"]["speedup"] == 2 and graphs["2x"]["plan"]["strategy"] == "explicit"
    check = graphs["2x"]["parity_check"]   # the export compared its graph with the student in PyTorch
    assert graphs["2x"]["kept"] == KEEP and check["relative_logit_error"] <= check["tolerance"]
    plain, own = MultiDepthDecoder(built["plain"], "cpu"), MultiDepthDecoder(built["out"], "cpu")
    ids, mask = _prompt()
    full_plain = plain.greedy(ids, mask, 12, depth="full").tokens
    np.testing.assert_array_equal(own.greedy(ids, mask, 12, depth="full").tokens, full_plain)
    # the student's changed weights: its depth's tokens differ from the plainly pruned 2x's
    assert not np.array_equal(own.greedy(ids, mask, 12, depth="2x").tokens, plain.greedy(ids, mask, 12, depth="2x").tokens)
    # stored beside the model's: more bytes than the plain export, at most the two held apart
    stored = read_manifest(built["out"])["weights"]
    assert read_manifest(built["plain"])["weights"]["bytes"] < stored["bytes"] <= stored["bytes_if_each_depth_held_its_own"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_tokens_are_the_full_depths(built, k):
    """The student is near the full depth (the layers it drops write nothing), so drafts are both kept and
    rejected: the tokens are the full depth's either way."""
    runtime = MultiDepthDecoder(built["out"], "cpu")
    ids, mask = _prompt()
    run = speculative_greedy(runtime, ids, mask, 24, draft="2x", draft_tokens=k)
    np.testing.assert_array_equal(np.array(run.tokens), runtime.greedy(ids, mask, 24, depth="full").tokens)
    assert 0 < run.accepted < run.drafted, run.summary()


def test_validate_checks_the_depth_against_its_own_checkpoint(built, tmp_path):
    """The depth's parity against the checkpoint the user names (--depth-reference); the path the manifest
    records is never opened, and a checkpoint other than the exported one, or changed since, is refused."""
    student = built["student"]
    report = validate(built["src"], built["out"], runtime="ort", speed=None, parity_steps=6, depth="2x", quiet=True,
                      depth_references={"2x": student})
    assert report["parity"]["passed"]
    assert report["depths"]["2x"]["parity"]["reference_checkpoint"] == str(student)
    with pytest.raises(UserError, match="give it with --depth-reference 2x=DIR") as caught:
        validate(built["src"], built["out"], runtime="ort", speed=None, parity_steps=2, depth="2x", quiet=True)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="not the checkpoint depth 2x was exported from"):
        validate(built["src"], built["out"], runtime="ort", speed=None, parity_steps=2, depth="2x", quiet=True,
                 depth_references={"2x": built["src"]})
    # the student healed again after the export (its manifest changes): refused in one line, not a parity failure
    manifest = student / "ulsexport.json"
    before = manifest.read_text()
    try:
        manifest.write_text(json.dumps({**json.loads(before), "healing": {"steps": 1}}))
        with pytest.raises(UserError, match="or changed since") as caught:
            validate(built["src"], built["out"], runtime="ort", speed=None, parity_steps=2, depth="2x", quiet=True,
                     depth_references={"2x": student})
        assert "\n" not in str(caught.value)
    finally:
        manifest.write_text(before)
    result = run_cli("validate", "--reference", built["src"], "--candidate", built["out"], "--runtime", "ort",
                     "--depth", "2x", "--no-speed", "--parity-steps", "4", "--depth-reference", f"2x={student}")
    assert result.exit_code == 0, result.output
    result = run_cli("validate", "--reference", built["src"], "--candidate", built["out"], "--runtime", "ort",
                     "--depth", "2x", "--no-speed", "--depth-reference", "2x")
    assert result.exit_code == 2 and "--depth-reference" in result.output, result.output


def test_bad_depth_models_are_one_line_errors(built, tmp_path):
    src, student = built["src"], built["student"]
    wide = make_tiny_checkpoint("llama", tmp_path / "wide", num_layers=4)
    from_wide = prune_checkpoint(wide, tmp_path / "wide-2x", plan_for_model(wide, keep=KEEP), quiet=True).out_dir
    whole = prune_checkpoint(src, tmp_path / "whole", plan_for_model(src, keep=[0, 1, 2, 3]), quiet=True).out_dir
    for models, speedups, message in [({3: student}, [1, 2], "not one of --speedups"),
                                      ({1: student}, [1, 2], "speedup is above 1"),
                                      ({2: src}, [1, 2], "names no kept layers"),
                                      ({2: from_wide}, [1, 2], "not pruned from"),
                                      ({2: whole}, [1, 2], "a pruned depth keeps fewer")]:
        with pytest.raises(UserError, match=message) as caught:
            export_multi_depth(src, tmp_path / "x", speedups, depth_models=models, quiet=True)
        assert "\n" not in str(caught.value)
    pruned_for_other = prune_checkpoint(src, tmp_path / "p1.5", plan_for_model(src, 1.5), quiet=True).out_dir
    with pytest.raises(UserError, match="pruned for speedup 1.5, not 2"):
        export_multi_depth(src, tmp_path / "x", [1, 2], depth_models={2: pruned_for_other}, quiet=True)
    for value in ("2", "x=dir", "=dir", "2= "):
        result = run_cli("onnx", "--model", src, "--speedups", "1,2", "--depth-model", value, "--out", tmp_path / "y")
        assert result.exit_code == 2 and "--depth-model" in result.output, result.output
    result = run_cli("onnx", "--model", src, "--speedups", "1,2", "--depth-model", f"2={student}",
                     "--depth-model", f"2.0={student}", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "each speedup once" in result.output, result.output
    result = run_cli("onnx", "--model", src, "--depth-model", f"2={student}", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "goes with --speedups" in result.output, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
