import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import run_cli
from ulsexport.export.trace import export_onnx
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.runtime import GreedyRun
from ulsexport.validate import SpeedSettings, compare_runs, validate

TINY_SPEED = SpeedSettings(batches=(1, 2), prompt_len=5, new_tokens=3, runs=2, warmup=1)


@pytest.fixture(scope="module")
def pruned(tiny_checkpoints, tmp_path_factory):
    src = tiny_checkpoints["llama"]
    out = tmp_path_factory.mktemp("validate") / "hf"
    prune_checkpoint(src, out, plan_for_model(src, 2), quiet=True)
    return src, out


def test_compare_runs_finds_the_first_divergence():
    logits = [np.eye(2, 5, k=i, dtype=np.float32) for i in range(3)]
    reference = GreedyRun(np.array([[0, 1, 2], [1, 2, 3]]), logits)
    drifted = [logit.copy() for logit in logits]
    drifted[1][1] += 0.5
    candidate = GreedyRun(np.array([[0, 1, 2], [1, 4, 3]]), drifted)
    result = compare_runs(reference, candidate, 1e-4)
    assert not result["passed"] and not result["greedy_tokens_equal"]
    assert {k: result["first_divergence"][k] for k in ("step", "row", "near_tie")} == {
        "step": 1, "row": 1, "near_tie": False}
    assert result["first_step_over_tolerance"] == 1
    assert compare_runs(reference, reference, 1e-4)["passed"]


def test_tokens_parting_at_a_near_tie_pass_only_within_the_dtype_tolerance():
    """fp16 may flip a greedy token where the reference's top two are closer than fp16 resolves."""
    reference_logits = np.array([[10.0, 9.99, 0.0]], dtype=np.float32)   # margin 1e-3 of the largest logit
    candidate_logits = np.array([[9.995, 9.996, 0.0]], dtype=np.float32)  # relative error 5e-4, picks token 1
    reference = GreedyRun(np.array([[0, 2]]), [reference_logits, reference_logits])
    candidate = GreedyRun(np.array([[1, 2]]), [candidate_logits, candidate_logits])
    fp16 = compare_runs(reference, candidate, 1e-2)
    assert fp16["passed"] and not fp16["greedy_tokens_equal"]
    assert fp16["first_divergence"]["near_tie"] and abs(fp16["first_divergence"]["reference_margin"] - 1e-3) < 1e-6
    fp32 = compare_runs(reference, candidate, 1e-4)
    assert not fp32["passed"] and not fp32["first_divergence"]["near_tie"]


def test_pruned_checkpoint_passes_with_speed_report(pruned):
    src, out = pruned
    report = validate(src, out, "torch", speed=TINY_SPEED, parity_steps=8, quiet=True)
    assert report["parity"]["passed"] and report["parity"]["max_relative_error"] < 1e-5
    assert report["kept"] == [0, 2, 4, 7]
    for batch in ("1", "2"):
        for side in ("full", "pruned"):
            decode = report["speed"][side][batch]["decode_tokens_per_s"]
            assert decode["runs"] == 2 and 0 < decode["min"] <= decode["median"] <= decode["max"]
        assert report["speedup"]["measured"][batch]["decode_tokens_per_s"] > 0
    assert report["speedup"]["target"] == 2.0


def test_planted_mismatch_fails_with_exit_1_and_says_where(pruned, tmp_path):
    src, out = pruned
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"] *= 1.5
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("validate", "--reference", src, "--candidate", broken, "--no-speed",
                     "--parity-steps", 8, "--json", tmp_path / "r.json", "--report", tmp_path / "r.md")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["parity"]["passed"]
    assert report["parity"]["first_step_over_tolerance"] == 0
    assert "FAIL" in (tmp_path / "r.md").read_text()


