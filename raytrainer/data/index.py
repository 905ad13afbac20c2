"""A compact in-memory index of every document in a prepared dataset: what the planner needs, no tokens.

    index = load_index("data/sample", s3=None, on_bad_shard="fail")
    index.length[i], index.quality[i], index.stream[i]   # per document, numpy arrays
    index.streams                                      # [(source, bucket), ...]

Only the `length` and `quality` columns of each shard are read (Parquet column projection), so indexing
a dataset costs a few bytes per document. A document's id is stable: the number of documents listed
before its shard in the manifest plus its row, so dropping an unreadable shard renumbers nothing and a
blacklist stays valid. The index is cached per process (a rebuilt data feed after a rollback reuses it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrainer.config import S3Config
from raytrainer.data.fs import Storage, open_storage
from raytrainer.data.manifest import DataError, Manifest, ShardRecord

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["length", "quality"]
_CACHE: dict[tuple, DocIndex] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class DocIndex:
    """Documents in manifest order (shard by shard, row by row). Arrays have one entry per document."""

    dataset: str  # URL of the dataset directory
    manifest: Manifest  # as listed, including shards that were dropped
    doc_id: np.ndarray  # int64, strictly increasing
    shard: np.ndarray  # int32, index into manifest.shards
    row: np.ndarray  # int32, row within the shard
    length: np.ndarray  # int32, tokens including the EOS
    quality: np.ndarray  # float32, NaN where the input had no score
    stream: np.ndarray  # int16, index into `streams`
    streams: tuple[tuple[str, str], ...]  # (source, bucket), sorted by source then bucket order
    dropped: tuple[str, ...]  # shard paths left out because they could not be read (on_bad_shard=skip)
    fingerprint: str  # identifies the documents the plan draws from

    def __len__(self) -> int:
        return len(self.doc_id)

    def positions(self, doc_ids: np.ndarray | list[int]) -> np.ndarray:
        """Index positions of the given document ids; ids not in the index are left out."""
        ids = np.asarray(doc_ids, dtype=np.int64)
        pos = np.searchsorted(self.doc_id, ids)
        pos = np.clip(pos, 0, max(len(self.doc_id) - 1, 0))
        found = (self.doc_id[pos] == ids) if len(self.doc_id) else np.zeros(len(ids), bool)
        return pos[found]

    def stream_shards(self, stream: int) -> list[np.ndarray]:
        """Index positions of the stream's documents, one array per shard, shards in manifest order."""
        return _stream_shards(self, stream)



def shard_offsets(manifest: Manifest) -> np.ndarray:
    """The id of each shard's first document: documents listed before it in the manifest."""
    counts = np.array([s.num_docs for s in manifest.shards], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts


def load_index(dataset: str, s3: S3Config | None = None, on_bad_shard: Literal["fail", "skip"] = "fail",
               manifest: Manifest | None = None, max_workers: int = 16) -> DocIndex:
    """The index of the dataset at `dataset` (local or s3://), built once per process."""
    storage = open_storage(dataset, s3)
    manifest = manifest if manifest is not None else Manifest.load(dataset, s3)
    key = (storage.url, _manifest_digest(manifest), on_bad_shard)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    index = build_index(storage, manifest, on_bad_shard, max_workers=max_workers)
    with _CACHE_LOCK:
        _CACHE[key] = index
    return index


def build_index(storage: Storage, manifest: Manifest, on_bad_shard: Literal["fail", "skip"] = "fail",
                max_workers: int = 16) -> DocIndex:
    if not manifest.shards:
        raise DataError(f"dataset {storage.url}: the manifest lists no shards; nothing to train on")
    bucket_order = {name: i for i, name in enumerate(manifest.bucket_names())}
    streams = tuple(sorted({(s.source, s.bucket) for s in manifest.shards},
                           key=lambda sb: (sb[0], bucket_order[sb[1]])))
    stream_of = {sb: i for i, sb in enumerate(streams)}
    offsets = shard_offsets(manifest)

    def read(i_record: tuple[int, ShardRecord]) -> tuple[int, pa.Table | None, str | None]:
        i, record = i_record
        try:
            table = pq.read_table(storage.path(record.path), columns=INDEX_COLUMNS, filesystem=storage.fs)
        except FileNotFoundError:
            return i, None, "missing (listed in the manifest but not found)"
        except (OSError, pa.ArrowException) as e:
            return i, None, f"cannot be read ({type(e).__name__}: {e})"
        if table.num_rows != record.num_docs:
            return i, None, f"{table.num_rows} documents, but the manifest records {record.num_docs}"
        return i, table, None

    workers = max(1, min(max_workers, len(manifest.shards)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(read, enumerate(manifest.shards)))

    bad = [(manifest.shards[i].path, why) for i, table, why in results if table is None]
    if bad and on_bad_shard == "fail":
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else ""
        raise DataError(f"shard {storage.uri(path)}: {why}{more}; re-run jobs/prepare_data.py, or set "
                        "data.on_bad_shard=skip to train without unreadable shards")
    if bad:
        for path, why in bad:
            log.warning("data index: dropping shard %s: %s", storage.uri(path), why)
        log.warning("data index: dropped %d of %d shards of %s (data.on_bad_shard=skip)",
                    len(bad), len(manifest.shards), storage.url)
        if len(bad) == len(manifest.shards):
            raise DataError(f"dataset {storage.url}: every shard is unreadable (first: {bad[0][0]}: "
                            f"{bad[0][1]}); nothing is left to train on")

    columns = ("doc_id", "shard", "row", "length", "quality", "stream")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in columns}
    for i, table, _ in results:
        if table is None:
            continue
        record = manifest.shards[i]
        n = table.num_rows
        rows = np.arange(n, dtype=np.int32)
        parts["doc_id"].append(offsets[i] + rows.astype(np.int64))
        parts["shard"].append(np.full(n, i, dtype=np.int32))
        parts["row"].append(rows)
        parts["length"].append(table.column("length").to_numpy().astype(np.int32))
        quality = table.column("quality").to_numpy(zero_copy_only=False)
        parts["quality"].append(np.asarray(quality, dtype=np.float32))  # nulls arrive as NaN
        parts["stream"].append(np.full(n, stream_of[(record.source, record.bucket)], dtype=np.int16))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if (arrays["length"] <= 0).any():
        shard = manifest.shards[int(arrays["shard"][np.argmax(arrays["length"] <= 0)])].path
        raise DataError(f"shard {storage.uri(shard)}: a document has length <= 0; every document holds at "
                        "least its EOS token. Prepare the dataset again")
    dropped = tuple(path for path, _ in bad)
    kept = [s for s in manifest.shards if s.path not in set(dropped)]
    fingerprint = hashlib.sha256(
        repr([(s.path, s.num_docs, s.num_tokens, s.sha256) for s in kept]).encode()).hexdigest()[:16]
    # Streams whose every shard was dropped stay listed (with no documents) so stream ids stay stable.
    return DocIndex(dataset=storage.url, manifest=manifest, streams=streams, dropped=dropped,
                    fingerprint=fingerprint, **arrays)


def _stream_shards(index: DocIndex, stream: int) -> list[np.ndarray]:
    positions = np.flatnonzero(index.stream == stream)
    if not len(positions):
        return []
    shards = index.shard[positions]
    cuts = np.flatnonzero(np.diff(shards)) + 1
    return np.split(positions, cuts)


def _manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()
