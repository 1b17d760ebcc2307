"""Self-speculative decoding over a multi-depth export (`runtime.speculative`): lossless is a test. The tokens
are the full depth's greedy tokens, for every number of drafted tokens K from 1 to 6, prompts of several
lengths, both cache layouts, a draft that always agrees (every round keeps K + 1), and an EOS inside a
drafted block."""
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import KJV16, MULTI_DEPTH_SHAPE as SHAPE, run_cli, sampled, silence_layers  # noqa: E402
from ulsexport.errors import UserError  # noqa: E402
from ulsexport.export.multi_depth import export_multi_depth  # noqa: E402
from ulsexport.runtime.ort import MultiDepthDecoder  # noqa: E402
from ulsexport.runtime.speculative import speculative_greedy  # noqa: E402
from ulsexport.testing import make_tiny_checkpoint  # noqa: E402

STEPS = 40


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (conftest's one_thread)."""


def _prompts(vocab: int, lengths=(3, 9, 17)):
    """Rows of several lengths, left-padded."""
    rng = np.random.default_rng(1)
    width = max(lengths)
    ids = rng.integers(3, vocab, (len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return ids, mask


def _full(runtime, ids, mask, steps):
    return runtime.greedy(ids, mask, steps, depth="full").tokens


@pytest.fixture(scope="module", params=["shared", "concat"])
def tiny(request, multi_depth_exports):
    return MultiDepthDecoder(multi_depth_exports(request.param)[1], "cpu")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_tokens_are_the_full_depths_for_every_k(tiny, k):
    ids, mask = _prompts(128)
    expected = _full(tiny, ids, mask, STEPS)
    for draft in [d for d in ("2x", "3x") if d in tiny.depths]:
        run = speculative_greedy(tiny, ids, mask, STEPS, draft=draft, draft_tokens=k)
        np.testing.assert_array_equal(np.array(run.tokens), expected)
        assert run.rounds > 0 and 0 <= run.accepted <= run.drafted
        assert len(run.tokens) == 3 and run.draft_seconds > 0 and run.verify_seconds > 0


@pytest.fixture(scope="module")
def agreeing_export(tmp_path_factory):
    """Layers 1, 2 and 4 write nothing into the residual stream (their output projections are zero), so the
    2x depth (layers 0, 3, 5) computes exactly what the full depth does: every draft is accepted."""
    root = tmp_path_factory.mktemp("agree")
    src = make_tiny_checkpoint("llama", root / "hf", num_layers=6, overrides=SHAPE)
    silence_layers(src, (1, 2, 4))
    return export_multi_depth(src, root / "multi", [1, 2], quiet=True).out_dir


@pytest.fixture(scope="module")
def agreeing(agreeing_export):
    return MultiDepthDecoder(agreeing_export, "cpu")


@pytest.mark.parametrize("k", [1, 4, 6])
def test_a_draft_that_always_agrees_keeps_k_plus_one_per_round(agreeing, k):
    ids, mask = _prompts(128)
    run = speculative_greedy(agreeing, ids, mask, STEPS, draft="2x", draft_tokens=k)
    np.testing.assert_array_equal(np.array(run.tokens), _full(agreeing, ids, mask, STEPS))
    assert run.acceptance_rate == 1.0
    # per row: the prefill's token, then rounds of K + 1 (the last round drafts only what is left)
    assert run.rounds == 3 * -(-(STEPS - 1) // (k + 1))


def test_adaptive_k_is_lossless_and_drafts_more_where_the_draft_agrees(tiny, agreeing):
    """K chosen each round from the running acceptance rate and costs: the full depth's tokens either way; the
    always-agreeing draft gets long drafts, a random one (which seldom agrees) short ones."""
    ids, mask = _prompts(128)
    good = speculative_greedy(agreeing, ids, mask, STEPS, draft="2x", draft_tokens=6, adaptive=True)
    np.testing.assert_array_equal(np.array(good.tokens), _full(agreeing, ids, mask, STEPS))
    poor = speculative_greedy(tiny, ids, mask, STEPS, draft="2x", draft_tokens=6, adaptive=True)
    np.testing.assert_array_equal(np.array(poor.tokens), _full(tiny, ids, mask, STEPS))
    assert good.summary()["mean_draft_tokens"] > 4 > poor.summary()["mean_draft_tokens"], (good.summary(), poor.summary())


def test_an_eos_inside_a_drafted_block_ends_the_row_there(agreeing):
    ids, mask = _prompts(128)
    expected = _full(agreeing, ids, mask, STEPS)
    eos = int(expected[0, 6])    # K = 4: rounds keep tokens 1-5, 6-10: the 7th token is the 2nd of a block
    run = speculative_greedy(agreeing, ids, mask, STEPS, draft="2x", draft_tokens=4, eos_id=eos)
    for row, tokens in enumerate(run.tokens):
        full = list(expected[row])
        assert tokens == (full[:full.index(eos) + 1] if eos in full else full)
    assert run.tokens[0] == list(expected[0, :7])


# The captured loop (CUDA's default: fixed-width draft steps that choose their own ids, a verify pass through
# buffers of its own, rollback by one mask) runs on the CPU too, uncaptured, with `fixed_width=True`.
@pytest.fixture(scope="module")
def fixed(multi_depth_exports):
    return MultiDepthDecoder(multi_depth_exports("shared")[1], "cpu", fixed_width=True)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_the_captured_loop_keeps_the_full_depths_tokens_for_every_k(fixed, tiny, k):
    ids, mask = _prompts(128)
    expected = _full(fixed, ids, mask, STEPS)
    if tiny.decoders["full"].shared_cache:   # the plain loop's full depth gives the same tokens
        np.testing.assert_array_equal(_full(tiny, ids, mask, STEPS), expected)
    for draft in [d for d in ("2x", "3x") if d in fixed.depths]:
        run = speculative_greedy(fixed, ids, mask, STEPS, draft=draft, draft_tokens=k)
        assert run.captured and run.summary()["loop"] == "captured"
        np.testing.assert_array_equal(np.array(run.tokens), expected, err_msg=f"{draft} K={k}")
        plain = speculative_greedy(fixed, ids, mask, STEPS, draft=draft, draft_tokens=k, captured=False)
        assert (plain.accepted, plain.rounds) == (run.accepted, run.rounds)   # the same rounds, the same choices


def test_the_captured_loop_with_a_draft_that_always_agrees_adaptive_k_and_an_eos(agreeing_export):
    """Every round fully accepted (the draft then runs two pending tokens), adaptive K, and an EOS inside a
    drafted block, through the captured loop."""
    runtime = MultiDepthDecoder(agreeing_export, "cpu", fixed_width=True)
    ids, mask = _prompts(128)
    expected = _full(runtime, ids, mask, STEPS)
    for k in (1, 4, 6):
        run = speculative_greedy(runtime, ids, mask, STEPS, draft="2x", draft_tokens=k)
        np.testing.assert_array_equal(np.array(run.tokens), expected, err_msg=f"K={k}")
        assert run.captured and run.acceptance_rate == 1.0 and run.rounds == 3 * -(-(STEPS - 1) // (k + 1))
        # every round after the first runs its two pending tokens in one pass: K passes a round, not K + 1
        assert run.draft_passes == run.drafted, (run.draft_passes, run.drafted)
    adaptive = speculative_greedy(runtime, ids, mask, STEPS, draft="2x", draft_tokens=6, adaptive=True)
    np.testing.assert_array_equal(np.array(adaptive.tokens), expected)
    eos = int(expected[0, 6])
    run = speculative_greedy(runtime, ids, mask, STEPS, draft="2x", draft_tokens=4, eos_id=eos)
    assert run.tokens[0] == list(expected[0, :7])


def test_parity_names_the_full_depths_margin_where_tokens_part(kjv16_multi, monkeypatch):
    """A speculative run whose tokens part from the full depth's (here made to: one token replaced by the full
    depth's runner-up) fails parity, and the report gives the full depth's own margin at that step, so that a
    part at a near tie (fp16 rounding of the verify pass) reads as such and any other as a failure."""
    import ulsexport.runtime.speculative as speculative
    from ulsexport.validate.parity import tie
    from ulsexport.validate.speculative import speculative_markdown, validate_speculative

    original, step = speculative.speculative_greedy, 5
    seen = {}

    def parted(runtime_, ids, *args, **kwargs):
        run = original(runtime_, ids, *args, **kwargs)
        logits = runtime_.greedy(ids, np.ones_like(ids), step + 1, keep_logits=True, depth="full").logits[step][0]
        runner_up = int(np.argsort(logits)[-2])
        seen.setdefault("margin", float(logits.max() - logits[runner_up]) / float(np.abs(logits).max()))
        run.tokens[0][step] = runner_up
        return run

    monkeypatch.setattr(speculative, "speculative_greedy", parted)
    report = validate_speculative(kjv16_multi, "2x", 2, "cpu", 8, None, quiet=True)
    parity = report["parity"]
    first = parity["mismatches"][0]
    assert not parity["passed"] and not parity["tokens_identical"] and len(parity["mismatches"]) == 8
    assert first["step"] == step and first["reference_margin"] == pytest.approx(seen["margin"], rel=1e-5)
    assert first["near_tie"] is (seen["margin"] <= 1e-4)
    assert "parity: FAIL" in speculative_markdown(report) and "the full depth's margin" in speculative_markdown(report)
    # the rule itself: within the tolerance of the step's largest logit is a near tie, past it is not
    logits = np.array([[10.0, 9.9995, 3.0]])
    assert tie(logits, 0, 0, 1, 1e-4)["near_tie"] and not tie(logits, 0, 0, 2, 1e-4)["near_tie"]


def test_the_captured_loop_is_refused_where_the_depths_cannot_run_it(tiny, fixed):
    ids, mask = _prompts(128)
    with pytest.raises(UserError, match="captured speculative loop needs"):
        speculative_greedy(tiny, ids, mask, 4, draft="2x", captured=True)
    stream, _ = fixed.decoder("full").prefill(ids, mask, 8)   # three rows
    for call in (lambda: stream.verify([1, 2]), lambda: stream.truncate(4)):
        with pytest.raises(UserError, match="takes one row"):
            call()


def test_bad_requests_are_one_line_errors(tiny):
    ids, mask = _prompts(128)
    for kwargs, message in [({"draft": "full"}, "is the depth it would be verified by"),
                            ({"draft": "5x"}, "no depth '5x'"),
                            ({"draft": "2x", "draft_tokens": 0}, "between 1 and 16")]:
        with pytest.raises(UserError, match=message):
            speculative_greedy(tiny, ids, mask, 4, **kwargs)


# kjv16 (16 layers, trained): drafts that agree often, 128 steps; K 1..6 (all but K=4 with `pytest -m extended`)
@pytest.fixture(scope="module")
def kjv16_multi(kjv16_multi_depth):
    return kjv16_multi_depth


@pytest.mark.parametrize("k", sampled([1, 2, 3, 4, 5, 6], (4,)))
def test_kjv16_128_steps(kjv16_multi, k):
    from ulsexport.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(KJV16)
    texts = ["In the beginning", "And the LORD spake unto Moses, saying, Speak unto the children of Israel"]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = np.array([[0] * (width - len(e)) + e for e in encoded], np.int64)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int64)
    runtime = MultiDepthDecoder(kjv16_multi, "cpu")
    run = speculative_greedy(runtime, ids, mask, 128, draft="2x", draft_tokens=k)
    np.testing.assert_array_equal(np.array(run.tokens), _full(runtime, ids, mask, 128))
    assert run.accepted > 0


@pytest.mark.extended
def test_smollm2_128_steps_every_k(smollm2, tmp_path):
    """The real pretrained model (30 layers, GQA 9/3, tied embeddings) at 1 and 2, its unhealed 2x drafting:
    the full depth's tokens over 128 steps for K 1-6, two prompts of different lengths in one batch. A few
    minutes on 2 cores (its unhealed draft seldom agrees, so each round keeps about one token)."""
    from ulsexport.tokenizer import load_tokenizer

    runtime = MultiDepthDecoder(export_multi_depth(smollm2, tmp_path / "multi", [1, 2], quiet=True).out_dir, "cpu")
    tokenizer = load_tokenizer(smollm2)
    encoded = [tokenizer(t)["input_ids"] for t in ("The capital of France is",
                                                   "The urllib.parse module defines functions that fall into")]
    width = max(map(len, encoded))
    ids = np.array([[0] * (width - len(e)) + e for e in encoded], np.int64)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int64)
    expected = _full(runtime, ids, mask, 128)
    for k in range(1, 7):
        run = speculative_greedy(runtime, ids, mask, 128, draft="2x", draft_tokens=k)
        np.testing.assert_array_equal(np.array(run.tokens), expected, err_msg=f"K={k}")


def test_generate_and_validate_commands(kjv16_multi, tmp_path):
    common = ["generate", "--model", kjv16_multi, "--prompt", "And God said", "-n", "30"]
    full = run_cli(*common, "--depth", "full", "--json")
    spec = run_cli(*common, "--speculative", "2x", "--draft-tokens", "3", "--json")
    adaptive = run_cli(*common, "--speculative", "2x", "--draft-tokens", "5", "--adaptive", "--json")
    assert adaptive.exit_code == 0 and json.loads(adaptive.stdout)["ids"] == json.loads(full.stdout)["ids"]
    assert full.exit_code == 0 and spec.exit_code == 0, full.output + spec.output
    full, spec = json.loads(full.stdout), json.loads(spec.stdout)
    assert spec["ids"] == full["ids"] and spec["text"] == full["text"] and len(full["ids"]) == 30
    stats = spec["speculative"]
    assert stats["draft"] == "2x" and stats["verify"] == "full" and stats["draft_tokens"] == 3
    assert 0 < stats["acceptance_rate"] <= 1 and stats["tokens_per_verify"] > 1
    assert stats["draft_seconds"] > 0 and stats["verify_seconds"] > 0
    report = tmp_path / "spec.json"
    result = run_cli("validate", "--candidate", kjv16_multi, "--speculative", "2x", "--parity-steps", "24",
                     "--new-tokens", "16", "--runs", "1", "--warmup", "0", "--json", report)
    assert result.exit_code == 0 and "parity: PASS" in result.stdout, result.output
    written = json.loads(report.read_text())
    assert written["parity"] == {"passed": True, "tokens_identical": True, "steps": 24, "prompts": 8,
                                 "tolerance": 1e-4, "mismatches": []}
    assert written["speed"]["speedup"] > 0 and written["acceptance"]["drafted"] > 0
    for args, message in [(["--depth", "2x", "--speculative", "2x"], "not both"),
                          (["--speculative", "full"], "is the depth it would be verified by"),
                          (["--speculative", "9x"], "no depth '9x'")]:
        result = run_cli(*common, *args)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.output
    one_depth = run_cli("generate", "--model", KJV16, "--prompt", "x", "--speculative", "2x")
    assert one_depth.exit_code == 2 and "multi-depth export" in one_depth.stderr
