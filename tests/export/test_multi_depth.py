"""Several depths from one set of weights (`ulsexport onnx --speedups`): one graph per depth over one
weights file, each depth equal to the checkpoint `ulsexport prune` makes for its speedup (greedy tokens
and fp32 logits within 1e-4), the weights stored and held in memory once."""
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import KJV16, STORIES, run_cli, sampled  # noqa: E402
from ulsexport.artifact import read_manifest  # noqa: E402
from ulsexport.export.multi_depth import WEIGHTS_FILE, export_multi_depth  # noqa: E402
from ulsexport.precision import TOLERANCES, relative_error  # noqa: E402
from ulsexport.prune import plan_for_model, prune_checkpoint  # noqa: E402
from ulsexport.runtime import open_runtime  # noqa: E402
from ulsexport.runtime.ort import MultiDepthDecoder  # noqa: E402
from ulsexport.testing import FAMILIES, make_tiny_checkpoint  # noqa: E402

STEPS = 8


def _prompt(vocab: int):
    ids = np.random.default_rng(0).integers(3, vocab, (2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def assert_depths_match_their_prunes(src, out, tmp_path):
    manifest = read_manifest(out)
    runtime = open_runtime(out, "ort")
    assert isinstance(runtime, MultiDepthDecoder) and runtime.depths == [g["tag"] for g in manifest["graphs"]]
    vocab = manifest["onnx"]["io_shapes"]["logits"][-1]
    ids, mask = _prompt(vocab)
    for graph in manifest["graphs"]:
        reference = src if graph["tag"] == "full" else prune_checkpoint(
            src, tmp_path / f"pruned-{graph['tag']}", plan_for_model(src, graph["speedup"]), quiet=True).out_dir
        expected = open_runtime(reference, "torch").greedy(ids, mask, STEPS, keep_logits=True)
        got = runtime.greedy(ids, mask, STEPS, keep_logits=True, depth=graph["tag"])
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert max(relative_error(a, e) for a, e in zip(got.logits, expected.logits)) < TOLERANCES["fp32"]
        assert graph["kept"] == list(plan_for_model(src, graph["speedup"]).kept) if graph["tag"] != "full" else True
    return manifest, runtime


@pytest.fixture(scope="module")
def multi(multi_depth_exports):
    """A 6-layer tiny llama exported at 1, 2 and 3 over one weights file (the shared cache)."""
    return multi_depth_exports("shared")


def test_three_depths_over_one_weights_file(multi, tmp_path):
    src, out = multi
    manifest, runtime = assert_depths_match_their_prunes(src, out, tmp_path)
    assert [g["tag"] for g in manifest["graphs"]] == ["full", "2x", "3x"]
    assert {g["onnx"]["kv_cache"] for g in manifest["graphs"]} == {"shared"}
    assert [g["kept"] for g in manifest["graphs"]] == [[0, 1, 2, 3, 4, 5], [0, 3, 5], [0, 5]]
    for graph in manifest["graphs"]:
        assert graph["cache_to_original_layer"] == {str(i): k for i, k in enumerate(graph["kept"])}
    weights = manifest["weights"]
    # the three depths together take no more than the full model's weights: every 2x and 3x layer is a full one
    full_model = (src / "model.safetensors").stat().st_size
    assert weights["bytes"] <= 1.1 * full_model < weights["bytes_if_each_depth_held_its_own"]
    assert sorted(p.name for p in out.glob("*.onnx*")) == ["2x.onnx", "3x.onnx", "full.onnx", WEIGHTS_FILE]
    # held once: every session takes the same OrtValues, one per distinct tensor
    assert len(runtime.weights.values) == weights["tensors"]
    assert runtime.weights.nbytes == sum(a.nbytes for a in runtime.weights.arrays.values())


def test_fixed_width_depths_over_the_shared_weights(multi):
    """The decode loop CUDA graphs replay, with the argmax added to each depth's graph in memory, over the
    shared initializers: the plain loop's tokens and logits at every depth, and with the full prefill (whose
    decoding stream takes the prompt's padded rows)."""
    _, out = multi
    plain, fixed = MultiDepthDecoder(out, "cpu"), MultiDepthDecoder(out, "cpu", fixed_width=True)
    assert all(d.device_argmax for d in fixed.decoders.values())
    ids, mask = _prompt(read_manifest(out)["onnx"]["io_shapes"]["logits"][-1])
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[1:]])  # 3 rows: run as 4
    for options in ({"depth": "full"}, {"depth": "2x"}, {"depth": "3x"}, {"depth": "3x", "prefill_depth": "full"}):
        expected = plain.greedy(ids, mask, STEPS, keep_logits=True, **options)
        got = fixed.greedy(ids, mask, STEPS, keep_logits=True, **options)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert max(relative_error(a, e) for a, e in zip(got.logits, expected.logits)) < TOLERANCES["fp32"]


