"""Tokenise inputs into Parquet shards plus manifest.json (see manifest.py for the format).

    prepare_dataset([InputSpec("data/raw/web/*.jsonl", "web")], "data/web", tokenizer="gpt2")

How it runs: the input files are listed and sorted, grouped into units of work, and tokenised in
parallel by Ray Data (`from_items` over the units, `map_batches` with a callable class, so each worker
builds the tokenizer once). Results come back in input order; the driver appends them to one buffer per
(source, length bucket) and cuts a shard whenever a buffer holds `shard_tokens` tokens. The shards are
therefore a function of the inputs and settings alone.

Restarts: every shard is committed whole (temporary name, then rename; an S3 PUT is atomic) and recorded
in `_prepare_state.json`. A re-run recomputes the shards and keeps every existing one whose bytes hash
the same, so files already finished are not rewritten; leftover temporary files are removed. When the
manifest already describes the same inputs and settings, nothing is recomputed at all.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrainer.config import S3Config
from raytrainer.data.fs import (
    Storage,
    open_storage,
    remove_temp_files,
    sha256_hex,
    split_url,
    write_committed,
)
from raytrainer.data.holdout import DEFAULT_VAL_FRACTION, MIN_VAL_TOKENS, Holdout
from raytrainer.data.manifest import (
    DEFAULT_BUCKETS,
    FORMAT,
    MANIFEST_NAME,
    PROMPT_LENGTH,
    VALIDATION,
    DataError,
    LengthBucket,
    Manifest,
    ShardRecord,
    bucket_of,
    check_buckets,
    length_histogram,
    shard_schema,
    source_totals,
    token_dtype_for,
)
from raytrainer.data.sources import (
    DocBatch,
    InputFile,
    InputSpec,
    WorkUnit,
    expand_inputs,
    iter_documents,
    plan_units,
)
from raytrainer.data.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 23  # ~16 MiB of uint16 per shard before compression
STATE_NAME = "_prepare_state.json"
SHARD_NAME = re.compile(r"^[^/]+/[^/]+/shard-\d{6}\.parquet$")
TOKENIZE_BATCH_CHARS = 4 * 1024 * 1024
STATE_EVERY_S = 30.0  # how often the state file is rewritten while shards are being committed
PREPARE_VERSION = 2  # bump when the same inputs would give different shards (2: validation holdout)
# Intermediate column, dropped before writing: characters of text per document, for chars_per_token.
CHARS = "chars"


@dataclass
class PrepareResult:
    manifest: Manifest
    out: str
    written: list[str] = field(default_factory=list)  # shards (re)written by this run
    kept: list[str] = field(default_factory=list)  # shards already there with the right content
    removed: list[str] = field(default_factory=list)  # leftover temporary files and stale shards deleted
    empty_docs: int = 0  # documents with no text, left out
    up_to_date: bool = False  # nothing had changed; no work done
    seconds: float = 0.0


def prepare_dataset(
    inputs: Sequence[InputSpec],
    out: str,
    tokenizer: str = "byte",
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    buckets: Sequence[LengthBucket] = DEFAULT_BUCKETS,
    s3: S3Config | None = None,
    use_ray: bool = True,
    num_workers: int | None = None,
    force: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val_tokens: int = MIN_VAL_TOKENS,
) -> PrepareResult:
    """Tokenise `inputs` into shards + manifest.json under `out` (local directory or s3://bucket/prefix).

    use_ray=False tokenises in this process (same output, for small inputs and tests). force=True
    recomputes even when the manifest says the inputs have not changed (finished shards are still kept
    when their content is identical). `val_fraction` of the documents (by a hash of their tokens, at least
    `min_val_tokens` tokens; 0 for none) go to the manifest's validation split instead of training."""
    started = time.monotonic()
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    buckets = list(buckets)
    check_buckets(buckets, "length buckets")
    if any(b.name == VALIDATION for b in buckets):
        raise DataError(f"length bucket name {VALIDATION!r} is reserved for the validation split; rename it")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be at least 0 and below 1 (0.005 holds out 0.5%)")
    tok = load_tokenizer(tokenizer)
    identity = tok.identity()
    token_dtype = token_dtype_for(tok.vocab_size)
    files = expand_inputs(inputs, s3)
    storage = open_storage(out, s3)
    _refuse_outputs_as_inputs(files, storage)
    fingerprint = _fingerprint(files, identity, token_dtype, buckets, shard_tokens,
                               {"fraction": val_fraction, "min_tokens": min_val_tokens})

    previous = _load_previous(storage, s3)
    if previous is not None and not force and _is_current(previous, fingerprint, storage):
        log.info("%s is up to date (%d shards, %d tokens)", storage.url, len(previous.shards),
                 previous.num_tokens)
        return PrepareResult(previous, storage.url, kept=[s.path for s in previous.shards], up_to_date=True,
                             seconds=time.monotonic() - started)

    removed = remove_temp_files(storage)
    if removed:
        log.info("removed %d unfinished file(s) from an earlier run: %s", len(removed), removed[:5])
    known = _known_records(storage, previous)
    with_prompts = any(f.prompt_field for f in files)
    writer = ShardWriter(storage, token_dtype, buckets, shard_tokens, known, fingerprint, with_prompts,
                         holdout=Holdout(val_fraction, min_val_tokens))
    units = plan_units(files, s3)
    log.info("tokenising %d files (%d units of work) with %s into %s", len(files), len(units), tok.name,
             storage.url)
    tables = (_tokenize_with_ray(units, _absolute(tokenizer), token_dtype, s3, num_workers) if use_ray
              else _tokenize_here(units, tok, token_dtype, s3))
    for table in tables:
        writer.add(table)
    records = writer.finish()
    validation = [r for r in records if r.bucket == VALIDATION]
    records = [r for r in records if r.bucket != VALIDATION]
    if not records and validation:
        raise DataError(f"inputs {[f'{i.source}={i.path}' for i in inputs]}: every document went to the "
                        f"validation split (--val-fraction {val_fraction}); nothing is left to train on: give more "
                        "text, or --val-fraction 0 for a dataset this small")
    if not records:
        raise DataError(f"inputs {[f'{i.source}={i.path}' for i in inputs]} hold no document with text "
                        f"({writer.empty_docs} empty); nothing to write to {storage.url}")

    sources = source_totals(records, keep=sorted({f.source for f in files}))
    manifest = Manifest(
        tokenizer=identity,
        token_dtype=token_dtype,
        length_buckets=buckets,
        shards=records,
        sources=sources,
        length_histogram=length_histogram(writer.lengths()),
        chars_per_token=round(writer.chars / max(1, writer.text_tokens), 6),
        prepare={"fingerprint": fingerprint, "shard_tokens": shard_tokens,
                 "inputs": [f"{i.source}={i.path}" for i in inputs], "val_fraction": val_fraction},
        validation=validation,
    )
    manifest.save(out, s3)
    storage.delete_file(STATE_NAME)
    removed += _remove_stale_shards(storage, {r.path for r in records + validation})
    result = PrepareResult(manifest, storage.url, writer.written, writer.kept, removed, writer.empty_docs,
                           seconds=time.monotonic() - started)
    log.info("%s: %d shards (%d written, %d kept), %d docs, %d tokens in %.1fs; %d tokens held out for "
             "validation", storage.url, len(records), len(writer.written), len(writer.kept), manifest.num_docs,
             manifest.num_tokens, result.seconds, manifest.validation_tokens)
    return result


def parse_token_count(text: str) -> int:
    """8M, 512K, 1G (binary multiples) or a plain integer."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    clean = text.strip().upper().replace("_", "")
    try:
        value = int(float(clean[:-1]) * scale[clean[-1]]) if clean and clean[-1] in scale else int(clean)
    except ValueError:
        raise ValueError(f"{text!r} is not a count; use e.g. 8M, 512K or 1000000") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    return value


# --------------------------------------------------------------------------- tokenising


def tokenize_unit(unit: WorkUnit, tok: Tokenizer, token_dtype: str, s3: S3Config | None) -> pa.Table:
    """Tokenise every document of a unit, EOS appended. Columns: tokens, length, source, quality,
    prompt_length, chars. Empty documents come back as rows of length 0 (no EOS) so that the caller can
    count them."""
    tables = []
    for piece in unit.pieces:
        docs = DocBatch()
        for batch in iter_documents(piece, s3):
            docs.extend(batch)
            if docs.chars() >= TOKENIZE_BATCH_CHARS:
                tables.append(_encode(docs, piece.file, tok, token_dtype))
                docs = DocBatch()
        if docs.texts:
            tables.append(_encode(docs, piece.file, tok, token_dtype))
    if not tables:
        return _empty_table(token_dtype)
    return pa.concat_tables(tables)


def _encode(docs: DocBatch, f: InputFile, tok: Tokenizer, token_dtype: str) -> pa.Table:
    texts = docs.texts
    prompts = docs.prompts if docs.prompts is not None else [""] * len(texts)
    empty = np.fromiter((not (p + t).strip() for p, t in zip(prompts, texts, strict=True)), dtype=bool,
                        count=len(texts))
    flat, lengths = _encode_checked(["" if e else t for t, e in zip(texts, empty, strict=True)], f, tok)
    if docs.prompts is not None:
        # Prompt and response are tokenised apart, so that prompt_length counts the prompt's tokens exactly.
        prompt_flat, prompt_lengths = _encode_checked(["" if e else p for p, e in zip(prompts, empty, strict=True)],
                                                      f, tok)
    else:
        prompt_flat, prompt_lengths = np.zeros(0, np.int64), np.zeros(len(texts), np.int64)
    # Document i is [prompt ids, text ids, EOS] (EOS only when it is not empty).
    with_eos = prompt_lengths + lengths + (~empty)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(with_eos, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=token_dtype)
    ids[_positions(offsets[:-1], prompt_lengths)] = prompt_flat
    ids[_positions(offsets[:-1] + prompt_lengths, lengths)] = flat
    ids[offsets[1:][~empty] - 1] = tok.eos_id
    schema = shard_schema(token_dtype)
    tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
    return pa.table({
        "tokens": tokens.cast(schema.field("tokens").type),
        "length": pa.array(with_eos.astype(np.int32)),
        "source": pa.array([f.source] * len(texts), pa.string()),
        "quality": pa.array(docs.qualities, pa.float32()),
        PROMPT_LENGTH: pa.array(prompt_lengths.astype(np.int32)),
        CHARS: pa.array(np.fromiter((len(p) + len(t) for p, t in zip(prompts, texts, strict=True)), dtype=np.int64,
                                    count=len(texts))),
    })


def _encode_checked(texts: list[str], f: InputFile, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    flat, lengths = tok.encode_flat(texts)
    if flat.size and int(flat.max()) >= tok.vocab_size:
        raise DataError(f"{f.url}: tokenizer {tok.name} produced id {int(flat.max())} >= its vocab_size "
                        f"{tok.vocab_size}; the tokenizer file is inconsistent")
    return flat, lengths


def _positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices starts[i] + 0..lengths[i]-1 for every i, concatenated."""
    total = int(lengths.sum())
    segment_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - segment_start)


