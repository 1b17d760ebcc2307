"""onnxruntime-genai: the genai builder's and the torch builder's exports, decoded by genai's own loop,
against the pruned PyTorch model (greedy tokens over 32 steps, fp32 logits within 1e-4 relative)."""
import json
import sys

import numpy as np
import pytest

from conftest import KJV16, STORIES, run_cli, sampled
from ulsexport.errors import UserError
from ulsexport.export.trace import export_onnx
from ulsexport.precision import relative_error
from ulsexport.runtime.pytorch import torch_greedy
from ulsexport.artifact import GENAI_CONFIG
from ulsexport.export.genai import build_genai
from ulsexport.runtime.genai import GenaiRuntime
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.testing import save_word_tokenizer

pytest.importorskip("onnxruntime_genai")

STEPS = 32
GENAI_FAMILIES = ("llama", "qwen3", "gemma2", "phi3")
# Tiny shapes the builder and onnxruntime's CPU kernels take: head size 16 (CPU GroupQueryAttention
# needs a multiple of 16) and no linear layer as wide as the vocabulary (the builder would take it
# for the LM head). phi3 without a sliding window: the builder cannot apply phi3's (no layer_types).
GENAI_SHAPE = dict(hidden_size=64, intermediate_size=96, head_dim=16, query_pre_attn_scalar=16, vocab_size=160,
                   original_max_position_embeddings=256)
FAMILY_SHAPE = {"phi3": dict(sliding_window=None)}
PROMPT_LEN = 12  # longer than the tiny sliding window (8) of qwen3 and gemma2


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Pruned (2x) checkpoints by name: the tiny genai-shaped families, kjv16 and stories260K."""
    from ulsexport.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("genai")
    sources = {}
    for family in GENAI_FAMILIES:
        sources[family] = make_tiny_checkpoint(family, root / family,
                                               overrides={**GENAI_SHAPE, **FAMILY_SHAPE.get(family, {})})
        save_word_tokenizer(sources[family], GENAI_SHAPE["vocab_size"])
    sources.update(kjv16=KJV16, stories260K=STORIES)
    return {name: prune_checkpoint(src, root / f"{name}-2x", plan_for_model(src, 2), quiet=True).out_dir
            for name, src in sources.items()}


@pytest.fixture(scope="module")
def references():
    """Per pruned checkpoint: (prompt ids, mask, PyTorch greedy tokens, per-step logits), cached."""
    return {}


def reference_run(name, folder, cache):
    """A left-padded batch of 2 whose PyTorch greedy run never makes eos within STEPS.

    genai never stops early only by refusing eos (min_length), so a run through eos cannot match.
    """
    import torch

    from ulsexport.models import load_causal_lm

    if name not in cache:
        model = load_causal_lm(folder)
        config = model.config.get_text_config()
        for seed in range(20):
            ids = np.random.default_rng(seed).integers(3, config.vocab_size, (2, PROMPT_LEN), dtype=np.int64)
            mask = np.ones_like(ids)
            mask[1, :3] = 0
            tokens, logits = torch_greedy(model, torch.from_numpy(ids), torch.from_numpy(mask), STEPS)
            if not np.isin(tokens, [config.eos_token_id]).any():
                cache[name] = ids, mask, tokens, logits
                break
        else:
            pytest.fail(f"every prompt tried makes {name} say eos within {STEPS} steps")
    return cache[name]


def assert_same_run(runtime, name, folder, cache):
    ids, mask, tokens, logits = reference_run(name, folder, cache)
    run = runtime.greedy(ids, mask, STEPS, keep_logits=True)
    assert run.tokens.shape == (2, STEPS)
    np.testing.assert_array_equal(run.tokens, tokens)
    errors = [relative_error(actual, expected) for actual, expected in zip(run.logits, logits)]
    assert len(errors) == STEPS and max(errors) < 1e-4, max(errors)
    return run


@pytest.mark.parametrize("name", ["llama", "kjv16"])
def test_genai_builder_graph_runs_in_our_loop(name, pruned, references, tmp_path):
    """The builder's graph shares its cache as ours does: `--runtime ort` decodes it, left padding and all."""
    from ulsexport.runtime import open_runtime

    result = build_genai(pruned[name], tmp_path / "genai", quiet=True)
    assert result.manifest["onnx"]["kv_cache"] == "shared" and result.manifest["onnx"]["inputs"] == [
        "input_ids", "attention_mask"]
    assert_same_run(open_runtime(result.out_dir, "ort"), name, pruned[name], references)


