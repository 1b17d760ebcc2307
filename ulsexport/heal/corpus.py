"""Training text: files -> documents -> packed fixed-length token windows, streamed and deterministic.

A corpus is a text file, a JSONL file (one document per line, in its `text` field), or a directory
of them (*.txt, *.jsonl, read in sorted order). In text files a document is a paragraph: lines up
to the next blank line. Each document is encoded as BOS + text + EOS, documents are packed end to
end and cut into windows of `seq_len` tokens. Files are read line by line and only a shuffle buffer
of windows is held, so the corpus never sits in memory whole.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..artifact import file_sha256

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise UserError(f"data {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise UserError(f"data directory {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
    return files


def corpus_sha256(files: list[Path]) -> str:
    """The file's sha256, or for several files the sha256 of their names and hashes."""
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from (_jsonl_documents(f, path) if path.suffix in JSONL_SUFFIXES else _paragraphs(f))


def _paragraphs(lines) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_documents(lines, path: Path) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}:{number} is not a JSON object") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{number} has no string 'text' field")
        if text.strip():
            yield text


def packed_windows(tokenizer, files: list[Path], seq_len: int) -> Iterator[list[int]]:
    """One pass over the corpus: BOS+text+EOS per document, packed, cut into `seq_len` windows
    (the last, shorter remainder is dropped)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pending: list[int] = []
    for doc in documents(files):
        pending.extend(bos + tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + eos)
        while len(pending) >= seq_len:
            yield pending[:seq_len]
            del pending[:seq_len]


def check_corpus(tokenizer, files: list[Path], seq_len: int) -> None:
    """Refuse a corpus that gives no full window, reading only as far as the first one."""
    if next(packed_windows(tokenizer, files, seq_len), None) is None:
        raise UserError(f"data {', '.join(map(str, files[:3]))} gives fewer than --seq-len {seq_len} tokens")


def training_windows(tokenizer, files: list[Path], seq_len: int, seed: int = 0,
                     shuffle_buffer: int = 1024, skip: int = 0) -> Iterator[list[int]]:
    """An endless, seeded stream of windows: epoch after epoch, shuffled through a buffer.
    `skip` drops the first windows, so a resumed run sees exactly what it would have seen."""
    rng = random.Random(seed)
    buffer: list[list[int]] = []
    produced = 0
    while True:
        empty_epoch = True
        for window in packed_windows(tokenizer, files, seq_len):
            empty_epoch = False
            if len(buffer) < shuffle_buffer:
                buffer.append(window)
                continue
            i = rng.randrange(shuffle_buffer)
            window, buffer[i] = buffer[i], window
            produced += 1
            if produced > skip:
                yield window
        if empty_epoch:
            raise UserError("the data gives no full window of tokens")


def array_windows(array, seed: int = 0, skip: int = 0) -> Iterator[list[int]]:
    """The rows of a [windows, seq_len] array, endlessly, each epoch in a new seeded order."""
    rng = random.Random(seed)
    produced = 0
    while True:
        order = list(range(len(array)))
        rng.shuffle(order)
        for i in order:
            produced += 1
            if produced > skip:
                yield [int(t) for t in array[i]]


def mixture_windows(streams, weights: list[float], seed: int = 0, skip: int = 0) -> Iterator[list[int]]:
    """Windows from several streams (each a `make(seed, skip=...)`), every window's stream drawn by
    weight from a seeded generator, so the stream is deterministic and `skip` replays it exactly.
    A single stream is that stream itself."""
    if len(streams) == 1:
        yield from streams[0](seed, skip=skip)
        return
    iterators = [make(seed + i, skip=0) for i, make in enumerate(streams)]
    rng = random.Random(f"mixture-{seed}")
    indices = range(len(iterators))
    produced = 0
    while True:
        window = next(iterators[rng.choices(indices, weights)[0]])
        produced += 1
        if produced > skip:
            yield window
