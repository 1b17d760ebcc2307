"""Healing on tiny random Llamas that share kjv16's real tokenizer (vocab 4096)."""
import functools
import itertools
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ulsexport import testing
from conftest import DATA, KJV16, run_cli
from ulsexport.heal import train as heal_module
from ulsexport.heal.corpus import corpus_files, documents, packed_windows, training_windows
from ulsexport.heal import distillation_loss, heal, work_dir
from ulsexport.artifact import read_manifest
from ulsexport.errors import UserError
from ulsexport.tokenizer import load_tokenizer
from ulsexport.prune import plan_for_model, prune_checkpoint

FAST = dict(steps=6, batch=4, seq_len=32, lr=1e-2, save_every=2, quiet=True)
KEEP = [0, 3]


def _tiny_llama_with_kjv_tokenizer(directory, seed=0, vocab=4096):
    testing.make_tiny_checkpoint("llama", directory, num_layers=4, seed=seed, overrides={"vocab_size": vocab})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(KJV16 / name, directory / name)
    return directory


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test of this module on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("heal"))


def make_models(root):
    """A tiny Llama with kjv16's tokenizer, its 2-layer student (layers 0 and 3) and KJV texts under `root`."""
    teacher = _tiny_llama_with_kjv_tokenizer(root / "teacher")
    student = root / "student"
    prune_checkpoint(teacher, student, plan_for_model(teacher, keep=KEEP), quiet=True)
    text = (DATA / "kjv-valid.txt").read_text()
    (root / "train.txt").write_text(text[:20_000])
    (root / "eval.txt").write_text(text[20_000:26_000])
    return {"teacher": teacher, "student": student, "data": root / "train.txt", "eval": root / "eval.txt",
            "root": root}


