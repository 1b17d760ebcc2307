"""The ULS authors' scheme, full-depth prefill and pruned decode, from one multi-depth export: against
an eager PyTorch reference of the same scheme (fp32 logits within 1e-4, greedy tokens over 32 steps)."""
import numpy as np
import pytest
from conftest import sampled

pytest.importorskip("onnxruntime")

from ulsexport.models import load_causal_lm  # noqa: E402
from ulsexport.precision import TOLERANCES, relative_error  # noqa: E402
from ulsexport.prune import plan_for_model, prune_checkpoint  # noqa: E402
from ulsexport.runtime import open_runtime  # noqa: E402
from ulsexport.testing import make_tiny_checkpoint  # noqa: E402
from ulsexport.validate.prefill_scheme import continuation_perplexity, scheme_greedy  # noqa: E402

from conftest import MULTI_DEPTH_SHAPE as SHARED_SHAPE  # noqa: E402
STEPS = 32


@pytest.mark.parametrize("kv_cache", sampled(["shared", "concat"], ("shared",)))  # concat: pytest -m extended
def test_full_prefill_then_pruned_decode_matches_pytorch(tmp_path, kv_cache, multi_depth_exports):
    import torch

    src, out = multi_depth_exports(kv_cache)
    plan = plan_for_model(src, 2)
    pruned = prune_checkpoint(src, tmp_path / "2x", plan, quiet=True).out_dir
    ids = np.random.default_rng(1).integers(3, 128, (2, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    expected = scheme_greedy(load_causal_lm(src), load_causal_lm(pruned), list(plan.kept),
                             torch.from_numpy(ids), torch.from_numpy(mask), STEPS)
    runtime = open_runtime(out, "ort")
    got = runtime.greedy(ids, mask, STEPS, keep_logits=True, depth="2x", prefill_depth="full")
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    assert max(relative_error(a, e) for a, e in zip(got.logits, expected.logits)) < TOLERANCES["fp32"]
    plain = runtime.greedy(ids, mask, STEPS, depth="2x")
    assert not np.array_equal(plain.tokens, got.tokens)  # the scheme is not plain pruning
    full_first = runtime.greedy(ids, mask, 1, depth="full").tokens
    np.testing.assert_array_equal(got.tokens[:, :1], full_first)  # the first new token is the full model's


def test_continuation_perplexity_of_the_scheme(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=6, overrides=SHARED_SHAPE)
    plan = plan_for_model(src, 2)
    full, pruned = load_causal_lm(src), load_causal_lm(prune_checkpoint(src, tmp_path / "2x", plan, quiet=True).out_dir)
    windows = np.random.default_rng(0).integers(3, 128, (3, 24)).tolist()
    result = continuation_perplexity(full, pruned, list(plan.kept), windows, prompt_len=12)
    assert result["tokens"] == 3 * 12 and result["pruned"] > 1 and result["full_prefill"] > 1
    everything = continuation_perplexity(full, full, list(range(6)), windows, prompt_len=12)
    assert everything["pruned"] == pytest.approx(everything["full_prefill"], rel=1e-5)  # nothing skipped: the same