def _empty_table(token_dtype: str) -> pa.Table:
    schema = shard_schema(token_dtype, with_prompt_length=True).append(pa.field(CHARS, pa.int64()))
    return schema.empty_table()


class TokenizeUnits:
    """Ray Data callable class: one tokenizer per worker, one unit of work (a JSON string) per row."""

    def __init__(self, tokenizer: str, token_dtype: str, s3: dict | None):
        self.tok = load_tokenizer(tokenizer)
        self.token_dtype = token_dtype
        self.s3 = S3Config(**s3) if s3 is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = [tokenize_unit(WorkUnit.from_json(u), self.tok, self.token_dtype, self.s3)
                  for u in batch["unit"]]
        return pa.concat_tables(tables)


def _tokenize_here(units: Sequence[WorkUnit], tok: Tokenizer, token_dtype: str, s3: S3Config | None
                   ) -> Iterator[pa.Table]:
    for unit in units:
        yield tokenize_unit(unit, tok, token_dtype, s3)


def _tokenize_with_ray(units: Sequence[WorkUnit], tokenizer: str, token_dtype: str, s3: S3Config | None,
                       num_workers: int | None) -> Iterator[pa.Table]:
    import ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # shards must not depend on which worker finished first
    ctx.enable_progress_bars = False
    try:
        yield from _run_ray_dataset(units, tokenizer, token_dtype, s3, num_workers)
    finally:  # the driver may go on to use Ray Data for other things (e.g. training)
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _run_ray_dataset(units: Sequence[WorkUnit], tokenizer: str, token_dtype: str, s3: S3Config | None,
                     num_workers: int | None) -> Iterator[pa.Table]:
    import ray

    if num_workers is None:  # one per CPU of the cluster; on a single machine, one per core
        cpus = int(ray.cluster_resources().get("CPU", 1))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        num_workers = cpus if nodes > 1 else min(cpus, os.cpu_count() or 1)
    num_workers = max(1, min(num_workers, len(units)))
    items = [{"unit": u.to_json()} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizeUnits,
        fn_constructor_kwargs={"tokenizer": tokenizer, "token_dtype": token_dtype,
                               "s3": s3.model_dump() if s3 is not None else None},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    except Exception as e:
        data_error = _find_data_error(e)
        if data_error is None:
            raise
        raise data_error from e


def _find_data_error(e: BaseException) -> DataError | None:
    """Ray wraps a worker's exception (RayTaskError, UserCodeException); give the person the DataError."""
    seen = set()
    stack: list[BaseException | None] = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DataError):
            return DataError(str(err))
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None)]
    match = re.search(r"DataError: (.+)", str(e))
    return DataError(match.group(1).strip()) if match else None


