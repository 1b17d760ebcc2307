"""Layer plans chosen from calibration data (bi, angular, greedy-ppl) and compare-plans, on tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ulsexport.testing import make_tiny_checkpoint
from ulsexport.plan import scoring
from ulsexport.cli import main
from ulsexport.errors import UserError
from ulsexport.models import decoder_layers, load_causal_lm
from ulsexport.tokenizer import load_tokenizer
from ulsexport.plan import make_plan, num_kept_for_speedup
from ulsexport.prune import prune_checkpoint
from ulsexport.quality import perplexity

DATA = Path(__file__).parent.parent / "fixtures" / "data"
KJV = DATA / "kjv-valid.txt"
NUM_LAYERS = 8


def _add_char_tokenizer(directory: Path) -> Path:
    """One token per ASCII character (ids 32..126 fit the tiny vocab of 128), BOS = 1."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c for c in range(32, 127)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _add_char_tokenizer(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "llama", NUM_LAYERS))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict:
    lines = KJV.read_text().splitlines()
    d = tmp_path_factory.mktemp("text")
    out = {"calib": d / "calib.txt", "eval": d / "eval.txt", "both": d / "both.txt",
           "short": d / "short.txt", "empty": d / "empty.txt"}
    out["calib"].write_text("\n".join(line[:300] for line in lines[:4]) + "\n")
    out["eval"].write_text("\n".join(line[:300] for line in lines[60:64]) + "\n")
    out["both"].write_text(out["calib"].read_text() + out["eval"].read_text())
    out["short"].write_text("In the beginning.\n")
    out["empty"].write_text("\n \n")
    return out


def _calib(model_dir: Path, path: Path) -> scoring.Calibration:
    return scoring.read_calibration(load_tokenizer(model_dir), path, 1024)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_streamed_scores_equal_full_forward_hidden_states(tmp_path, family):
    model_dir = make_tiny_checkpoint(family, tmp_path / family, NUM_LAYERS)
    g = torch.Generator().manual_seed(0)
    windows = [[1] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (50, 31, 64)]
    calib = scoring.Calibration(windows, "-", "random ids")
    with scoring.streamed_base_model(model_dir, "cpu") as base:
        assert base is not None
        streamed = scoring.similarity_scores(base, calib, (2, 5), quiet=True)
        assert all(p.device.type == "meta" for p in decoder_layers(base).parameters())  # all released
    model = load_causal_lm(model_dir)
    loaded = scoring.similarity_scores(model.base_model, calib, (2, 5), quiet=True)
    # Reference: hidden_states[i] is the input of layer i for i < L (the last entry is after the final norm).
    sums, ang, tokens = [0.0] * (NUM_LAYERS - 1), {2: [0.0] * 6, 5: [0.0] * 3}, 0
    with torch.no_grad():
        for ids, mask in scoring._batches(windows, "cpu"):
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            m = mask.bool()
            unit = [torch.nn.functional.normalize(h[m], dim=-1) for h in hs[:NUM_LAYERS]]
            tokens += int(m.sum())
            for i in range(NUM_LAYERS - 1):
                sums[i] += (1 - (unit[i] * unit[i + 1]).sum(-1)).sum().item()
            for n, acc in ang.items():
                for l in range(NUM_LAYERS - n):
                    cos = (unit[l] * unit[l + n]).sum(-1).clamp(-1, 1)
                    acc[l] += (torch.arccos(cos) / math.pi).sum().item()
    assert streamed["block_influence"][:-1] == pytest.approx([s / tokens for s in sums], abs=1e-5)
    for n, acc in ang.items():
        assert streamed["angular_distance"][n][:len(acc)] == pytest.approx([a / tokens for a in acc], abs=1e-5)
    # The entries that need the last layer's output, checked against the loaded (not streamed) model.
    assert streamed["block_influence"] == pytest.approx(loaded["block_influence"], abs=1e-6)
    for n in (2, 5):
        assert streamed["angular_distance"][n] == pytest.approx(loaded["angular_distance"][n], abs=1e-6)