def test_genai_prefill_and_step_match_its_own_loop(pruned, tmp_path):
    result = build_genai(pruned["llama"], tmp_path / "genai", quiet=True)
    runtime = GenaiRuntime(result.out_dir)
    ids = np.random.default_rng(5).integers(3, GENAI_SHAPE["vocab_size"], (2, 7), dtype=np.int64)
    own = runtime.greedy(ids, np.ones_like(ids), 8, keep_logits=True)
    state, logits = runtime.prefill(ids, np.ones_like(ids), 8)
    tokens = [runtime.next_tokens(logits)]
    for _ in range(7):
        tokens.append(runtime.next_tokens(runtime.step(state, tokens[-1])))
    np.testing.assert_array_equal(np.stack(tokens, 1), own.tokens)
    with pytest.raises(UserError, match="pad_token_id"):
        mask = np.ones_like(ids)
        mask[1, 0] = 0
        runtime.prefill(ids, mask, 8)


@pytest.mark.parametrize("name", [*GENAI_FAMILIES, "kjv16"])
def test_genai_builder_matches_pytorch(name, pruned, references, tmp_path):
    result = build_genai(pruned[name], tmp_path / "genai", quiet=True)
    manifest = json.loads((result.out_dir / "ulsexport.json").read_text())
    assert manifest["builder"] == "genai" and manifest["kind"] == "onnx"
    assert manifest["cache_to_original_layer"] == {str(i): k for i, k in enumerate(manifest["kept"])}
    assert (result.out_dir / GENAI_CONFIG).is_file()
    run = assert_same_run(GenaiRuntime(result.out_dir), name, pruned[name], references)
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


# by default llama and stories260K; every family and kjv16 with `pytest -m extended`
@pytest.mark.parametrize("name", sampled([*GENAI_FAMILIES, "kjv16", "stories260K"], ("llama", "stories260K")))
def test_torch_builder_export_runs_in_genai(name, pruned, references, tmp_path):
    out = export_onnx(pruned[name], tmp_path / "onnx", optimize=False, quiet=True).out_dir
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["num_hidden_layers"] == len(json.loads((out / "ulsexport.json").read_text())["kept"])
    assert_same_run(GenaiRuntime(out), name, pruned[name], references)


@pytest.mark.parametrize("name", sampled(["llama", "kjv16"], ("llama",)))
def test_torch_builder_shared_cache_runs_in_genai(name, pruned, references, tmp_path):
    """The default export: GroupQueryAttention over a shared cache, lengths from the mask as genai feeds it."""
    out = export_onnx(pruned[name], tmp_path / "onnx", quiet=True).out_dir
    assert json.loads((out / "ulsexport.json").read_text())["onnx"]["kv_cache"] == "shared"
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    assert config["search"]["past_present_share_buffer"] is False  # genai shares it on CUDA only, as for its own
    assert_same_run(GenaiRuntime(out), name, pruned[name], references)