def ensure_ray(num_cpus: int = 8) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray with more logical CPUs than cores (so Ray Data
    tasks are not starved on small machines)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(ignore_reinit_error=True)
    else:
        # "local": a Ray of its own, never whatever cluster `ray start` (or a run killed midway) left recorded
        # in /tmp/ray/ray_current_cluster, which a bare init would try to join.
        ray.init(address="local", num_cpus=num_cpus, ignore_reinit_error=True, include_dashboard=False)


def _absolute(tokenizer: str) -> str:
    # Ray workers may run in another directory than the driver.
    if tokenizer in ("byte", "gpt2") or "://" in tokenizer:
        return tokenizer
    return os.path.abspath(os.path.expanduser(tokenizer))


# --------------------------------------------------------------------------- shards


class ShardWriter:
    """Buffers tokenised documents per (source, bucket) and commits a shard each time a buffer reaches
    shard_tokens. A shard whose bytes already exist (same sha256) is kept rather than rewritten."""

    def __init__(self, storage: Storage, token_dtype: str, buckets: Sequence[LengthBucket], shard_tokens: int,
                 known: dict[str, ShardRecord], fingerprint: str, with_prompt_length: bool = False,
                 holdout: Holdout | None = None):
        self.storage = storage
        self.holdout = holdout
        self.schema = shard_schema(token_dtype, with_prompt_length)
        self.buckets = list(buckets)
        self.shard_tokens = shard_tokens
        self.known = known
        self.fingerprint = fingerprint
        self.pending: dict[tuple[str, str], list[pa.Table]] = {}
        self.pending_tokens: dict[tuple[str, str], int] = {}
        self.next_index: dict[tuple[str, str], int] = {}
        self.records: list[ShardRecord] = []
        self.written: list[str] = []
        self.kept: list[str] = []
        self.empty_docs = 0
        self.chars = 0
        self.text_tokens = 0
        self._lengths: list[np.ndarray] = []
        self._state_saved = time.monotonic()

    def add(self, table: pa.Table) -> None:
        lengths = table.column("length").to_numpy()
        nonempty = lengths > 0
        self.empty_docs += int((~nonempty).sum())
        if not nonempty.all():
            table = table.filter(pa.array(nonempty))
            lengths = lengths[nonempty]
        if not table.num_rows:
            return
        self._lengths.append(lengths.astype(np.int32))
        self.chars += int(pc.sum(table.column(CHARS)).as_py())
        self.text_tokens += int(lengths.sum()) - table.num_rows
        if self.holdout is None:
            self._add_training(table)
            return
        train, val = self.holdout.split(table)
        self._add_split(train, val)

    def _add_split(self, train: pa.Table | None, val: pa.Table | None) -> None:
        if train is not None and train.num_rows:
            self._add_training(train)
        if val is not None and val.num_rows:
            sources = val.column("source").to_numpy(zero_copy_only=False)
            for source in dict.fromkeys(sources):
                self._append((source, VALIDATION), val.filter(pa.array(sources == source)))

    def _add_training(self, table: pa.Table) -> None:
        lengths = table.column("length").to_numpy()
        bucket_ids = bucket_of(lengths, self.buckets)
        sources = table.column("source").to_numpy(zero_copy_only=False)
        for source in dict.fromkeys(sources):  # in order of appearance
            for b, bucket in enumerate(self.buckets):
                mask = (sources == source) & (bucket_ids == b)
                if mask.any():
                    self._append((source, bucket.name), table.filter(pa.array(mask)))

    def _append(self, key: tuple[str, str], rows: pa.Table) -> None:
        self.pending.setdefault(key, []).append(rows)
        added = int(pc.sum(rows.column("length")).as_py())
        self.pending_tokens[key] = self.pending_tokens.get(key, 0) + added
        while self.pending_tokens[key] >= self.shard_tokens:
            rows = pa.concat_tables(self.pending[key])
            cumulative = np.cumsum(rows.column("length").to_numpy())
            cut = int(np.searchsorted(cumulative, self.shard_tokens, side="left")) + 1
            self._commit(key, rows.slice(0, cut))
            rest = rows.slice(cut)
            self.pending[key] = [rest] if rest.num_rows else []
            self.pending_tokens[key] = int(cumulative[-1] - cumulative[cut - 1])

    def finish(self) -> list[ShardRecord]:
        if self.holdout is not None:
            self._add_split(*self.holdout.finish())
        for key in sorted(self.pending):
            if self.pending[key]:
                self._commit(key, pa.concat_tables(self.pending[key]))
            self.pending[key] = []
        self.records.sort(key=lambda r: r.path)
        return self.records

    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)

    def _commit(self, key: tuple[str, str], rows: pa.Table) -> None:
        source, bucket = key
        index = self.next_index.get(key, 0)
        self.next_index[key] = index + 1
        rel = f"{source}/{bucket}/shard-{index:06d}.parquet"  # held-out documents: <source>/validation/
        # One chunk per column: the bytes must not depend on how the rows arrived in batches.
        data = serialize_shard(rows.select(self.schema.names).cast(self.schema).combine_chunks())
        digest = sha256_hex(data)
        record = ShardRecord(rel, source, bucket, rows.num_rows, int(pc.sum(rows.column("length")).as_py()),
                             len(data), digest)
        if self._unchanged(rel, digest, len(data)):
            self.kept.append(rel)
        else:
            write_committed(self.storage, rel, data)
            self.written.append(rel)
        self.records.append(record)
        if time.monotonic() - self._state_saved >= STATE_EVERY_S:
            self.save_state()

    def save_state(self) -> None:
        """Record the committed shards, so a re-run after a crash can trust them without reading them back.
        Throttled: a shard committed but not yet recorded is recognised by hashing it instead."""
        state = {"fingerprint": self.fingerprint, "shards": [asdict(r) for r in self.records]}
        write_committed(self.storage, STATE_NAME, json.dumps(state).encode())
        self._state_saved = time.monotonic()

    def _unchanged(self, rel: str, digest: str, size: int) -> bool:
        on_disk = self.storage.size(rel)
        if on_disk != size:
            return False
        record = self.known.get(rel)
        if record is not None and record.sha256 == digest and record.bytes == size:
            return True
        # Committed but not recorded (stopped between the two): look at the bytes themselves.
        return self.storage.hash_file(rel)[1] == digest