def test_onnx_candidate_on_onnxruntime(pruned, tmp_path):
    src, out = pruned
    onnx_dir = export_onnx(out, tmp_path / "onnx", quiet=True).out_dir
    from click.testing import CliRunner
    from ulsexport.cli import main

    result = CliRunner().invoke(main, ["validate", "--reference", str(src), "--candidate", str(onnx_dir), "--runtime",
                                       "ort", "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--runs", "1",
                                       "--warmup", "0", "--json", str(tmp_path / "r.json"),
                                       "--plot", str(tmp_path / "r.png")])   # not --quiet: what it says it does
    assert result.exit_code == 0, result.output
    assert "building the full model's ort export to time it beside the candidate" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["max_relative_error"] < 1e-4
    assert report["candidate_kind"] == "onnx" and "1" in report["speed"]["full"]
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_planted_mismatch_in_onnx_graph_fails(pruned, tmp_path):
    import onnx
    from onnx import numpy_helper

    src, out = pruned
    onnx_dir = export_onnx(out, tmp_path / "onnx", optimize=False, quiet=True).out_dir
    model = onnx.load(onnx_dir / "model.onnx")
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, onnx_dir / "model.onnx")
    report = validate(src, onnx_dir, "ort", speed=None, parity_steps=4, quiet=True)
    assert not report["parity"]["passed"]


@pytest.mark.parametrize("args,message", [
    (("--candidate", "/nonexistent"), "does not exist"),
    (("--runtime", "ort"), "runs onnx or genai artifacts"),
    (("--runtime", "bogus"), "unknown runtime"),
    (("--dtype", "fp8"), "unknown dtype"),
    (("--no-cuda-graph",), "applies to --runtime ort"),
    (("--decode-kernels",), "applies to --runtime ort"),
])
def test_bad_input(pruned, args, message):
    src, out = pruned
    base = {"--candidate": str(out)}
    extra = list(args)
    if "--candidate" in extra:
        base = {}
    flat = [x for kv in base.items() for x in kv]
    result = run_cli("validate", "--reference", src, *flat, *extra, "--no-speed")
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_candidate_from_another_model_is_refused(pruned, tiny_checkpoints):
    _, out = pruned
    result = run_cli("validate", "--reference", tiny_checkpoints["qwen2"], "--candidate", out, "--no-speed")
    assert result.exit_code == 2 and "not pruned from" in result.stderr


def test_several_texts_give_the_generality_table(tmp_path):
    """Quality reads as a table: perplexity per held-out text, top-1 agreement with the full model on its
    own samples, and (kjv16 has no chat template) no chat column."""
    from conftest import DATA, KJV16

    out = tmp_path / "hf"
    prune_checkpoint(KJV16, out, plan_for_model(KJV16, 2), quiet=True)
    (tmp_path / "kjv.txt").write_text((DATA / "kjv-valid.txt").read_text()[:3000])
    (tmp_path / "stories.txt").write_text((DATA / "tinystories-valid-excerpt.txt").read_text()[:3000])
    result = run_cli("validate", "--reference", KJV16, "--candidate", out, "--no-speed", "--parity-steps", 4,
                     "--text", tmp_path / "kjv.txt", "--text", tmp_path / "stories.txt", "--json", tmp_path / "r.json",
                     "--eval-samples", 4)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["generality"]["rows"]
    assert set(rows["full"]["perplexity"]) == {"kjv", "stories"} and rows["full"]["top1_agreement"] == 1.0
    assert 0 < rows["pruned"]["top1_agreement"] < 1 and rows["pruned"]["chat_agreement"] is None
    assert report["perplexity"]["pruned"] == rows["pruned"]["perplexity"]["kjv"] > report["perplexity"]["full"]
    assert "| model | ppl kjv | ppl stories | top-1 agreement | greedy agreement | chat agreement |" in result.stdout
    assert report["generality"]["sampled_windows"] == 4
    bad = run_cli("validate", "--reference", KJV16, "--candidate", out, "--no-speed", "--eval-samples", -1)
    assert bad.exit_code == 2 and "--eval-samples -1" in bad.stderr
