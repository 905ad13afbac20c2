"""The manifest of a prepared dataset: what shards exist, what they hold, and which tokenizer made them.

A prepared dataset is a directory (local or s3://) with `manifest.json` and Parquet shards. Each shard
holds documents of one source and one length bucket, one row per document:

    tokens   list<uint16|uint32>   token ids, EOS appended to every document
    length   int32                 len(tokens)
    source   string                the source name (the same in every row of a shard)
    quality  float32, nullable     a per-document quality score when the input had one
    prompt_length  int32, optional the first prompt_length tokens are an instruction prompt (datasets
                                   prepared with prompt=FIELD); the SFT objective does not learn them

manifest.json (format "raytrainer-tokens/1"):

    tokenizer        {"name", "hash", "vocab_size", "eos_id", "pad_id", "fim_prefix_id", ...}
    token_dtype      "uint16" when every id fits (vocab_size <= 65536), else "uint32"
    length_buckets   [{"name": "short", "max_tokens": 512}, ..., {"name": "long", "max_tokens": null}];
                     a document goes to the first bucket whose max_tokens >= its length (EOS included)
    shards           [{"path", "source", "bucket", "num_docs", "num_tokens", "bytes", "sha256"}], paths
                     relative to the dataset directory
    sources          {name: {"docs", "tokens"}}, the sums over that source's shards
    length_histogram {"edges": [1, 2, 4, ...], "counts": [...]}: counts[i] documents have
                     edges[i] <= length < edges[i + 1]
    chars_per_token  characters of text per token, EOS not counted
    validation       (optional) shards of the documents held out for validation, same record format, paths
                     `<source>/validation/shard-NNNNNN.parquet`, bucket "validation"; never in `shards`
    created          ISO-8601 time of writing
    prepare          (optional) what produced it: a fingerprint of the inputs and settings, so a re-run
                     with nothing changed is recognised
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from raytrainer.config import S3Config

FORMAT = "raytrainer-tokens/1"
MANIFEST_NAME = "manifest.json"
TOKEN_DTYPES = ("uint16", "uint32")
TOKENIZER_KEYS = ("name", "hash", "vocab_size", "eos_id", "pad_id")
VALIDATION = "validation"  # the bucket name (and path part) of held-out shards


class DataError(ValueError):
    """A dataset or input problem, phrased for the person who has to fix it: which file, what is wrong,
    what to do."""


# --------------------------------------------------------------------------- length buckets


@dataclass(frozen=True)
class LengthBucket:
    name: str
    max_tokens: int | None  # None: no upper limit (only the last bucket)


DEFAULT_BUCKETS = (LengthBucket("short", 512), LengthBucket("medium", 2048), LengthBucket("long", None))


def parse_buckets(text: str) -> list[LengthBucket]:
    """`short:512,medium:2048,long` -> buckets. The last has no limit; the others need increasing limits."""
    buckets = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        name, _, limit = part.partition(":")
        if not limit:
            buckets.append(LengthBucket(name.strip(), None))
            continue
        try:
            buckets.append(LengthBucket(name.strip(), int(limit)))
        except ValueError:
            raise DataError(f"length bucket {i} {part!r}: limit {limit!r} is not an integer; "
                            "expected e.g. short:512,medium:2048,long") from None
    check_buckets(buckets, where=f"length buckets {text!r}")
    return buckets


def check_buckets(buckets: Sequence[LengthBucket], where: str) -> None:
    names = [b.name for b in buckets]
    if not buckets:
        raise DataError(f"{where}: no length buckets; expected e.g. short:512,medium:2048,long")
    if any(not _safe_name(n) for n in names) or len(set(names)) != len(names):
        raise DataError(f"{where}: bucket names {names} must be distinct and use only letters, digits, _ . -")
    limits = [b.max_tokens for b in buckets]
    if limits[-1] is not None:
        raise DataError(f"{where}: the last bucket ({names[-1]}) must have no limit so every document fits")
    head = limits[:-1]
    if any(x is None or x <= 0 for x in head) or head != sorted(set(head)):
        raise DataError(f"{where}: bucket limits {head} must be positive and strictly increasing")


def bucket_of(lengths: np.ndarray, buckets: Sequence[LengthBucket]) -> np.ndarray:
    """Index of the bucket for each document length (first bucket whose limit is >= the length)."""
    limits = np.array([b.max_tokens for b in buckets[:-1]], dtype=np.int64)
    return np.searchsorted(limits, np.asarray(lengths, dtype=np.int64), side="left")


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "_.-" for c in name)


# --------------------------------------------------------------------------- shards


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


PROMPT_LENGTH = "prompt_length"  # optional column: tokens at the start of a document that are its prompt


def shard_schema(token_dtype: str, with_prompt_length: bool = False) -> pa.Schema:
    schema = pa.schema([
        pa.field("tokens", pa.list_(pa.field("item", pa.from_numpy_dtype(np.dtype(token_dtype))))),
        pa.field("length", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("quality", pa.float32(), nullable=True),
    ])
    return schema.append(pa.field(PROMPT_LENGTH, pa.int32(), nullable=True)) if with_prompt_length else schema


@dataclass(frozen=True)
class ShardRecord:
    path: str  # relative to the dataset directory
    source: str
    bucket: str
    num_docs: int
    num_tokens: int
    bytes: int
    sha256: str


def length_histogram(lengths: np.ndarray) -> dict[str, list[int]]:
    """Power-of-two histogram: counts[i] documents have edges[i] <= length < edges[i + 1]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    top = int(lengths.max()) if lengths.size else 1
    edges = [2**i for i in range(max(1, math.ceil(math.log2(top + 1))) + 1)]
    # Every length is < edges[-1], so np.histogram's closed last bin never matters.
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges, "counts": [int(c) for c in counts]}


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    tokenizer: dict[str, Any]
    token_dtype: str
    length_buckets: list[LengthBucket]
    shards: list[ShardRecord]
    sources: dict[str, dict[str, int]]
    length_histogram: dict[str, list[int]]
    chars_per_token: float
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    prepare: dict[str, Any] | None = None
    format: str = FORMAT
    validation: list[ShardRecord] = field(default_factory=list)

    # ---- derived

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.token_dtype)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def validation_tokens(self) -> int:
        return sum(s.num_tokens for s in self.validation)

    def bucket_names(self) -> list[str]:
        return [b.name for b in self.length_buckets]

    def without_shards(self, paths: Iterable[str]) -> Manifest:
        """A copy without the given shards, per-source totals recomputed (the histogram is left as is)."""
        drop = set(paths)
        shards = [s for s in self.shards if s.path not in drop]
        return replace(self, shards=shards, sources=source_totals(shards, keep=self.sources))

    # ---- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "tokenizer": dict(self.tokenizer),
            "token_dtype": self.token_dtype,
            "length_buckets": [asdict(b) for b in self.length_buckets],
            "shards": [asdict(s) for s in self.shards],
            "sources": {k: dict(v) for k, v in self.sources.items()},
            "length_histogram": dict(self.length_histogram),
            "chars_per_token": self.chars_per_token,
            "created": self.created,
        }
        if self.prepare is not None:
            out["prepare"] = self.prepare
        if self.validation:
            out["validation"] = [asdict(s) for s in self.validation]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; every error names `where` and the key."""
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object at the top level, got {type(raw).__name__}")
        fmt = raw.get("format")
        if fmt != FORMAT:
            raise DataError(
                f"{where}: format {fmt!r} is not {FORMAT!r}; this is not a raytrainer token dataset or was "
                "written by an incompatible version; prepare it again with jobs/prepare_data.py"
            )
        get = _Getter(raw, where)
        try:
            buckets = [LengthBucket(_str(b, "name", where, f"length_buckets[{i}]"),
                                    _opt_int(b, "max_tokens", where, f"length_buckets[{i}]"))
                       for i, b in enumerate(get.list("length_buckets"))]
            shards = _shard_records(get.list("shards"), where, "shards")
            validation = _shard_records(raw.get("validation") or [], where, "validation")
            sources = {
                name: {"docs": _int(v, "docs", where, f"sources.{name}"),
                       "tokens": _int(v, "tokens", where, f"sources.{name}")}
                for name, v in get.dict("sources").items()
            }
            manifest = cls(
                tokenizer=get.dict("tokenizer"),
                token_dtype=get.str("token_dtype"),
                length_buckets=buckets,
                shards=shards,
                sources=sources,
                length_histogram=get.dict("length_histogram"),
                chars_per_token=float(get.number("chars_per_token")),
                created=get.str("created"),
                prepare=raw.get("prepare"),
                validation=validation,
            )
        except (TypeError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({e}); prepare the dataset again") from None
        manifest.validate(where)
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e}); the file is damaged or was cut short — "
                            "prepare the dataset again") from None
        return cls.from_dict(raw, where)

    @classmethod
    def load(cls, dataset: str, s3: S3Config | None = None) -> Manifest:
        """Read `<dataset>/manifest.json` (local directory or s3://bucket/prefix)."""
        from raytrainer.data.fs import open_storage

        storage = open_storage(dataset, s3)
        where = storage.uri(MANIFEST_NAME)
        try:
            data = storage.read_bytes(MANIFEST_NAME)
        except FileNotFoundError:
            raise DataError(f"{where}: not found; is {storage.url} a prepared dataset? Create one with "
                            "`python jobs/prepare_data.py --input NAME=PATH --out DIR` "
                            "(or jobs/make_sample_data.py)") from None
        except OSError as e:
            raise DataError(f"{where}: cannot be read ({e})") from None
        return cls.from_json(data, where)

    def save(self, dataset: str, s3: S3Config | None = None) -> str:
        """Write `<dataset>/manifest.json` in one piece; returns its URL."""
        from raytrainer.data.fs import open_storage, write_committed

        self.validate(f"{dataset}/{MANIFEST_NAME}")
        storage = open_storage(dataset, s3)
        write_committed(storage, MANIFEST_NAME, self.to_json().encode())
        return storage.uri(MANIFEST_NAME)

    # ---- consistency

    def validate(self, where: str = MANIFEST_NAME) -> None:
        """Internal consistency: raise DataError naming `where` and the key that is wrong."""
        tok = self.tokenizer
        missing = [k for k in TOKENIZER_KEYS if k not in tok]
        if missing:
            raise DataError(f"{where}: tokenizer is missing {missing}; prepare the dataset again")
        vocab = tok["vocab_size"]
        if not isinstance(vocab, int) or vocab <= 0:
            raise DataError(f"{where}: tokenizer.vocab_size={vocab!r} must be a positive integer")
        for key, value in tok.items():
            if key.endswith("_id") and not (isinstance(value, int) and 0 <= value < vocab):
                raise DataError(f"{where}: tokenizer.{key}={value!r} must be an id below vocab_size={vocab}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise DataError(f"{where}: token_dtype={self.token_dtype!r} must be one of {TOKEN_DTYPES}")
        if vocab - 1 > np.iinfo(self.token_dtype).max:
            raise DataError(f"{where}: token_dtype={self.token_dtype} cannot hold ids up to {vocab - 1} "
                            f"(vocab_size={vocab}); it must be uint32")
        check_buckets(self.length_buckets, f"{where}: length_buckets")
        names = set(self.bucket_names())
        seen: set[str] = set()
        for i, s in enumerate(self.shards):
            key = f"{where}: shards[{i}] ({s.path})"
            if not s.path.endswith(".parquet") or s.path.startswith("/") or "://" in s.path \
                    or ".." in s.path.split("/") or posixpath.normpath(s.path) != s.path:
                raise DataError(f"{key}: path must be a relative path to a .parquet file inside the dataset")
            if s.path in seen:
                raise DataError(f"{key}: listed twice")
            seen.add(s.path)
            if s.bucket not in names:
                raise DataError(f"{key}: bucket {s.bucket!r} is not one of length_buckets {sorted(names)}")
            if s.source not in self.sources:
                raise DataError(f"{key}: source {s.source!r} is missing from sources {sorted(self.sources)}")
            if min(s.num_docs, s.num_tokens, s.bytes) < 0 or s.num_tokens < s.num_docs:
                raise DataError(f"{key}: counts num_docs={s.num_docs} num_tokens={s.num_tokens} "
                                f"bytes={s.bytes} must be non-negative with num_tokens >= num_docs")
        for i, s in enumerate(self.validation):
            key = f"{where}: validation[{i}] ({s.path})"
            if s.path in seen or not s.path.endswith(".parquet") or posixpath.normpath(s.path) != s.path \
                    or s.path.startswith("/") or ".." in s.path.split("/") or "://" in s.path:
                raise DataError(f"{key}: path must be a relative .parquet path inside the dataset, not also a "
                                "training shard")
            seen.add(s.path)
            if s.bucket != VALIDATION:
                raise DataError(f"{key}: bucket {s.bucket!r} must be {VALIDATION!r}")
        totals = source_totals(self.shards, keep=self.sources)
        if totals != self.sources:
            raise DataError(f"{where}: sources {self.sources} do not match the sums over shards {totals}")
        hist = self.length_histogram
        edges, counts = hist.get("edges"), hist.get("counts")
        if not isinstance(edges, list) or not isinstance(counts, list) or len(counts) != len(edges) - 1:
            raise DataError(f"{where}: length_histogram needs lists edges (n+1) and counts (n), got {hist}")
        if not (isinstance(self.chars_per_token, float) and self.chars_per_token >= 0):
            raise DataError(f"{where}: chars_per_token={self.chars_per_token!r} must be a number >= 0")


def source_totals(shards: Iterable[ShardRecord], keep: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """{source: {"docs", "tokens"}} summed over shards; sources named in `keep` stay, with zeros if empty."""
    totals: dict[str, dict[str, int]] = {name: {"docs": 0, "tokens": 0} for name in keep}
    for s in shards:
        t = totals.setdefault(s.source, {"docs": 0, "tokens": 0})
        t["docs"] += s.num_docs
        t["tokens"] += s.num_tokens
    return dict(sorted(totals.items()))


# --------------------------------------------------------------------------- strict field access


class _Getter:
    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def _get(self, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        if key not in self.raw:
            raise DataError(f"{self.where}: key {key!r} is missing; prepare the dataset again")
        value = self.raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{self.where}: key {key!r} = {_short(value)} must be {what}")
        return value

    def list(self, key: str) -> list:
        return self._get(key, list, "a list")

    def dict(self, key: str) -> dict:
        return self._get(key, dict, "an object")

    def str(self, key: str) -> str:
        return self._get(key, str, "a string")

    def number(self, key: str) -> float:
        return self._get(key, (int, float), "a number")


def _shard_records(items: Any, where: str, key: str) -> list[ShardRecord]:
    if not isinstance(items, list):
        raise DataError(f"{where}: {key} must be a list of shard records, got {type(items).__name__}")
    return [
        ShardRecord(
            path=_str(s, "path", where, f"{key}[{i}]"),
            source=_str(s, "source", where, f"{key}[{i}]"),
            bucket=_str(s, "bucket", where, f"{key}[{i}]"),
            num_docs=_int(s, "num_docs", where, f"{key}[{i}]"),
            num_tokens=_int(s, "num_tokens", where, f"{key}[{i}]"),
            bytes=_int(s, "bytes", where, f"{key}[{i}]"),
            sha256=_str(s, "sha256", where, f"{key}[{i}]"),
        )
        for i, s in enumerate(items)
    ]


def _field(obj: Any, key: str, where: str, parent: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {parent} = {_short(obj)} must be an object")
    if key not in obj:
        raise DataError(f"{where}: {parent}.{key} is missing")
    return obj[key]


def _int(obj: Any, key: str, where: str, parent: str) -> int:
    value = _field(obj, key, where, parent)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: {parent}.{key} = {_short(value)} must be an integer")
    return value


def _opt_int(obj: Any, key: str, where: str, parent: str) -> int | None:
    return None if _field(obj, key, where, parent) is None else _int(obj, key, where, parent)


def _str(obj: Any, key: str, where: str, parent: str) -> str:
    value = _field(obj, key, where, parent)
    if not isinstance(value, str):
        raise DataError(f"{where}: {parent}.{key} = {_short(value)} must be a string")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