def serialize_shard(table: pa.Table) -> bytes:
    """Parquet bytes of one shard. Same table, same bytes (for a given pyarrow version)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=65536, write_statistics=True)
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------- re-runs


def _fingerprint(files: Iterable[InputFile], identity: dict, token_dtype: str,
                 buckets: Sequence[LengthBucket], shard_tokens: int, holdout: dict) -> str:
    payload = {
        "holdout": holdout,
        "version": PREPARE_VERSION, "format": FORMAT, "tokenizer": identity["hash"],
        "token_dtype": token_dtype,
        "buckets": [asdict(b) for b in buckets], "shard_tokens": shard_tokens,
        "files": [asdict(f) for f in files],
    }
    return sha256_hex(json.dumps(payload, sort_keys=True).encode())


def _load_previous(storage: Storage, s3: S3Config | None) -> Manifest | None:
    if not storage.exists(MANIFEST_NAME):
        return None
    try:
        return Manifest.load(storage.url, s3)
    except DataError as e:
        log.warning("ignoring the existing manifest (%s); every shard will be checked again", e)
        return None


def _is_current(manifest: Manifest, fingerprint: str, storage: Storage) -> bool:
    if (manifest.prepare or {}).get("fingerprint") != fingerprint:
        return False
    sizes = storage.list_files()
    return all(sizes.get(s.path) == s.bytes for s in manifest.shards + manifest.validation)


def _known_records(storage: Storage, previous: Manifest | None) -> dict[str, ShardRecord]:
    """Shards recorded by the last manifest or by an interrupted run's state file, by path."""
    known = {s.path: s for s in previous.shards + previous.validation} if previous else {}
    if storage.exists(STATE_NAME):
        try:
            state = json.loads(storage.read_bytes(STATE_NAME))
            known.update({r["path"]: ShardRecord(**r) for r in state["shards"]})
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s (%s); shards are checked by content", storage.uri(STATE_NAME), e)
    return known


def _remove_stale_shards(storage: Storage, current: set[str]) -> list[str]:
    """Shards from an earlier run with other inputs that this manifest no longer lists."""
    stale = [rel for rel in storage.list_files() if SHARD_NAME.match(rel) and rel not in current]
    for rel in stale:
        storage.delete_file(rel)
    if stale:
        log.info("removed %d shard(s) no longer in the manifest", len(stale))
    return stale


def _refuse_outputs_as_inputs(files: Sequence[InputFile], storage: Storage) -> None:
    kind, root = split_url(storage.url)
    for f in files:
        f_kind, f_path = split_url(f.url)
        if f.kind == "parquet" and f_kind == kind and posixpath.commonpath([root, f_path]) == root:
            raise DataError(f"input {f.source}={f.url} lies inside the output directory {storage.url}; "
                            "prepared shards cannot be inputs — move the inputs or choose another --out")
