"""The order in which a stream visits its documents, and the windows of it read ahead.

Each epoch of a stream (a (source, length bucket) pair) visits its shards in a seeded order that depends on
(seed, source, bucket, epoch) only, cut into windows of `data.shuffle_window_shards` consecutive shards; the
documents of a window are visited in a seeded order of their own, (seed, source, bucket, epoch, window). The
manifest's document counts place every window in the epoch (`EpochLayout`), so a position in an epoch names
its window directly, and only that window's `length` and `quality` columns are read (`load_window`); the
next one is read ahead on a background thread (`WindowReader`). A reader needs only that many shards of a
stream at a time; with at least as many shards in the window as the stream has, an epoch is a plain
permutation.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrainer.config import Phase
from raytrainer.data.shard_table import ColumnSource, ShardColumns, ShardTable

_MASK64 = (1 << 64) - 1


def stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


def in_background(fn: Callable[..., Any], *args: Any, name: str = "plan-window") -> Future:
    """fn(*args) on a daemon thread: read-ahead never holds up a process that is ending."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the result
                future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def shard_order(table: ShardTable, stream: int, seed: int, epoch: int) -> np.ndarray:
    """The stream's shards (global shard indices) in the order epoch `epoch` visits them."""
    shards = table.stream_shards(stream)
    source, bucket = table.streams[stream]
    rng = np.random.default_rng([seed & _MASK64, stable_hash(source, bucket), epoch])
    return shards[rng.permutation(len(shards))]


def window_order(table: ShardTable, stream: int, seed: int, epoch: int, window: int, n_docs: int) -> np.ndarray:
    """The order in which window `window` of the epoch visits its n_docs documents (positions in the window's
    shards laid end to end, in the epoch's shard order)."""
    source, bucket = table.streams[stream]
    rng = np.random.default_rng([seed & _MASK64, stable_hash(source, bucket), epoch, window + 1])
    return rng.permutation(n_docs)


@dataclass(frozen=True)
class EpochLayout:
    """Where each window of one epoch of one stream starts, from the manifest's document counts."""

    shards: np.ndarray  # the epoch's shard order
    starts: np.ndarray  # int64 [n_windows + 1]: epoch position of each window's first document, then the total
    window_shards: int

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def window_of(self, pos: int) -> int:
        return int(np.searchsorted(self.starts, pos, side="right")) - 1

    def window_shard_ids(self, window: int) -> np.ndarray:
        return self.shards[window * self.window_shards: (window + 1) * self.window_shards]


def epoch_layout(table: ShardTable, stream: int, seed: int, epoch: int, window_shards: int) -> EpochLayout:
    shards = shard_order(table, stream, seed, epoch)
    counts = table.num_docs[shards]
    per_window = np.add.reduceat(counts, np.arange(0, len(shards), window_shards)) if len(shards) else counts
    return EpochLayout(shards, np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64), window_shards)


@dataclass
class Window:
    """One window's documents in the order the epoch visits them."""

    doc_id: np.ndarray  # int64
    shard: np.ndarray  # int32
    row: np.ndarray  # int32
    length: np.ndarray  # int32
    quality: np.ndarray  # float32
    readable: np.ndarray  # bool: False for documents of a shard left out as unreadable
    _eligible: tuple[object, np.ndarray] | None = None

    def eligible(self, key: tuple, phase: Phase, blacklist: np.ndarray) -> np.ndarray:
        if self._eligible is None or self._eligible[0] != key:
            ok = self.readable.copy()
            if phase.max_doc_tokens is not None:
                ok &= self.length <= phase.max_doc_tokens
            if phase.min_quality is not None:
                ok &= ~(self.quality < phase.min_quality)  # NaN (no score) passes
            if len(blacklist):
                ok &= ~np.isin(self.doc_id, blacklist)
            self._eligible = (key, ok)
        return self._eligible[1]


def load_window(table: ShardTable, layout: EpochLayout, stream: int, seed: int, epoch: int, window: int,
                reads: list[ShardColumns | None]) -> Window:
    """A window's documents in visiting order, from its shards' columns (None: a shard left out)."""
    shards = layout.window_shard_ids(window)
    counts = table.num_docs[shards]
    n = int(counts.sum())
    shard = np.repeat(shards.astype(np.int32), counts)
    row = (np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int32)
    length = np.ones(n, dtype=np.int32)
    quality = np.full(n, np.nan, dtype=np.float32)
    readable = np.ones(n, dtype=bool)
    at = 0
    for k, got in zip(counts.tolist(), reads, strict=True):
        if got is None:
            readable[at: at + k] = False
        else:
            length[at: at + k], quality[at: at + k] = got.length, got.quality
        at += k
    order = window_order(table, stream, seed, epoch, window, n)
    doc_id = table.first_doc[shard[order]] + row[order]
    return Window(doc_id, shard[order], row[order], length[order], quality[order], readable[order])


class WindowReader:
    """Windows of a stream's epochs, built where they are needed from shard columns that are read ahead: when a
    window is taken, its successor's shards start reading on daemon threads (in parallel). Columns stay cached
    up to `cache_docs` documents, so a small corpus is read once however many epochs it is drawn for."""

    def __init__(self, table: ShardTable, columns: ColumnSource, seed: int, window_shards: int,
                 cache_docs: int = 1 << 23):
        self.table, self.columns, self.seed, self.window_shards = table, columns, seed, window_shards
        self.cache_docs = cache_docs
        self._layouts: dict[tuple[int, int], EpochLayout] = {}
        self._reads: OrderedDict[int, Future] = OrderedDict()  # shard -> its columns, least recently used first
        self._cached_docs = 0
        self._lock = threading.Lock()

    def layout(self, stream: int, epoch: int) -> EpochLayout:
        key = (stream, epoch)
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None:
                for old in [k for k in self._layouts if k[0] == stream and k[1] < epoch - 1]:
                    del self._layouts[old]
                layout = self._layouts[key] = epoch_layout(self.table, stream, self.seed, epoch, self.window_shards)
        return layout

    def get(self, stream: int, epoch: int, window: int) -> Window:
        layout = self.layout(stream, epoch)
        reads = [self._read(int(s)) for s in layout.window_shard_ids(window)]
        following = (epoch, window + 1) if window + 1 < len(layout.starts) - 1 else (epoch + 1, 0)
        for s in self.layout(stream, following[0]).window_shard_ids(following[1]):
            self._read(int(s))
        return load_window(self.table, layout, stream, self.seed, epoch, window, [f.result() for f in reads])

    def _read(self, shard: int) -> Future:
        with self._lock:
            future = self._reads.get(shard)
            if future is not None:
                self._reads.move_to_end(shard)
                return future
            future = self._reads[shard] = in_background(self.columns.read, shard, name="plan-shard")
            self._cached_docs += int(self.table.num_docs[shard])
            while self._cached_docs > self.cache_docs and len(self._reads) > 2 * self.window_shards:
                old, _ = self._reads.popitem(last=False)
                self._cached_docs -= int(self.table.num_docs[old])
        return future
