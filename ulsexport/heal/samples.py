"""Text the teacher writes: token windows sampled from the original model, to heal on beside the user's text.

Healing on one narrow text teaches that text and loses the rest (measured on SmolLM2-135M-Instruct:
3-4.6x worse perplexity on other domains, chat answers gone). Windows the teacher samples carry its
general behaviour back into the student ("self-data distillation"). Three kinds, in equal shares:
- `unconditional`: from BOS alone, at temperature 1: what the model writes with no prompt;
- `continuation`: the first tokens of one of the user's documents, continued by the teacher;
- `chat`: where the tokenizer has a chat template, a dialogue: the user turn is a sentence of the
  user's text (every other one) or written by the teacher itself, then the teacher answers and goes on.
Sampling never stops at EOS (the teacher goes on as after any document end), so every window is
full. Samples are generated in batches on the teacher's device (`gpu_rows` rows at once on a GPU, 32 on
the CPU; each batch from its own seeded generator, so the samples do not depend on how many processes make
them: healing over several ranks shares the batches out, `distributed.py`) and cached as an int32 array under
`$XDG_CACHE_HOME/ulsexport/teacher-samples/<key>.npy` (the key covers the teacher's config and
weights' sizes, the data, the count, the length, the temperature and the seed), written whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..models import continue_prompts
from ..progress import progress_bar
from . import distributed
from .corpus import documents
from .distributed import World

KINDS = ("unconditional", "continuation", "chat")
PROMPT_TOKENS = 32       # tokens of a user document a continuation starts from
_PLACEHOLDER = "\x00ULSEXPORT\x00"


CPU_ROWS = 32            # rows sampled at once on the CPU
MAX_GPU_ROWS = 2048      # and at most on a GPU, where the KV cache's size decides (`gpu_rows`)
KV_BUDGET_SHARE = 0.25   # of the GPU's memory, for the sampling batch's KV cache
KV_BUDGET_MAX = 16 * 2 ** 30


@dataclass(frozen=True)
class SampleSettings:
    count: int
    seq_len: int
    temperature: float = 1.0
    seed: int = 0
    batch: int | None = None   # rows sampled at once (None: 32 on the CPU, `gpu_rows` on a GPU)

    def rows_at_once(self, device, model=None) -> int:
        """`batch`, else 32 on the CPU, else `gpu_rows` for `model` on the card of `device`."""
        if self.batch:
            return self.batch
        if not str(device).startswith("cuda"):
            return CPU_ROWS
        if model is None:
            raise ValueError("rows_at_once on a GPU needs the model (its KV cache sizes the batch)")
        import torch

        return gpu_rows(model.config, self.seq_len, torch.cuda.get_device_properties(device).total_memory,
                        next(model.parameters()).element_size())

    def record(self) -> dict:
        return {"count": self.count, "seq_len": self.seq_len, "temperature": self.temperature, "seed": self.seed}


def gpu_rows(config, seq_len: int, gpu_bytes: int, dtype_bytes: int) -> int:
    """How many rows to sample at once on a GPU of `gpu_bytes`: as many as keep the batch's KV cache and its
    logits within a quarter of the card (at most 16 GiB), a power of two from 1 to 2048. The cache is counted
    at 1.5 x seq_len, as prompts are left-padded to the longest; the logits at 16 bytes a vocabulary entry (the
    copies sampling makes). A function of the model, its dtype and the card, not of the memory free at the
    time, so a run (and every rank of it) on the same card and dtype makes the same batches, and the same
    samples. SmolLM2-135M at 256 tokens in bf16: 1024 rows on an 80 GB card; a 7B Llama with 32 key/value
    heads: 64, where a fixed 512 rows needed 64 GiB of cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    length = seq_len + seq_len // 2
    per_row = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes * length + 16 * text.vocab_size
    budget = min(KV_BUDGET_SHARE * gpu_bytes, KV_BUDGET_MAX)
    rows = max(1, min(MAX_GPU_ROWS, int(budget // per_row)))
    return 1 << (rows.bit_length() - 1)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ulsexport" / "teacher-samples"


def cache_key(teacher_dir: Path, data_sha256: str | None, settings: SampleSettings) -> str:
    digest = hashlib.sha256()
    digest.update((Path(teacher_dir) / "config.json").read_bytes())
    for weights in sorted(Path(teacher_dir).glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps({"data": data_sha256, **settings.record(), "kinds": KINDS,
                              "prompt_tokens": PROMPT_TOKENS}, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def teacher_samples(teacher, tokenizer, teacher_dir: Path, files: list[Path] | None, data_sha256: str | None,
                    settings: SampleSettings, quiet: bool = False, world: World = World()):
    """(int32 array [count, seq_len], record for the manifest): cached, else sampled now (by every rank, a
    share each; the leader writes the cache)."""
    import numpy as np

    key = cache_key(teacher_dir, data_sha256, settings)
    path = cache_root() / f"{key}.npy"
    record = {**settings.record(), "cache": str(path), "kinds": list(_kinds(tokenizer) if files else KINDS[:1])}
    array = None
    if world.leader:
        try:
            array = np.load(path) if path.is_file() else None
        except (OSError, ValueError):  # a cache file cut short: made again below
            array = None
        if array is not None and array.shape != (settings.count, settings.seq_len):
            array = None
    array = distributed.broadcast_object(world, array)
    if array is not None:
        return array, {**record, "cached": True}
    started = time.perf_counter()
    prompts = _prompts(tokenizer, files, settings)
    rows, at_once = _sample_all(teacher, prompts, settings, quiet, world)
    array = np.asarray(rows, dtype=np.int32)
    record["rows_at_once"] = at_once   # the batching the samples were drawn in (they differ with it)
    if not world.leader:
        return array, {**record, "cached": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return array, {**record, "cached": False, "seconds": round(time.perf_counter() - started, 2)}


def _kinds(tokenizer) -> tuple[str, ...]:
    return KINDS if getattr(tokenizer, "chat_template", None) else KINDS[:2]


def _prompts(tokenizer, files, settings: SampleSettings) -> list[list[int]]:
    """One prompt per sample, kinds in turn, from the user's documents where a kind needs them."""
    rng = random.Random(settings.seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [tokenizer.eos_token_id]
    if bos == [None]:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start teacher samples from")
    texts = _user_texts(files, settings.count, rng) if files else []
    kinds = _kinds(tokenizer)
    prompts = []
    for i in range(settings.count):
        kind = kinds[i % len(kinds)] if texts else "unconditional"
        text = texts[i % len(texts)] if texts else ""
        if kind == "continuation":
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:PROMPT_TOKENS]
            prompts.append(bos + ids)
        elif kind == "chat":
            prompts.append(_chat_prompt(tokenizer, _first_sentence(text) if i % 2 else None))
        else:
            prompts.append(list(bos))
    return [p[: settings.seq_len // 2] for p in prompts]


def _user_texts(files, count: int, rng: random.Random, pool: int = 20000) -> list[str]:
    """Up to `count` documents drawn from the first `pool` of the user's data (reservoir sampling)."""
    chosen: list[str] = []
    for n, doc in enumerate(documents(files)):
        if n >= pool:
            break
        if len(chosen) < count:
            chosen.append(doc)
        else:
            j = rng.randrange(n + 1)
            if j < count:
                chosen[j] = doc
    rng.shuffle(chosen)
    return chosen


def _first_sentence(text: str, limit: int = 300) -> str:
    end = min((i for i in (text.find(". "), text.find("? "), text.find("\n")) if i > 0), default=len(text))
    return text[: min(end + 1, limit)].strip()


def _chat_prompt(tokenizer, user_text: str | None) -> list[int]:
    """A dialogue's opening: the template up to the assistant's turn for `user_text`, or, for None,
    up to where the user's words begin (the teacher writes the question as well)."""
    if user_text:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=False).split(_PLACEHOLDER)[0]
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _sample_all(model, prompts: list[list[int]], settings: SampleSettings, quiet: bool,
                world: World = World()) -> tuple[list[list[int]], int]:
    """Every prompt continued to seq_len tokens, a batch at a time; with several ranks, batch i is made by
    rank i % size (all ranks step together: a sharded teacher's forward passes are collective) and the
    rows are gathered on every rank, in prompt order. Also returns the rows sampled at once."""
    import torch

    device = next(model.parameters()).device
    step = int(-distributed.maximum(world, -settings.rows_at_once(device, model)))   # the least card's, on all ranks
    starts = list(range(0, len(prompts), step))
    mine = starts[world.rank::world.size]
    rounds = -(-len(starts) // world.size)
    rows: list[tuple[int, list[int]]] = []
    with progress_bar(len(prompts), "teacher samples", unit="seq", quiet=quiet) as bar:
        for r in range(rounds):
            start = mine[r] if r < len(mine) else None     # None: this rank has no batch left this round
            chunk = prompts[start:start + step] if start is not None else prompts[:1]
            need = settings.seq_len - min(len(p) for p in chunk)
            new_tokens = int(distributed.maximum(world, need))
            generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + (start or 0))
            new = continue_prompts(model, chunk, new_tokens, settings.temperature, generator)
            if start is not None:
                rows.extend((start + i, (p + g)[:settings.seq_len]) for i, (p, g) in enumerate(zip(chunk, new)))
            bar.update(min(len(prompts), (r + 1) * step * world.size) - bar.n)
    return [row for _, row in sorted(distributed.gather_rows(world, rows))], step
