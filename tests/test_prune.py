import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import STORIES, run_cli
from identity_reference import skipped_layers_as_identity
from ulsexport.testing import FAMILIES, SLIDING_WINDOW
from ulsexport.errors import UserError
from ulsexport.artifact import read_manifest
from ulsexport.prune import plan_for_model, prune_checkpoint

PROMPT_LEN, NEW_TOKENS = 6, 20
assert PROMPT_LEN + NEW_TOKENS > 3 * SLIDING_WINDOW


def _prompt(vocab, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=g)


def _greedy(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check_pruned_matches_identity_reference(source: Path, out: Path, speedup=2):
    plan = plan_for_model(source, speedup)
    prune_checkpoint(source, out, plan, quiet=True)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    assert pruned.config.num_hidden_layers == len(plan.kept)
    ids = _prompt(pruned.config.vocab_size)
    with torch.no_grad(), skipped_layers_as_identity(original, plan.skipped):
        expected_logits = original(ids).logits
        expected_tokens = _greedy(original, ids)
    with torch.no_grad():
        logits = pruned(ids).logits
        tokens = _greedy(pruned, ids)
    assert _rel_err(logits, expected_logits) < 1e-5
    assert torch.equal(tokens, expected_tokens)
    # The skipped layers mattered: without them the full model's output differs.
    with torch.no_grad():
        assert _rel_err(original(ids).logits, expected_logits) > 1e-3
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_family_matches_identity_reference(family, tiny_checkpoints, tmp_path):
    plan = check_pruned_matches_identity_reference(tiny_checkpoints[family], tmp_path / "pruned")
    manifest = read_manifest(tmp_path / "pruned")
    assert manifest["kept"] == list(plan.kept) == [0, 2, 4, 7]
    assert manifest["new_to_original"] == {"0": 0, "1": 2, "2": 4, "3": 7}
    assert manifest["model_type"] == family and manifest["num_layers_original"] == 8
    assert len(manifest["source_config_sha256"]) == 64


def test_per_layer_config_fields_are_remapped(tiny_checkpoints, tmp_path):
    prune_checkpoint(tiny_checkpoints["qwen2"], tmp_path / "q", plan_for_model(tiny_checkpoints["qwen2"], 2), quiet=True)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    # max_window_layers=3: original layers 0-2 full attention, 3-7 sliding; kept 0,2,4,7.
    assert config["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert config["max_window_layers"] == 2 and config["num_hidden_layers"] == 4


def test_unknown_per_layer_field_is_an_error(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_checkpoints["llama"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["per_layer_mystery"] = list(range(8))
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="per_layer_mystery"):
        prune_checkpoint(src, tmp_path / "out", plan_for_model(src, 2), quiet=True)
    assert not (tmp_path / "out").exists()


def test_real_model_stories260k(tmp_path):
    plan = check_pruned_matches_identity_reference(STORIES, tmp_path / "pruned", speedup=1.25)
    assert plan.kept == (0, 1, 2, 4)
    files = sorted(p.name for p in (tmp_path / "pruned").iterdir())
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json", "PROVENANCE.md"} <= set(files)
    # Tied embeddings stay tied: no separate lm_head tensor is written.
    from safetensors import safe_open

    with safe_open(tmp_path / "pruned" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())


def test_sharded_output_with_index(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama"]
    prune_checkpoint(src, tmp_path / "sharded", plan_for_model(src, 2), max_shard_bytes=40_000, quiet=True)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    # A sharded input prunes too, and matches the single-file result.
    prune_checkpoint(tmp_path / "sharded", tmp_path / "again", plan_for_model(tmp_path / "sharded", keep=[0, 1, 3]), quiet=True)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    b_plan = plan_for_model(src, keep=[0, 2, 7])
    prune_checkpoint(src, tmp_path / "direct", b_plan, quiet=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "direct").eval()
    ids = _prompt(a.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_force_replaces_and_input_is_untouched(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["gpt2"]
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    out = tmp_path / "out"
    assert run_cli("prune", "--model", src, "--speedup", 2, "--out", out).exit_code == 0
    again = run_cli("prune", "--model", src, "--speedup", 2, "--out", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run_cli("prune", "--model", src, "--speedup", 4, "--out", out, "--force").exit_code == 0
    assert read_manifest(out)["kept"] == [0, 7]
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    refused = run_cli("prune", "--model", src, "--speedup", 2, "--out", src / "inside", "--force")
    assert refused.exit_code == 2 and "overwrite the input" in refused.stderr


def _broken_copies(src: Path, root: Path) -> dict:
    def copy(name, edit=None):
        d = root / name
        d.mkdir(parents=True)
        for f in src.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        if edit:
            edit(d)
        return d

    def unknown_type(d):
        c = json.loads((d / "config.json").read_text())
        c["model_type"] = "mamba_x"
        (d / "config.json").write_text(json.dumps(c))

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    def missing_shard(d):
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    def pickle_only(d):
        (d / "model.safetensors").rename(d / "pytorch_model.bin")

    return {
        "missing path": root / "nope",
        "no config": copy("noconfig", lambda d: (d / "config.json").unlink()),
        "unknown model_type": copy("unknown", unknown_type),
        "truncated safetensors": copy("truncated", truncate),
        "index names a missing shard": copy("missing_shard", missing_shard),
        "pickle only": copy("pickle", pickle_only),
    }


@pytest.mark.parametrize("case,message", [
    ("missing path", "does not exist"),
    ("no config", "no config.json"),
    ("unknown model_type", "not supported"),
    ("truncated safetensors", "truncated"),
    ("index names a missing shard", "names shard"),
    ("pickle only", "--allow-pickle"),
])
def test_bad_inputs_one_line_exit_2_nothing_written(case, message, tiny_checkpoints, tmp_path):
    src = _broken_copies(tiny_checkpoints["llama"], tmp_path / "inputs")[case]
    (tmp_path / "outs").mkdir()
    result = run_cli("prune", "--model", src, "--speedup", 2, "--out", tmp_path / "outs" / "pruned")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert os.listdir(tmp_path / "outs") == []


@pytest.mark.parametrize("args,message", [
    (("--speedup", 1), "greater than 1"),
    (("--speedup", 8), "at least 2"),
    (("--keep", "0,9"), "out of range"),
    (("--keep", "0,1,1"), "listed twice"),
    (("--keep", "0,1", "--skip", "2"), "not both"),
])
def test_bad_plans_on_prune(args, message, tiny_checkpoints, tmp_path):
    result = run_cli("prune", "--model", tiny_checkpoints["llama"], *args, "--out", tmp_path / "p")
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "p").exists()


def test_failure_midway_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import ulsexport.checkpoint as ckpt

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "copy_side_files", boom)
    src = tiny_checkpoints["llama"]
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, tmp_path / "out", plan_for_model(src, 2), quiet=True)
    assert os.listdir(tmp_path) == []


def test_allow_pickle(tiny_checkpoints, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_bytes((tiny_checkpoints["llama"] / "config.json").read_bytes())
    result = run_cli("prune", "--model", src, "--speedup", 2, "--out", tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4
