"""What a planner knows about a dataset without holding its documents: one row per shard, from the manifest,
and the planning columns of any shard read on demand.

    table = ShardTable.from_manifest(manifest)      # O(shards): stream, docs, tokens, first doc id per shard
    columns = ParquetColumns(storage, manifest)     # columns.read(shard) -> ShardColumns (length, quality)
    table, columns = synthetic_dataset(10**5, 10**4, seed=0)   # a 10^9-document manifest, no token data

A document's id is the number of documents listed before its shard in the manifest plus its row: stable
when a shard is left out as unreadable, so blacklists stay valid.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrainer.data.fs import Storage
from raytrainer.data.manifest import DataError, LengthBucket, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTable:
    """Shards in manifest order; every array has one entry per shard."""

    stream: np.ndarray  # int16, index into `streams`
    num_docs: np.ndarray  # int64
    num_tokens: np.ndarray  # int64
    first_doc: np.ndarray  # int64, id of the shard's first document
    streams: tuple[tuple[str, str], ...]  # (source, bucket), sorted by source then bucket order
    buckets: tuple[LengthBucket, ...]
    fingerprint: str  # identifies the documents the plan draws from

    def __len__(self) -> int:
        return len(self.num_docs)

    @property
    def num_documents(self) -> int:
        return int(self.num_docs.sum())

    def stream_shards(self, stream: int) -> np.ndarray:
        """The stream's shards (those with documents), in manifest order."""
        return np.flatnonzero((self.stream == stream) & (self.num_docs > 0))

    def stream_tokens(self) -> np.ndarray:
        """Tokens per stream, as the manifest records them."""
        return np.bincount(self.stream, weights=self.num_tokens, minlength=len(self.streams))

    @functools.cached_property
    def stream_docs(self) -> np.ndarray:
        """Documents per stream."""
        return np.bincount(self.stream, weights=self.num_docs, minlength=len(self.streams)).astype(np.int64)

    def lowest_length(self, stream: int) -> int:
        """The shortest length a document of the stream can have: one more than the previous bucket's limit."""
        names = [b.name for b in self.buckets]
        i = names.index(self.streams[stream][1])
        return 1 if i == 0 else int(self.buckets[i - 1].max_tokens) + 1

    def locate(self, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each document id; ids past the last document raise."""
        ids = np.asarray(doc_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_documents):
            raise KeyError(f"document ids outside 0..{self.num_documents - 1}")
        shard = np.searchsorted(self.first_doc, ids, side="right") - 1
        # An empty shard shares its first id with the next one; searchsorted(right) lands on the last of them.
        return shard, ids - self.first_doc[shard]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ShardTable:
        if not manifest.shards:
            raise DataError("the manifest lists no shards; nothing to train on")
        bucket_order = {name: i for i, name in enumerate(manifest.bucket_names())}
        streams = tuple(sorted({(s.source, s.bucket) for s in manifest.shards},
                               key=lambda sb: (sb[0], bucket_order[sb[1]])))
        stream_of = {sb: i for i, sb in enumerate(streams)}
        num_docs = np.array([s.num_docs for s in manifest.shards], dtype=np.int64)
        fingerprint = hashlib.sha256(repr([(s.path, s.num_docs, s.num_tokens, s.sha256)
                                           for s in manifest.shards]).encode()).hexdigest()[:16]
        return cls(stream=np.array([stream_of[(s.source, s.bucket)] for s in manifest.shards], dtype=np.int16),
                   num_docs=num_docs, num_tokens=np.array([s.num_tokens for s in manifest.shards], dtype=np.int64),
                   first_doc=_first_docs(num_docs), streams=streams, buckets=tuple(manifest.length_buckets),
                   fingerprint=fingerprint)


def _first_docs(num_docs: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(num_docs)[:-1]]).astype(np.int64) if len(num_docs) else num_docs


@dataclass(frozen=True)
class ShardColumns:
    """The planning columns of one shard's documents, row by row."""

    length: np.ndarray  # int32, tokens including the EOS
    quality: np.ndarray  # float32, NaN where the input had no score


class ColumnSource(Protocol):
    def read(self, shard: int) -> ShardColumns | None:
        """The shard's columns, or None for a shard left out as unreadable (data.on_bad_shard=skip)."""
        ...


class ParquetColumns:
    """`length` and `quality` of a shard by Parquet column projection: a few bytes per document, read from
    local disk or s3:// only when the plan reaches the shard's window."""

    def __init__(self, storage: Storage, manifest: Manifest, on_bad_shard: Literal["fail", "skip"] = "fail"):
        self.storage = storage
        self.manifest = manifest
        self.on_bad_shard = on_bad_shard
        self.dropped: set[str] = set()
        self._lock = threading.Lock()

    def read(self, shard: int) -> ShardColumns | None:
        record = self.manifest.shards[shard]
        try:
            table = pq.read_table(self.storage.path(record.path), columns=["length", "quality"],
                                  filesystem=self.storage.fs)
            why = (None if table.num_rows == record.num_docs
                   else f"{table.num_rows} documents, but the manifest records {record.num_docs}")
        except FileNotFoundError:
            why = "missing (listed in the manifest but not found)"
        except (OSError, pa.ArrowException) as e:
            why = f"cannot be read ({type(e).__name__}: {e})"
        if why is not None:
            return self._bad(record.path, why)
        length = table.column("length").to_numpy().astype(np.int32)
        if (length <= 0).any():
            raise DataError(f"shard {self.storage.uri(record.path)}: a document has length <= 0; every document "
                            "holds at least its EOS token. Prepare the dataset again")
        quality = np.asarray(table.column("quality").to_numpy(zero_copy_only=False), dtype=np.float32)
        return ShardColumns(length, quality)

    def _bad(self, path: str, why: str) -> None:
        if self.on_bad_shard == "fail":
            raise DataError(f"shard {self.storage.uri(path)}: {why}; re-run jobs/prepare_data.py, or set "
                            "data.on_bad_shard=skip to train without unreadable shards")
        with self._lock:
            first = path not in self.dropped
            self.dropped.add(path)
        if first:
            log.warning("data: leaving out shard %s: %s (data.on_bad_shard=skip)", self.storage.uri(path), why)
        return None


class SyntheticColumns:
    """Document lengths and qualities generated from (seed, shard): a manifest of any size without token data,
    for simulating the planner at web scale. Lengths are log-normal around `mean_length`, clipped to the
    shard's length bucket."""

    def __init__(self, table: ShardTable, seed: int, mean_length: float = 1000.0):
        self.table = table
        self.seed = seed
        self.mean_length = mean_length

    def read(self, shard: int) -> ShardColumns:
        n = int(self.table.num_docs[shard])
        rng = np.random.default_rng([self.seed, shard])
        lo = self.table.lowest_length(int(self.table.stream[shard]))
        bucket = self.table.streams[int(self.table.stream[shard])][1]
        hi = next(b.max_tokens for b in self.table.buckets if b.name == bucket) or 1 << 20
        length = rng.lognormal(np.log(self.mean_length) - 0.5, 1.0, n).astype(np.int64)
        return ShardColumns(np.clip(length, lo, hi).astype(np.int32), rng.random(n, dtype=np.float32))


def synthetic_dataset(n_shards: int, docs_per_shard: int, seed: int = 0, sources: tuple[str, ...] = ("web",),
                      buckets: tuple[LengthBucket, ...] = (LengthBucket("all", None),),
                      mean_length: float = 1000.0) -> tuple[ShardTable, SyntheticColumns]:
    """A ShardTable of n_shards shards of about docs_per_shard documents each (sizes vary by up to 10%), spread
    over every (source, bucket) stream, and its generated columns. Token counts are the expected ones."""
    rng = np.random.default_rng([seed, n_shards])
    num_docs = rng.integers(int(docs_per_shard * 0.9), int(docs_per_shard * 1.1) + 1, n_shards).astype(np.int64)
    streams = tuple((s, b.name) for s in sources for b in buckets)
    stream = (np.arange(n_shards) % len(streams)).astype(np.int16)
    table = ShardTable(stream=stream, num_docs=num_docs, num_tokens=(num_docs * mean_length).astype(np.int64),
                       first_doc=_first_docs(num_docs), streams=streams, buckets=buckets,
                       fingerprint=f"synthetic-{seed}-{n_shards}-{docs_per_shard}")
    return table, SyntheticColumns(table, seed, mean_length)