@pytest.mark.parametrize("strategy", scoring.DATA_STRATEGIES)
def test_strategy_gives_k_distinct_layers_deterministically(tiny, texts, strategy):
    k = num_kept_for_speedup(NUM_LAYERS, 2)
    plans = [scoring.plan_from_data(tiny, 2, strategy, texts["calib"], calib_tokens=256, quiet=True)
             for _ in range(2)]
    kept = plans[0].kept
    assert len(kept) == len(set(kept)) == k
    assert all(0 <= i < NUM_LAYERS for i in kept)
    assert {0, NUM_LAYERS - 1} <= set(kept)         # the stated policy: first and last always kept
    assert plans[1].kept == kept and plans[1].scores["calibration"] == plans[0].scores["calibration"]
    assert plans[0].scores["calibration"]["tokens"] == 256
    assert plans[0].scores["seconds"] >= 0


def test_other_calibration_text_changes_the_hash(tiny, texts):
    a = scoring.plan_from_data(tiny, 2, "bi", texts["calib"], calib_tokens=256, quiet=True)
    b = scoring.plan_from_data(tiny, 2, "bi", texts["eval"], calib_tokens=256, quiet=True)
    assert a.scores["calibration"]["sha256"] != b.scores["calibration"]["sha256"]
    assert a.scores["block_influence"] != b.scores["block_influence"]


def test_first_and_last_layer_are_kept_even_when_they_score_lowest():
    influence = [0.0, 0.5, 0.9, 0.1, 0.8, 0.3, 0.7, 0.0]
    assert scoring.kept_by_influence(influence, 4) == [0, 2, 4, 7]
    distances = [0.0, 0.4, 0.2, 0.3, 0.1, 0.0]       # blocks of n = 3 starting at l; l=0 and l=5 excluded
    assert scoring.kept_by_angular(distances, 8, 5) == ([0, 1, 2, 3, 7], 4)
    order = [{"layer": 3}, {"layer": 5}, {"layer": 1}]
    assert scoring.kept_by_greedy(order, 8, 6) == [0, 1, 2, 4, 6, 7]


