"""The tokenizer without transformers (tokenizer.json through `tokenizers`): what the Triton generate
model uses in a stub environment of numpy < 2 answers as transformers' AutoTokenizer does."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import KJV16, STORIES

from ulsexport.errors import UserError
from ulsexport.testing import save_word_tokenizer
from ulsexport.tokenizer import JsonTokenizer, load_tokenizer

TEXTS = ["In the beginning God created the heaven and the earth.", "t1 t5 t7 t2 t49", "  two  spaces\n\nand lines",
         "", "unknown wörds, ünïcode and 1234 digits"]


@pytest.fixture(params=["kjv16", "word"])
def folder(request, tmp_path):
    if request.param == "kjv16":
        return KJV16
    save_word_tokenizer(tmp_path, 50)
    return tmp_path


def test_json_tokenizer_answers_as_transformers_does(folder):
    reference, light = load_tokenizer(folder), JsonTokenizer(folder)
    assert type(reference).__name__ != "JsonTokenizer"
    assert len(light) == len(reference) and light.get_vocab() == reference.get_vocab()
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(light, f"{role}_token_id") == getattr(reference, f"{role}_token_id"), role
    for text in TEXTS:
        ids = reference(text).input_ids
        assert light(text).input_ids == ids, text
        for skip in (True, False):
            assert light.decode(ids + [2, 1], skip_special_tokens=skip) == \
                reference.decode(ids + [2, 1], skip_special_tokens=skip), (text, skip)


def test_without_transformers_the_json_tokenizer_is_loaded(folder, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers"
                        else find_spec(name, *a))
    assert isinstance(load_tokenizer(folder), JsonTokenizer)


def test_json_tokenizer_refusals(tmp_path):
    with pytest.raises(UserError, match="only a tokenizer.json can be read"):
        JsonTokenizer(STORIES)  # SentencePiece only: transformers converts it
    shutil.copy2(KJV16 / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    with pytest.raises(UserError, match="add_bos_token .* only transformers applies"):
        JsonTokenizer(tmp_path)


def test_a_text_longer_than_the_models_positions_draws_no_warning():
    """ulsexport tokenizes whole texts and windows them itself: transformers' 'Token indices sequence length is
    longer than the specified maximum' warning would only be noise in `ulsexport run`'s output."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ids = load_tokenizer(STORIES)("Once upon a time " * 400)["input_ids"]
    finally:
        logger.removeHandler(handler)
    assert len(ids) > 512
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]
