"""Tokenizer files `AutoTokenizer.from_pretrained` loads: tokenizer.json, tokenizer_config.json and
special_tokens_map.json, with the special tokens the model was trained with at the ids it knows them by.

The byte tokenizer becomes a byte-level BPE without merges (each byte one token, id = byte value), the gpt2
and tokenizer.json ones are written with the special tokens raytrainer added to them. One difference stays:
raytrainer reads a special token's spelling inside text as plain text, HF tokenizers read it as the token.
"""

from __future__ import annotations

import json
from pathlib import Path

from raytrainer.data.tokenizers import APPENDED_NAMES, SPECIAL_ROLES, ByteTokenizer, HFTokenizer, Tokenizer


def byte_level_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet HF's ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer_json() -> str:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {char: byte for byte, char in byte_level_bytes_to_unicode().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added in role order, they take ids 256.. exactly as ByteTokenizer numbers them.
    tok.add_special_tokens([AddedToken(APPENDED_NAMES[role], special=True, normalized=False)
                            for role in SPECIAL_ROLES])
    return tok.to_str()


def tokenizer_json(tokenizer: Tokenizer) -> str | None:
    """The tokenizer as an HF tokenizer.json, specials included; None when it has no HF form (tiktoken)."""
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_tokenizer_json()
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer._tok.to_str()
    return None


def special_tokens(tokenizer: Tokenizer, tokenizer_file: str) -> dict[str, str]:
    """Role -> the token's spelling, read from the written tokenizer.json (the ids are the tokenizer's)."""
    from tokenizers import Tokenizer as HFTok

    written = HFTok.from_str(tokenizer_file)
    return {role: written.id_to_token(getattr(tokenizer, f"{role}_id")) for role in SPECIAL_ROLES}


def write_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int) -> list[str]:
    """Write the tokenizer files into `out`; returns their names ([] when the tokenizer has no HF form)."""
    text = tokenizer_json(tokenizer)
    if text is None:
        return []
    names = special_tokens(tokenizer, text)
    extra = [names[r] for r in SPECIAL_ROLES if r not in ("eos", "pad", "mask")]
    special_map = {"eos_token": names["eos"], "pad_token": names["pad"], "mask_token": names["mask"],
                   "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special_map,
    }
    (out / "tokenizer.json").write_text(text)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
