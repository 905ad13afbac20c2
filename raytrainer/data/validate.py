"""Check a prepared dataset before training starts, so a bad shard fails in seconds, not at step 40,000.

    report = validate_dataset("data/sample", tokenizer_identity=load_tokenizer("byte").identity())
    report.manifest          # the manifest, without the shards that were skipped
    report.skipped           # [SkippedShard(path, reason)] when on_bad_shard="skip"

Checked: the manifest (readable, right format, consistent), the tokenizer it was made with against the
configured one, and every shard: present, the recorded size, readable Parquet with the shard schema,
non-empty, row and token counts as recorded, one source, every document ending in EOS, every id below
vocab_size, and optionally the sha256. With on_bad_shard="fail" any bad shard raises a DataError listing
every bad shard; with "skip" bad shards are logged, counted and left out of the returned manifest.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrainer.config import DataConfig, S3Config
from raytrainer.data.fs import Storage, open_storage
from raytrainer.data.manifest import PROMPT_LENGTH, DataError, Manifest, ShardRecord, shard_schema

log = logging.getLogger(__name__)

FIX_HINT = ("re-run jobs/prepare_data.py with the same inputs and --out (finished shards are kept), or set "
            "data.on_bad_shard=skip to train without the bad shards")


@dataclass(frozen=True)
class SkippedShard:
    path: str
    reason: str


@dataclass
class ValidationReport:
    manifest: Manifest  # bad shards removed when on_bad_shard="skip"
    checked: int
    skipped: list[SkippedShard] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped


def validate_dataset(
    path: str,
    tokenizer_identity: dict[str, Any] | None = None,
    on_bad_shard: Literal["fail", "skip"] = "fail",
    *,
    check_sha256: bool = False,
    read_tokens: bool = True,
    model_vocab_size: int | None = None,
    s3: S3Config | None = None,
    max_workers: int = 8,
) -> ValidationReport:
    """Validate the dataset at `path` (local or s3://). read_tokens=False checks only sizes and Parquet
    metadata (no token data is read); check_sha256=True also hashes every shard."""
    if on_bad_shard not in ("fail", "skip"):
        raise ValueError(f"on_bad_shard={on_bad_shard!r} must be 'fail' or 'skip'")
    manifest = Manifest.load(path, s3)
    storage = open_storage(path, s3)
    if tokenizer_identity is not None:
        check_tokenizer(manifest.tokenizer, tokenizer_identity, storage.url)
    if model_vocab_size is not None and manifest.vocab_size > model_vocab_size:
        raise DataError(f"dataset {storage.url} uses token ids up to {manifest.vocab_size - 1} "
                        f"(tokenizer {manifest.tokenizer['name']}, vocab_size {manifest.vocab_size}) but "
                        f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {manifest.vocab_size}")
    if not manifest.shards:
        raise DataError(f"dataset {storage.url}: the manifest lists no shards; prepare it again with inputs "
                        "that contain text")

    def check(record: ShardRecord) -> tuple[ShardRecord, str | None]:
        problem = check_shard(storage, record, manifest, check_sha256=check_sha256, read_tokens=read_tokens)
        return record, problem

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(manifest.shards)))) as pool:
        results = list(pool.map(check, manifest.shards))
    bad = [SkippedShard(r.path, problem) for r, problem in results if problem is not None]
    if bad and on_bad_shard == "fail":
        lines = "\n".join(f"  {storage.uri(b.path)}: {b.reason}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"dataset {storage.url}: {len(bad)} of {len(manifest.shards)} shard(s) are bad:\n"
                        f"{lines}{more}\nTo fix: {FIX_HINT}")
    for b in bad:
        log.warning("skipping shard %s: %s", storage.uri(b.path), b.reason)
    if bad:
        log.warning("skipped %d of %d shards of %s", len(bad), len(manifest.shards), storage.url)
        if len(bad) == len(manifest.shards):
            raise DataError(f"dataset {storage.url}: every shard is bad (first: {bad[0].path}: "
                            f"{bad[0].reason}); nothing is left to train on. To fix: {FIX_HINT}")
        manifest = manifest.without_shards(b.path for b in bad)
    return ValidationReport(manifest=manifest, checked=len(results), skipped=bad)


def validate_data_config(data: DataConfig, model_vocab_size: int | None = None, **kwargs: Any
                         ) -> ValidationReport:
    """validate_dataset for a config: its path, tokenizer, on_bad_shard and S3 settings."""
    from raytrainer.data.tokenizers import load_tokenizer

    return validate_dataset(data.path, load_tokenizer(data.tokenizer).identity(), data.on_bad_shard,
                            model_vocab_size=model_vocab_size, s3=data.s3, **kwargs)


def check_tokenizer(recorded: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Same tokenizer means same hash (files and special ids) and same vocab_size; names are only labels."""
    same = ("hash", "vocab_size")
    if all(recorded.get(k) == expected.get(k) for k in same):
        return
    raise DataError(
        f"dataset {where} was tokenised with {_describe(recorded)}, but the configured tokenizer is "
        f"{_describe(expected)}; token ids would mean different things. Set data.tokenizer to the "
        f"dataset's tokenizer ({recorded.get('name')}), or prepare the data again with --tokenizer "
        f"{expected.get('name')}"
    )


def _describe(identity: dict[str, Any]) -> str:
    digest = str(identity.get("hash", "?"))
    return f"{identity.get('name', '?')} (hash {digest[:12]}, vocab_size {identity.get('vocab_size', '?')})"


def check_shard(storage: Storage, record: ShardRecord, manifest: Manifest, *, check_sha256: bool = False,
                read_tokens: bool = True) -> str | None:
    """The problem with one shard in words, or None when it is good."""
    try:
        return _check_shard(storage, record, manifest, check_sha256, read_tokens)
    except FileNotFoundError:
        return "missing (listed in the manifest but not found)"
    except (OSError, pa.ArrowException) as e:
        return f"cannot be read ({type(e).__name__}: {e})"


def _check_shard(storage: Storage, record: ShardRecord, manifest: Manifest, check_sha256: bool,
                 read_tokens: bool) -> str | None:
    size = storage.size(record.path)
    if size is None:
        return "missing (listed in the manifest but not found)"
    if size != record.bytes:
        return f"{size} bytes, but the manifest records {record.bytes} (truncated or replaced)"
    if check_sha256:
        digest = storage.hash_file(record.path)[1]
        if digest != record.sha256:
            return f"sha256 {digest[:16]}... differs from the manifest's {record.sha256[:16]}... (corrupted)"
    try:
        pf = pq.ParquetFile(storage.fs.open_input_file(storage.path(record.path)))
    except (OSError, pa.ArrowException) as e:
        return f"not a readable Parquet file ({e})"
    problem = _schema_problem(pf.schema_arrow, manifest.token_dtype)
    if problem:
        return problem
    rows = pf.metadata.num_rows
    if rows == 0:
        return "empty (no documents)"
    if rows != record.num_docs:
        return f"{rows} documents, but the manifest records {record.num_docs}"
    if not read_tokens:
        return None
    has_prompts = PROMPT_LENGTH in pf.schema_arrow.names
    table = pf.read(columns=["tokens", "length", "source"] + ([PROMPT_LENGTH] if has_prompts else []))
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.flatten()
    if len(flat) != record.num_tokens:
        return f"{len(flat)} tokens, but the manifest records {record.num_tokens}"
    lengths = table.column("length").to_numpy()
    if not np.array_equal(lengths, pc.list_value_length(tokens).to_numpy(zero_copy_only=False)):
        return "column 'length' disagrees with the number of tokens in some rows"
    if len(flat):
        top = pc.max(flat).as_py()
        if top >= manifest.vocab_size:
            return (f"token id {top} >= vocab_size {manifest.vocab_size} of tokenizer "
                    f"{manifest.tokenizer['name']} (shard made by another tokenizer, or corrupted)")
    ends = np.cumsum(lengths) - 1
    eos = manifest.tokenizer["eos_id"]
    if (lengths <= 0).any() or not (flat.to_numpy()[ends] == eos).all():
        return f"some documents do not end with EOS (id {eos})"
    if has_prompts:
        prompts = table.column(PROMPT_LENGTH).fill_null(0).to_numpy()
        if (prompts < 0).any() or (prompts >= lengths).any():
            row = int(np.flatnonzero((prompts < 0) | (prompts >= lengths))[0])
            return (f"row {row}: prompt_length {int(prompts[row])} is outside [0, {int(lengths[row]) - 1}] "
                    "(a prompt must leave at least the EOS to learn)")
    sources = pc.unique(table.column("source")).to_pylist()
    if sources != [record.source]:
        return f"column 'source' holds {sources[:5]}, but the manifest says this shard is {record.source!r}"
    return None


def _schema_problem(schema: pa.Schema, token_dtype: str) -> str | None:
    expected = shard_schema(token_dtype)
    if PROMPT_LENGTH in schema.names:
        expected = shard_schema(token_dtype, with_prompt_length=True)
    for want in expected:
        if want.name not in schema.names:
            return (f"wrong schema: no column {want.name!r} (columns: {schema.names}); "
                    f"expected {_fmt(expected)}")
        got = schema.field(want.name).type
        if pa.types.is_list(want.type):
            is_list = pa.types.is_list(got) or pa.types.is_large_list(got)
            ok = is_list and got.value_type == want.type.value_type
        else:
            ok = got == want.type
        if not ok:
            return (f"wrong schema: column {want.name!r} is {_type(got)}, expected {_type(want.type)} "
                    f"(manifest token_dtype={token_dtype})")
    return None


def _type(t: pa.DataType) -> str:
    # Without the list's item name, which Parquet renames ("item" vs "element").
    return f"list<{t.value_type}>" if pa.types.is_list(t) or pa.types.is_large_list(t) else str(t)


def _fmt(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {_type(f.type)}" for f in schema)