def _leftovers(out):
    """Anything of a run towards `out` left beside it: temp dirs, the work dir."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", f"{out.name}.")))


def test_corpus_reads_paragraphs_and_jsonl_and_skips_deterministically(models, tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsame paragraph\n\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "id": 4}\n')
    files = corpus_files(tmp_path)
    assert list(documents(files)) == ["first line\nsame paragraph", "second paragraph", "third", "fourth"]
    tokenizer = load_tokenizer(models["student"])
    first = next(packed_windows(tokenizer, files, 4))
    assert first[0] == tokenizer.bos_token_id and len(first) == 4
    stream = list(itertools.islice(training_windows(tokenizer, files, 4, seed=3, shuffle_buffer=5), 15))
    assert list(itertools.islice(training_windows(tokenizer, files, 4, seed=3, shuffle_buffer=5, skip=5), 10)) \
        == stream[5:]
    assert stream != list(itertools.islice(training_windows(tokenizer, files, 4, seed=4, shuffle_buffer=5), 15))


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11), 2.0).item() > 0.01


def test_hidden_state_loss_maps_each_kept_layer_to_the_teacher_layer_it_was():
    teacher = [torch.randn(2, 3, 8) for _ in range(6)]     # embeddings + 5 layers
    kept = [0, 2, 4]
    student = [teacher[0]] + [teacher[k + 1] for k in kept]
    assert heal_module.hidden_state_loss(student, teacher, kept).item() == pytest.approx(0, abs=1e-7)
    shifted = [teacher[0]] + [teacher[k] for k in kept]        # each the layer before: not what it was
    assert heal_module.hidden_state_loss(shifted, teacher, kept).item() > 0.5


def test_hidden_weight_heals_and_is_recorded_and_refused_without_a_teacher(models, tmp_path):
    out = tmp_path / "healed"
    result = heal(models["teacher"], models["student"], models["data"], out, hidden_weight=1.0,
                  teacher_samples=0, **FAST)
    assert result.manifest["healing"]["hidden_weight"] == 1.0 and len(result.losses) == FAST["steps"]
    assert (_kl_to_teacher(out, models["teacher"], models["eval"])
            < _kl_to_teacher(models["student"], models["teacher"], models["eval"]))
    with pytest.raises(UserError, match="needs --loss kd"):
        heal(None, models["student"], models["data"], tmp_path / "lm", loss="lm", hidden_weight=1.0, **FAST)


def _kl_to_teacher(model_dir, teacher_dir, eval_text):
    """Distillation loss of a model against the teacher on the first 256 tokens of `eval_text`."""
    ids = load_tokenizer(model_dir)(eval_text.read_text(), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits for d in (model_dir, teacher_dir)]
    return distillation_loss(*logits, 1.0).item()


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("loss", ["kd", "lm", "kd+lm"])
def test_a_few_steps_lower_the_loss_and_write_a_loadable_checkpoint(models, tmp_path, loss):
    out = tmp_path / "healed"
    # on the user's text alone: the lm term on a random teacher's samples (noise) cannot fall
    result = heal(models["teacher"], models["student"], models["data"], out, loss=loss,
                  eval_text=models["eval"], teacher_samples=0, **FAST)
    assert len(result.losses) == FAST["steps"]
    assert _mean(result.losses[-2:]) < 0.95 * _mean(result.losses[:2]), result.losses
    record = result.manifest["healing"]
    if loss != "lm":
        assert (_kl_to_teacher(out, models["teacher"], models["eval"])
                < _kl_to_teacher(models["student"], models["teacher"], models["eval"]))
    if loss != "kd":
        assert record["perplexity_after"] < record["perplexity_before"]
    assert (record["loss"], record["steps"], record["batch"], record["seq_len"]) == (loss, 6, 4, 32)
    assert len(record["data_sha256"]) == 64 and record["seconds"] > 0
    manifest = read_manifest(out)
    assert manifest["kept"] == KEEP and manifest["healing"] == json.loads(json.dumps(record))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == len(KEEP)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert _leftovers(out) == []


def test_interrupted_run_leaves_a_checkpoint_and_resume_continues_it(models, tmp_path):
    reference = heal(models["teacher"], models["student"], models["data"], tmp_path / "reference", **FAST)

    out = tmp_path / "healed"

    def interrupt_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(models["teacher"], models["student"], models["data"], out, on_step=interrupt_at_3, **FAST)
    assert not out.exists()
    assert _leftovers(out) == [f"{out.name}.work"]
    assert [p.name for p in (work_dir(out) / "checkpoints").iterdir()] == ["step-00000002.pt"]

    refused = run_cli("heal", "--teacher", models["teacher"], "--student", models["student"],
                      "--data", models["data"], "--out", out)
    assert refused.exit_code == 2 and "--resume" in refused.stderr

    seen = []
    resumed = heal(models["teacher"], models["student"], models["data"], out, resume=True,
                   on_step=lambda step, loss: seen.append(step), **FAST)
    assert seen == [3, 4, 5, 6]
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    assert _leftovers(out) == []
    healed, expected = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, tmp_path / "reference"))
    assert all(torch.allclose(healed[k], expected[k], atol=1e-6) for k in expected)


def test_lora_is_merged_into_plain_weights(models, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "healed"
    result = heal(models["teacher"], models["student"], models["data"], out, lora_rank=4, **FAST)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if "lora" in n or "base_model" in n]
    assert (_kl_to_teacher(out, models["teacher"], models["eval"])
            < _kl_to_teacher(models["student"], models["teacher"], models["eval"]))
    assert read_manifest(out)["healing"]["lora_rank"] == 4


def test_cli_heal_and_prune_with_heal_data(models, tmp_path, monkeypatch):
    out = tmp_path / "healed"
    fast = ["--steps", 3, "--batch", 2, "--seq-len", 32, "--device", "cpu"]
    result = run_cli("heal", "--teacher", models["teacher"], "--student", models["student"], "--data",
                     models["data"], "--eval-text", models["eval"], "--out", out, "--loss", "kd+lm", *fast)
    assert result.exit_code == 0, result.output
    assert "before" in result.stdout and read_manifest(out)["healing"]["kd_weight"] == 0.5

    monkeypatch.setattr(heal_module, "heal", functools.partial(heal_module.heal, steps=3, batch=2, seq_len=32))
    pruned_out = tmp_path / "pruned-healed"
    result = run_cli("prune", "--model", models["teacher"], "--keep", "0,3", "--heal-data", models["data"],
                     "--out", pruned_out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["kept"] == KEEP and manifest["healing"]["teacher"] == str(models["teacher"].absolute())
    assert AutoModelForCausalLM.from_pretrained(pruned_out).config.num_hidden_layers == 2
    assert _leftovers(pruned_out) == []


@pytest.fixture(scope="module")
def strangers(models):
    """Teachers that cannot teach the student, and a student with no manifest."""
    root = models["root"]
    other_weights = _tiny_llama_with_kjv_tokenizer(root / "other-weights", seed=1)
    plain = root / "plain-student"
    shutil.copytree(models["student"], plain)
    (plain / "ulsexport.json").unlink()
    (root / "empty.txt").write_text("\n\n")
    (root / "no-text").mkdir()
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    return {"other-vocab": testing.make_tiny_checkpoint("llama", root / "other-vocab", num_layers=4),
            "other-family": testing.make_tiny_checkpoint("mistral", root / "other-family", num_layers=4),
            "other-weights": other_weights, "plain-student": plain}


@pytest.mark.parametrize("case, message", [
    ("missing data", "does not exist"),
    ("empty data", "fewer than --seq-len"),
    ("directory without text", "holds no"),
    ("jsonl without text", "has no string 'text' field"),
    ("other vocabulary", "different vocabularies"),
    ("other family", "one family"),
    ("other weights", "was not pruned from the teacher"),
    ("student without manifest", "no ulsexport.json"),
    ("resume without checkpoint", "no checkpoint"),
    ("bad temperature", "must be positive"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(models, strangers, tmp_path, case, message):
    root = models["root"]
    args = {"--teacher": models["teacher"], "--student": models["student"], "--data": models["data"]}
    extra = []
    if case == "missing data":
        args["--data"] = root / "nope.txt"
    elif case == "empty data":
        args["--data"] = root / "empty.txt"
    elif case == "directory without text":
        args["--data"] = root / "no-text"
    elif case == "jsonl without text":
        args["--data"] = root / "bad.jsonl"
    elif case == "other vocabulary":
        args["--teacher"] = strangers["other-vocab"]
    elif case == "other family":
        args["--teacher"] = strangers["other-family"]
    elif case == "other weights":
        args["--teacher"] = strangers["other-weights"]
    elif case == "student without manifest":
        args["--student"] = strangers["plain-student"]
    elif case == "resume without checkpoint":
        extra = ["--resume"]
    else:
        extra = ["--temperature", "0"]
    out = tmp_path / "healed"
    result = run_cli("heal", *[x for kv in args.items() for x in kv], "--out", out, "--steps", 2, *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_lm_loss_needs_no_teacher_and_no_manifest(models, strangers, tmp_path):
    out = tmp_path / "healed"
    result = heal(None, strangers["plain-student"], models["data"], out, loss="lm", **FAST)
    assert result.manifest["healing"]["teacher"] is None
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_healed_model_exports_to_onnx_and_passes_parity(models, tmp_path):
    from ulsexport.export.trace import export_onnx
    from ulsexport.validate import validate

    healed = heal(models["teacher"], models["student"], models["data"], tmp_path / "healed", **FAST).out_dir
    export = export_onnx(healed, tmp_path / "onnx", quiet=True)
    assert export.manifest["cache_to_original_layer"] == {str(i): layer for i, layer in enumerate(KEEP)}
    assert export.manifest["source_manifest"]["healing"]["steps"] == FAST["steps"]
    report = validate(models["teacher"], export.out_dir, "ort", speed=None, parity_steps=16, quiet=True)
    assert report["parity"]["passed"] and report["parity"]["greedy_tokens_equal"]
    assert report["parity"]["max_relative_error"] < 1e-4 and report["kept"] == KEEP