def test_greedy_first_removal_is_the_cheapest_single_layer(tiny, texts):
    model = load_causal_lm(tiny)
    calib = _calib(tiny, texts["calib"])
    order = scoring.greedy_removal(model, calib, NUM_LAYERS - 2, quiet=True)
    single = {i: None for i in range(1, NUM_LAYERS - 1)}
    for i in single:
        with scoring.kept_layers_only(model, [j for j in range(NUM_LAYERS) if j != i]):
            single[i] = perplexity(model, calib.windows)
    assert order[0]["layer"] == min(single, key=lambda i: (single[i], i))
    assert order[0]["calib_ppl"] == pytest.approx(single[order[0]["layer"]])
    assert order[1]["layer"] != order[0]["layer"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2", "opt"])
def test_layers_dropped_in_memory_match_the_pruned_checkpoint(tmp_path, family):
    model_dir = make_tiny_checkpoint(family, tmp_path / family, NUM_LAYERS)
    plan = make_plan(NUM_LAYERS, 2, "even")
    pruned = prune_checkpoint(model_dir, tmp_path / "pruned", plan, quiet=True).out_dir
    windows = [[1] + list(range(3, 40)), [1] + list(range(50, 70))]
    model = load_causal_lm(model_dir)
    with scoring.kept_layers_only(model, plan.kept):
        in_memory = perplexity(model, windows)
    assert in_memory == pytest.approx(perplexity(load_causal_lm(pruned), windows), rel=1e-5)
    assert len(decoder_layers(model)) == NUM_LAYERS    # the full layer list is back


def _run(*args):
    result = CliRunner().invoke(main, ["--quiet", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.parametrize("calib, message", [
    ("missing.txt", "does not exist"), ("empty", "is empty"), ("short", "at least"), (None, "--calib FILE")])
def test_bad_calibration_is_refused_in_one_line(tiny, texts, tmp_path, calib, message):
    calib_args = [] if calib is None else ["--calib", texts.get(calib, tmp_path / calib)]
    for command in (["plan"], ["prune", "--out", tmp_path / "out"]):
        code, output = _run(*command, "--model", tiny, "--speedup", 2, "--strategy", "bi", *calib_args)
        assert code == 2, output
        assert output.strip().count("\n") == 0 and output.startswith("error:") and message in output
    assert not (tmp_path / "out").exists()


def test_calib_with_a_positional_strategy_is_refused(tiny, texts):
    code, output = _run("plan", "--model", tiny, "--speedup", 2, "--calib", texts["calib"])
    assert code == 2 and "--calib is used only by" in output


def test_prune_records_scores_and_calibration_hash(tiny, texts, tmp_path):
    code, output = _run("prune", "--model", tiny, "--speedup", 2, "--strategy", "bi", "--calib",
                        texts["calib"], "--calib-tokens", 512, "--out", tmp_path / "out", "--json")
    assert code == 0, output
    manifest = json.loads((tmp_path / "out" / "ulsexport.json").read_text())
    import hashlib

    scores = manifest["plan"]["scores"]
    assert scores["calibration"]["sha256"] == hashlib.sha256(texts["calib"].read_bytes()).hexdigest()
    assert len(scores["block_influence"]) == NUM_LAYERS and scores["streamed"] is True
    assert manifest["plan"]["strategy"] == "bi" and len(manifest["kept"]) == NUM_LAYERS // 2


def test_compare_plans_writes_table_json_and_plot(tiny, texts, tmp_path):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    code, output = _run("compare-plans", "--model", tiny, "--speedups", "2,1.5", "--text", texts["both"],
                        "--calib-tokens", 512, "--json", out["json"], "--report", out["md"], "--plot", out["png"])
    assert code == 0, output
    result = json.loads(out["json"].read_text())
    assert len(result["rows"]) == 7 * 2 and result["speedups"] == [1.5, 2.0]
    assert "first half for calibration" in result["notes"][0] and "disjoint" in result["notes"][1]
    assert all(r["ppl"] > 1 for r in result["rows"])
    assert "| greedy-ppl |" in out["md"].read_text() and out["png"].read_bytes()[:4] == b"\x89PNG"


def test_compare_plans_says_when_calibration_is_evaluation_text(tiny, texts):
    code, output = _run("compare-plans", "--model", tiny, "--speedups", "2", "--text", texts["calib"],
                        "--calib", texts["calib"], "--calib-tokens", 256, "--strategies", "uls,bi")
    assert code == 0, output
    assert "WARNING: calibration and evaluation text are not disjoint" in output


def test_unknown_strategy_is_refused(tiny, texts):
    with pytest.raises(UserError, match="unknown strategy"):
        scoring.layer_plan_for_model(tiny, 2, "random", calib=None)


def test_compare_plans_with_held_out_domains_adds_the_generality_table(tiny, texts, tmp_path):
    """--eval-text per domain: every distinct plan's perplexity per domain, top-1 agreement with the full model
    on its own samples (the tiny model's tokenizer has no chat template: no chat column)."""
    stories = tmp_path / "stories.txt"
    stories.write_text((DATA / "tinystories-valid-excerpt.txt").read_text()[:2000])
    out = tmp_path / "r.json"
    code, output = _run("compare-plans", "--model", tiny, "--speedups", "2", "--text", texts["both"],
                        "--calib-tokens", 256, "--strategies", "uls,even,bi", "--eval-text", texts["eval"],
                        "--eval-text", stories, "--eval-samples", 2, "--json", out)
    assert code == 0, output
    g = json.loads(out.read_text())["generality"]
    assert set(g["rows"]["full"]["perplexity"]) == {"eval", "stories"} and g["sampled_windows"] == 2
    assert g["rows"]["full"]["top1_agreement"] == 1.0 and g["rows"]["full"]["chat_agreement"] is None
    plans = [label for label in g["rows"] if label != "full"]
    assert plans and all(label.endswith(" 2x") for label in plans)
    assert all(0 <= g["rows"][p]["top1_agreement"] <= 1 for p in plans)
    assert "| model | ppl eval | ppl stories | top-1 agreement | greedy agreement | chat agreement |" in output
    bad, message = _run("compare-plans", "--model", tiny, "--text", texts["both"], "--eval-text", stories,
                        "--eval-samples", -1)
    assert bad == 2 and "--eval-samples -1" in message