def test_the_concatenated_cache_layout_too(multi_depth_exports, tmp_path):
    src, out = multi_depth_exports("concat")
    manifest, _ = assert_depths_match_their_prunes(src, out, tmp_path)
    assert {g["onnx"]["kv_cache"] for g in manifest["graphs"]} == {"concat"}


def test_each_graph_loads_on_its_own(multi):
    import onnxruntime as ort

    _, out = multi
    for file in ("full.onnx", "2x.onnx", "3x.onnx"):
        session = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        assert session.get_outputs()[0].name == "logits"


# kjv16 (16 layers, a minute here) with `pytest -m extended`
@pytest.mark.parametrize("name,model,speedups", [("stories260K", STORIES, "1,2"),
                                                 pytest.param("kjv16", KJV16, "2,3", marks=pytest.mark.extended)])
def test_real_models_at_two_depths(name, model, speedups, tmp_path):
    result = run_cli("onnx", "--model", model, "--speedups", speedups, "--out", tmp_path / "multi")
    assert result.exit_code == 0, result.output
    assert "stored once" in result.stdout
    assert_depths_match_their_prunes(model, tmp_path / "multi", tmp_path)


# every family with `pytest -m extended` (a multi-depth export takes 15-50 s each here); by default opt, the
# one that differs most from llama and costs least (learned positions, no rotary)
@pytest.mark.parametrize("family", sampled([f for f in FAMILIES if f != "llama"], ("opt",)))
def test_each_family_at_two_depths(family, tmp_path):
    """Each depth matches its prune, and self-speculative decoding over the two is lossless (issue 31: every
    family multi-depth supports, K 1-6, 128 steps, rows of two prompt lengths)."""
    from ulsexport.runtime.speculative import speculative_greedy

    src = make_tiny_checkpoint(family, tmp_path / "hf", num_layers=4)
    result = export_multi_depth(src, tmp_path / "multi", [1, 2], quiet=True)
    manifest, runtime = assert_depths_match_their_prunes(src, result.out_dir, tmp_path)
    ids, mask = _prompt(manifest["onnx"]["io_shapes"]["logits"][-1])
    expected = runtime.greedy(ids, mask, 128, depth="full").tokens
    for k in range(1, 7):
        run = speculative_greedy(runtime, ids, mask, 128, draft="2x", draft_tokens=k)
        np.testing.assert_array_equal(np.array(run.tokens), expected, err_msg=f"{family}, K={k}")


def test_depth_names_and_bad_speedups(multi, tmp_path):
    src, out = multi
    runtime = open_runtime(out, "ort")
    ids, mask = _prompt(128)
    with pytest.raises(Exception, match="no depth '4x'.*full, 2x, 3x"):
        runtime.greedy(ids, mask, 2, depth="4x")
    for bad in ("0.5,2", "nan", "x"):
        result = run_cli("onnx", "--model", src, "--speedups", bad, "--out", tmp_path / f"bad{bad}")
        assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output


def test_a_corrupt_depth_graph_is_refused_in_one_line(multi, tmp_path):
    import shutil

    from ulsexport.errors import UserError

    _, out = multi
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "2x.onnx").write_bytes((broken / "2x.onnx").read_bytes()[:200])
    with pytest.raises(UserError, match="ort could not load it .*rebuild it with `ulsexport onnx`"):
        open_runtime(broken, "ort")