@pytest.mark.parametrize("name,overrides,message", [
    ("stories260K", None, "multiple of 16"),  # head size 8
    ("phi3", dict(sliding_window=8), "sliding_window 8 but no layer_types"),
    ("llama", dict(intermediate_size=160), "vocab_size (160)"),
])
def test_models_the_builder_gets_wrong_are_refused(name, overrides, message, pruned, tmp_path):
    from ulsexport.testing import make_tiny_checkpoint

    source = pruned[name] if overrides is None else \
        make_tiny_checkpoint(name, tmp_path / name, 2, overrides={**GENAI_SHAPE, **overrides})
    with pytest.raises(UserError, match="--builder torch") as error:
        build_genai(source, tmp_path / "out", quiet=True)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_family_the_builder_lacks_is_refused(tmp_path):
    from ulsexport.testing import VOCAB, make_tiny_checkpoint

    source = make_tiny_checkpoint("opt", tmp_path / "opt", 2, overrides=dict(hidden_size=64, word_embed_proj_dim=64))
    save_word_tokenizer(source, VOCAB)
    with pytest.raises(UserError, match="does not handle 'opt'.*--builder torch"):
        build_genai(source, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_builder_genai_writes_manifest_beside_genai_config(pruned, tmp_path):
    result = run_cli("onnx", "--builder", "genai", "--model", pruned["kjv16"], "--out", tmp_path / "genai", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["builder"] == "genai" and manifest["kept"] == [0, 2, 4, 6, 8, 10, 12, 15]
    assert manifest["cache_to_original_layer"]["7"] == 15
    assert (tmp_path / "genai" / GENAI_CONFIG).is_file() and (tmp_path / "genai" / "ulsexport.json").is_file()
    GenaiRuntime(tmp_path / "genai")   # loads as written
    # a genai_config.json whose decoder names a file outside the artifact is refused before genai opens it
    (tmp_path / "secret.onnx").write_bytes((tmp_path / "genai" / "model.onnx").read_bytes()[:64])
    config = json.loads((tmp_path / "genai" / GENAI_CONFIG).read_text())
    for bad, why in [("../secret.onnx", "lies outside"), (str(tmp_path / "secret.onnx"), "absolute path"),
                     ("absent.onnx", "not a file in the artifact")]:
        config["model"]["decoder"]["filename"] = bad
        (tmp_path / "genai" / GENAI_CONFIG).write_text(json.dumps(config))
        with pytest.raises(UserError, match=why):
            GenaiRuntime(tmp_path / "genai")
        triton = run_cli("triton", "--model", tmp_path / "genai", "--out", tmp_path / "repo")
        assert triton.exit_code == 2 and why in triton.stderr and not (tmp_path / "repo").exists(), triton.output
    (tmp_path / "genai" / GENAI_CONFIG).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GenaiRuntime(tmp_path / "genai")


@pytest.mark.parametrize("args,message", [
    (("--builder", "genai", "--dtype", "fp16"), "makes no fp16 model for cpu"),
    (("--builder", "genai", "--no-optimize"), "--builder torch only"),
    (("--builder", "genai", "--kv-cache", "shared"), "--builder torch only"),
    (("--kv-cache", "shared", "--attention", "mha"), "--kv-cache shared needs --attention gqa"),
    (("--dtype", "int4"), "int4: --builder genai"),
])
def test_cli_builder_bad_combinations(pruned, tmp_path, args, message):
    result = run_cli("onnx", "--model", pruned["kjv16"], "--out", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_missing_genai_package_says_how_to_install(pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # makes `import onnxruntime_genai` fail
    with pytest.raises(UserError, match=r"pip install 'ulsexport\[genai\]'"):
        build_genai(pruned["kjv16"], tmp_path / "out", quiet=True)
    with pytest.raises(UserError, match=r"ulsexport\[genai-cuda\]"):
        GenaiRuntime(tmp_path)
    result = run_cli("onnx", "--builder", "genai", "--model", pruned["kjv16"], "--out", tmp_path / "cli")
    assert result.exit_code == 2 and "pip install 'ulsexport[genai]'" in result.stderr
    assert not (tmp_path / "cli").exists()


def test_validate_runtime_genai_builds_the_full_model_the_same_way(pruned, tmp_path):
    candidate = build_genai(pruned["kjv16"], tmp_path / "genai", quiet=True).out_dir
    result = run_cli("validate", "--reference", KJV16, "--candidate", candidate, "--runtime", "genai",
                     "--batch", "1,2", "--prompt-len", 8, "--new-tokens", 4, "--runs", 1, "--warmup", 0,
                     "--parity-steps", 8, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["candidate_kind"] == "genai" and report["runtime"] == "genai"
    assert report["parity"]["passed"] and report["parity"]["max_relative_error"] < 1e-4
    assert set(report["speed"]["full"]) == {"1", "2"} and report["speedup"]["measured"]["2"]["decode_tokens_per_s"] > 0


def test_builder_options_reach_genais_builder(tmp_path):
    """`extra_options` go to genai's builder as its own KEY=VALUE options (benchmarks/engine_load.py builds with
    use_paged_attention=true on CUDA, for genai's Engine): on the CPU the builder refuses paged attention, and
    that refusal is one UserError naming it, with nothing left at the output."""
    from ulsexport.errors import UserError
    from ulsexport.testing import make_tiny_checkpoint

    source = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2, overrides=GENAI_SHAPE)
    save_word_tokenizer(source, GENAI_SHAPE["vocab_size"])
    with pytest.raises(UserError, match="PagedAttention"):
        build_genai(source, tmp_path / "paged", quiet=True, extra_options=("use_paged_attention=true",))
    assert not (tmp_path / "paged").exists()
