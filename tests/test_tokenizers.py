"""Tokenizers: ids per the contract, round trips, special tokens, identities, offline loading."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from raytrainer.data.manifest import DataError
from raytrainer.data.tokenizers import SPECIAL_ROLES, load_tokenizer

TEXTS = ["Hello world", "", "héllo wörld — ünïcode ✓ 日本語", "def f(x):\n    return x + 1\n", "  spaces\t\n"]


def _special_ids(tok) -> list[int]:
    return [getattr(tok, f"{role}_id") for role in SPECIAL_ROLES]


def test_byte_ids_follow_the_contract():
    tok = load_tokenizer("byte")
    assert tok.vocab_size == 262
    assert _special_ids(tok) == [256, 257, 258, 259, 260, 261]
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.decode([72, 105, 256]) == "Hi<|endoftext|>"


@pytest.mark.parametrize("spec", ["byte", "gpt2"])
def test_round_trip_and_batch_agree(spec):
    tok = load_tokenizer(spec)
    batch = tok.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, batch, strict=True):
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    flat, lengths = tok.encode_flat(TEXTS)
    assert lengths.tolist() == [len(x) for x in batch]
    assert flat.dtype == np.uint32 and flat.tolist() == [i for ids in batch for i in ids]


def test_gpt2_known_ids_and_specials():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256  # GPT-2's own <|endoftext|> is kept
    ids = _special_ids(tok)
    assert len(set(ids)) == len(ids) and max(ids) < tok.vocab_size
    assert tok.vocab_size == 50257 + len(SPECIAL_ROLES) - 1  # the five GPT-2 lacks are appended


@pytest.mark.parametrize("spec", ["byte", "gpt2"])
def test_special_token_text_is_plain_text(spec):
    tok = load_tokenizer(spec)
    ids = tok.encode("a<|endoftext|>b<|pad|>")
    assert not set(ids) & set(_special_ids(tok))
    assert tok.decode(ids) == "a<|endoftext|>b<|pad|>"


def test_identity_names_hash_and_vocab():
    byte, gpt2 = load_tokenizer("byte").identity(), load_tokenizer("gpt2").identity()
    for ident in (byte, gpt2):
        assert {"name", "hash", "vocab_size", "eos_id", "pad_id", "mask_id"} <= set(ident)
        assert len(ident["hash"]) == 64
    assert byte["name"] == "byte" and gpt2["name"] == "gpt2"
    assert byte["hash"] != gpt2["hash"]
    assert load_tokenizer("gpt2").identity() == gpt2  # stable across loads


def _train_hf(path, specials: list[str]) -> str:
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "hello there", "the world is round", "def hello(): pass"] * 5,
                            trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json_reuses_and_appends_specials(tmp_path):
    path = _train_hf(tmp_path / "tokenizer.json", ["</s>", "<pad>"])
    tok = load_tokenizer(path)
    base = HFTok.from_file(path).get_vocab_size()
    assert tok.eos_id == HFTok.from_file(path).token_to_id("</s>")
    assert tok.pad_id == HFTok.from_file(path).token_to_id("<pad>")
    ids = _special_ids(tok)
    assert len(set(ids)) == 6 and max(ids) == tok.vocab_size - 1
    assert tok.vocab_size == base + 4  # fim x3 and mask appended
    for text in ["hello world", "the round world", "naïve text"]:
        assert tok.decode(tok.encode(text)) == text
    assert load_tokenizer(str(tmp_path)).identity() == tok.identity()  # a directory holding tokenizer.json


def llama3_format_tokenizer(path, base: int = 128_000, specials: int = 256) -> str:
    """A tokenizer.json shaped like Llama 3's: a byte-level BPE of `base` tokens, then `specials` special tokens
    (<|begin_of_text|>, <|end_of_text|>, and <|reserved_special_token_N|> for the rest): 128,256 in all."""
    from tokenizers import AddedToken

    from raytrainer.hf.tokenizer_files import byte_level_bytes_to_unicode

    vocab = {char: i for i, char in enumerate(byte_level_bytes_to_unicode().values())}
    vocab.update({f"tok{i}": i for i in range(len(vocab), base)})
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{n}|>" for n in range(specials - 2))]
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    tok.save(str(path))
    return str(path)


def test_a_llama3_format_tokenizer_keeps_its_published_vocab_and_fits_the_llama_presets(tmp_path):
    from raytrainer.cli import main as cli
    from raytrainer.config import load_config
    from raytrainer.data.validate import validate_data_config

    path = llama3_format_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    raw = HFTok.from_file(path)
    assert tok.vocab_size == 128_256  # nothing appended
    assert tok.eos_id == raw.token_to_id("<|end_of_text|>")
    assert [tok.pad_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.mask_id] == [
        raw.token_to_id(f"<|reserved_special_token_{n}|>") for n in range(5)]
    text = tmp_path / "docs.txt"
    text.write_text("hello world, said the tokenizer\n" * 200)
    out = tmp_path / "data"
    assert cli(["prepare", "--input", f"web={text}", "--out", str(out), "--tokenizer", path, "--local"]) == 0
    for preset in ("llama-1b", "llama-8b"):  # as shipped: model.vocab_size=128256
        cfg = load_config(preset, [f"data.path={out}", f"data.tokenizer={path}"])
        assert cfg.model.vocab_size == 128_256
        validate_data_config(cfg.data, model_vocab_size=cfg.model.vocab_size)


def test_hf_identity_hash_follows_the_file(tmp_path):
    a = load_tokenizer(_train_hf(tmp_path / "a.json", ["</s>"]))
    b = load_tokenizer(_train_hf(tmp_path / "b.json", ["</s>", "<mask>"]))
    assert a.identity()["hash"] != b.identity()["hash"]
    assert a.identity()["name"] == "a.json"


def test_tiktoken_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "x.tiktoken"
    path.write_text("aGVsbG8= 0\n")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"x\.tiktoken.*pip install tiktoken"):
        load_tokenizer(str(path))


def test_unknown_spec_and_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="'bpe50k' is not known"):
        load_tokenizer("bpe50k")
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match=str(missing)):
        load_tokenizer(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))
