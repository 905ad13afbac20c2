"""The global batch stream planned from a ShardTable: memory per process grows with the shards of the windows
being read, not with the documents of the dataset, and a cursor deep into a run is found without replaying
anything before it.

    planner = WindowPlanner(table, columns, cfg, objective, cursor=None)
    batch = planner.next_batch()        # PlannedBatch, as raytrainer.data.plan
    planner.cursor.to_dict()            # the position after it (the same Cursor format)

Order. Each epoch of a stream (a (source, length bucket) pair) visits its shards in a seeded order that
depends on (seed, source, bucket, epoch) only, cut into windows of `data.shuffle_window_shards` consecutive
shards; the documents of a window are visited in a seeded order of their own, (seed, source, bucket, epoch,
window). The manifest's document counts place every window in the epoch, so a cursor's (epoch, pos) names
its window directly, and only that window's `length` and `quality` columns are read (the next window is read
ahead on a background thread).

Mixture. As in raytrainer.data.plan, except where a stream's token count comes from: the manifest records
it, so it is the whole stream's, or nothing when the phase's max_doc_tokens is below the stream's length
bucket (no document of it could pass). Documents that fail a phase's filters, are blacklisted, or sit in a
shard left out as unreadable (data.on_bad_shard=skip) are passed over where they would have been drawn.

Packing, phases, skips and the carry are those of raytrainer.data.plan.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from raytrainer.config import Config, Phase
from raytrainer.data.cursor import Carry as CursorCarry
from raytrainer.data.cursor import Cursor, StreamPosition
from raytrainer.data.manifest import DataError
from raytrainer.data.objectives import Objective
from raytrainer.data.packing import DOC, END, ROW, SEGMENT_COLUMNS, SHARD, SHARD_ROW, START, Carry, Piece
from raytrainer.data.plan import PlannedBatch, _stable_hash, phase_index, stream_weights
from raytrainer.data.shard_table import ColumnSource, ShardTable

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_SCAN = 256  # window entries checked at once when passing over documents that cannot be drawn


# ---------------------------------------------------------------------------------------------- the order


def shard_order(table: ShardTable, stream: int, seed: int, epoch: int) -> np.ndarray:
    """The stream's shards (global shard indices) in the order epoch `epoch` visits them."""
    shards = table.stream_shards(stream)
    source, bucket = table.streams[stream]
    rng = np.random.default_rng([seed & _MASK64, _stable_hash(source, bucket), epoch])
    return shards[rng.permutation(len(shards))]


def window_order(table: ShardTable, stream: int, seed: int, epoch: int, window: int, n_docs: int) -> np.ndarray:
    """The order in which window `window` of the epoch visits its n_docs documents (positions in the window's
    shards laid end to end, in the epoch's shard order)."""
    source, bucket = table.streams[stream]
    rng = np.random.default_rng([seed & _MASK64, _stable_hash(source, bucket), epoch, window + 1])
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


def load_window(table: ShardTable, columns: ColumnSource, layout: EpochLayout, stream: int, seed: int, epoch: int,
                window: int, pool: ThreadPoolExecutor | None = None) -> Window:
    shards = layout.window_shard_ids(window)
    reads = list(pool.map(columns.read, shards.tolist())) if pool is not None else [columns.read(int(s))
                                                                                   for s in shards]
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


class _Windows:
    """Per stream, the window being read and the next one, read ahead on a thread pool."""

    def __init__(self, table: ShardTable, columns: ColumnSource, seed: int, window_shards: int, threads: int = 8):
        self.table, self.columns, self.seed, self.window_shards = table, columns, seed, window_shards
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plan-window")
        self._read_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plan-shard")
        self._layouts: dict[tuple[int, int], EpochLayout] = {}
        self._windows: dict[int, dict[tuple[int, int], Future]] = {}
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
        wanted = self._submit(stream, epoch, window)
        layout = self.layout(stream, epoch)
        following = (epoch, window + 1) if window + 1 < len(layout.starts) - 1 else (epoch + 1, 0)
        self._submit(stream, *following)
        with self._lock:  # only these two are kept
            mine = self._windows[stream]
            for key in [k for k in mine if k not in ((epoch, window), following)]:
                mine.pop(key).cancel()
        return wanted.result()

    def _submit(self, stream: int, epoch: int, window: int) -> Future:
        with self._lock:
            mine = self._windows.setdefault(stream, {})
            future = mine.get((epoch, window))
            if future is None:
                future = mine[(epoch, window)] = self._pool.submit(self._load, stream, epoch, window)
        return future

    def _load(self, stream: int, epoch: int, window: int) -> Window:
        return load_window(self.table, self.columns, self.layout(stream, epoch), stream, self.seed, epoch, window,
                           self._read_pool)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._read_pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Drawn:
    """Documents drawn (or about to be), in order, with the stream position after each."""

    doc: np.ndarray  # int64
    shard: np.ndarray
    row: np.ndarray
    length: np.ndarray  # int64, tokens as packed
    epoch: np.ndarray  # the stream's epoch and position after the document
    pos: np.ndarray

    @classmethod
    def empty(cls) -> Drawn:
        return cls(*(np.zeros(0, dtype=np.int64) for _ in range(6)))

    @classmethod
    def concat(cls, parts: list[Drawn]) -> Drawn:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("doc", "shard", "row", "length", "epoch", "pos")))

    def take(self, index: np.ndarray) -> Drawn:
        return Drawn(self.doc[index], self.shard[index], self.row[index], self.length[index], self.epoch[index],
                     self.pos[index])


def _interleave(streams: dict[int, tuple[int, float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The weighted interleave of the streams' upcoming documents: {stream: (tokens consumed, weight, lengths)}
    -> (order into the streams' documents laid end to end in `streams` order, the stream of each in that
    order). Before its i-th document a stream's score is (consumed + its first i lengths) / weight, the same
    float the one-at-a-time rule compares; ties go to the lower stream, then the earlier document."""
    scores, stream_ids, index = [], [], []
    for k, (consumed, weight, lengths) in streams.items():
        before = consumed + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        scores.append(before.astype(np.float64) / weight)
        stream_ids.append(np.full(len(lengths), k, dtype=np.int64))
        index.append(np.arange(len(lengths)))
    score, stream_id, i = np.concatenate(scores), np.concatenate(stream_ids), np.concatenate(index)
    order = np.lexsort((i, stream_id, score))
    return order, stream_id[order]


def pack_rows(n_rows: int, seq_len: int, carry: Carry | None, drawn: Drawn
              ) -> tuple[np.ndarray, tuple[Piece, int] | None]:
    """raytrainer.data.packing.fill_rows for documents already drawn: the rest of `carry`, then `drawn`, laid
    end to end into n_rows rows of seq_len tokens, each piece cut at row ends. Returns (segments, new carry)."""
    budget = n_rows * seq_len
    docs, shards, rows = drawn.doc, drawn.shard, drawn.row
    starts, ends = np.zeros(len(docs), dtype=np.int64), drawn.length
    if carry is not None:
        piece, offset = carry
        docs, shards, rows = (np.concatenate([[v], a]) for v, a in
                              ((piece.doc, docs), (piece.shard, shards), (piece.shard_row, rows)))
        starts, ends = np.concatenate([[offset], starts]), np.concatenate([[piece.length], ends])
    sizes = ends - starts
    at = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # where each piece starts in the batch
    keep = at < budget
    docs, shards, rows, starts, ends, sizes, at = (a[keep] for a in (docs, shards, rows, starts, ends, sizes, at))
    take = np.minimum(sizes, budget - at)
    first_row, last_row = at // seq_len, (at + take - 1) // seq_len
    per_piece = last_row - first_row + 1
    j = np.repeat(np.arange(len(docs)), per_piece)
    row = first_row[j] + np.arange(len(j)) - np.repeat(np.cumsum(per_piece) - per_piece, per_piece)
    begin = np.maximum(at[j], row * seq_len)
    finish = np.minimum(at[j] + take[j], (row + 1) * seq_len)
    segments = np.empty((len(j), SEGMENT_COLUMNS), dtype=np.int64)
    segments[:, ROW], segments[:, DOC], segments[:, SHARD], segments[:, SHARD_ROW] = row, docs[j], shards[j], rows[j]
    segments[:, START] = starts[j] + begin - at[j]
    segments[:, END] = segments[:, START] + finish - begin
    new_carry = None
    if len(docs) and take[-1] < sizes[-1]:
        new_carry = (Piece(int(docs[-1]), int(shards[-1]), int(rows[-1]), int(ends[-1])), int(starts[-1] + take[-1]))
    return segments, new_carry


# ---------------------------------------------------------------------------------------------- the planner


def stream_tokens(table: ShardTable, phase: Phase) -> np.ndarray:
    """Each stream's tokens under `phase`, from the manifest: all of them, or none when no document of the
    stream's length bucket can be as short as max_doc_tokens."""
    tokens = table.stream_tokens()
    if phase.max_doc_tokens is not None:
        for k in range(len(table.streams)):
            if table.lowest_length(k) > phase.max_doc_tokens:
                tokens[k] = 0
    return tokens


class WindowPlanner:
    """Plans global batches one after another from a cursor (or from the start)."""

    def __init__(self, table: ShardTable, columns: ColumnSource, cfg: Config, objective: Objective,
                 cursor: Cursor | None = None, warn_epochs: bool = True, read_threads: int = 8):
        self.table = table
        self.columns = columns
        self.cfg = cfg
        self.objective = objective
        self.warn_epochs = warn_epochs
        self.seed = cfg.train.seed
        self.cursor = cursor.copy() if cursor is not None else Cursor(fingerprint=self.fingerprint)
        if self.cursor.fingerprint not in (None, self.fingerprint):
            log.warning("data cursor was made for another dataset or seed (fingerprint %s, now %s): the stream "
                        "continues from the saved positions but does not reproduce the original run",
                        self.cursor.fingerprint, self.fingerprint)
            self.cursor.fingerprint = self.fingerprint
        for key in table.streams:
            self.cursor.streams.setdefault(key, StreamPosition())
        self._windows = _Windows(table, columns, self.seed, cfg.data.shuffle_window_shards, read_threads)
        self._blacklist = np.array(self.cursor.blacklist, dtype=np.int64)
        self._blacklist_version = 0
        self._setup: tuple[int, np.ndarray] | None = None  # (phase, weights)
        self._empty: tuple[tuple, set[int]] = ((), set())  # streams found without a drawable document
        self._current: dict[int, tuple[tuple[int, int], Window]] = {}
        self._carry = self._restore_carry()

    @property
    def fingerprint(self) -> str:
        return f"{self.table.fingerprint}-{self.seed & _MASK64:x}"

    def close(self) -> None:
        self._windows.close()

    # ---- the stream

    def next_batch(self) -> PlannedBatch:
        """The next global batch that is served; batches in skip ranges are planned and passed over."""
        while self.cursor.is_skipped(self.cursor.batch):
            self._plan()
        planned = self._plan()
        self.cursor.step += 1
        return planned

    def skip_batches(self, start: int, end: int) -> None:
        self.cursor.add_skip(start, end)

    def blacklist_documents(self, doc_ids: list[int]) -> None:
        self.cursor.add_blacklist(doc_ids)
        self._blacklist = np.array(self.cursor.blacklist, dtype=np.int64)
        self._blacklist_version += 1
        if self.cursor.carry is not None and self.cursor.carry.doc in set(self.cursor.blacklist):
            self.cursor.carry = None  # the rest of a blacklisted document is dropped too
            self._carry = None

    def epochs(self) -> dict[str, float]:
        """Per source, passes made over its most-read bucket (2.5: half-way through the third pass)."""
        sizes = self.table.stream_docs
        out: dict[str, float] = {}
        for k, (source, bucket) in enumerate(self.table.streams):
            position = self.cursor.streams[(source, bucket)]
            done = position.epoch + (position.pos / sizes[k] if sizes[k] else 0.0)
            out[source] = max(out.get(source, 0.0), done)
        return out

    # ---- planning one batch

    def _plan(self) -> PlannedBatch:
        batch = self.cursor.batch
        phase = phase_index(self.cfg, batch)
        if phase != self.cursor.phase:
            for position in self.cursor.streams.values():
                position.consumed = 0  # each phase balances its own mixture from scratch
            self.cursor.phase = phase
        seq_len, n_rows = self.cfg.seq_len_at(batch), self.cfg.rows_per_global_batch(batch)
        rest = 0 if self._carry is None else self._carry[0].length - self._carry[1]
        drawn = self._draw_tokens(seq_len * n_rows - rest)
        segments, carry = pack_rows(n_rows, seq_len, self._carry, drawn)
        self._carry = carry
        self.cursor.carry = None if carry is None else CursorCarry(carry[0].doc, carry[1], carry[0].length)
        self.cursor.batch += 1
        return PlannedBatch(batch=batch, step=self.cursor.step, phase=phase, seq_len=seq_len, n_rows=n_rows,
                            segments=segments)

    def _weights(self) -> np.ndarray:
        phase_i = self.cursor.phase
        if self._setup is None or self._setup[0] != phase_i:
            phase = self.cfg.data.phases[phase_i]
            weights = stream_weights(phase, self.table.streams, stream_tokens(self.table, phase),
                                     [b.name for b in self.table.buckets], where=f"data.phases[{phase_i}]")
            self._setup = (phase_i, weights)
        return self._setup[1]

    def _draw_tokens(self, need: int) -> Drawn:
        """The fewest next documents of the mixture that hold `need` tokens, in the order the weighted interleave
        draws them: each next document from the stream with the least tokens drawn per unit of share (the
        first on ties). A stream's scores only grow, so that order is all streams' upcoming scores sorted, and
        a batch is drawn with one sort instead of a decision per document."""
        if need <= 0:
            return Drawn.empty()
        keys = self.table.streams
        weights = self._weights()
        key = (self.cursor.phase, self._blacklist_version)
        if self._empty[0] != key:
            self._empty = (key, set())
        empty = self._empty[1]
        mean_length = self.table.stream_tokens() / np.maximum(self.table.stream_docs, 1)
        slack = 1.25
        while True:
            active = [k for k in range(len(weights)) if weights[k] > 0 and k not in empty]
            if not active:
                phase = self.cfg.data.phases[self.cursor.phase]
                raise DataError(f"data.phases[{self.cursor.phase}]: no stream with a share of the mixture has a "
                                f"document that passes the phase's filters (max_doc_tokens={phase.max_doc_tokens}, "
                                f"min_quality={phase.min_quality}) and is not blacklisted; relax the filters")
            share = weights[active] / weights[active].sum()
            upcoming = {}
            for k, w in zip(active, share, strict=True):
                wanted = int(need * w / max(mean_length[k], 1.0) * slack) + 8
                upcoming[k] = self._upcoming(k, wanted)
                if upcoming[k] is None:
                    empty.add(k)
                    if self.warn_epochs:
                        log.warning("data.phases[%d]: no document of source %r (bucket %r) passes the phase's "
                                    "filters or the blacklist; it is left out of the mixture", self.cursor.phase,
                                    *keys[k])
            if any(u is None for u in upcoming.values()):
                continue
            order, stream_of = _interleave({k: (self.cursor.streams[keys[k]].consumed, weights[k], u.length)
                                            for k, u in upcoming.items()})
            lengths = np.concatenate([upcoming[k].length for k in active])[order]
            total = np.cumsum(lengths)
            n = int(np.searchsorted(total, need)) + 1  # the first prefix that holds `need` tokens
            taken = np.bincount(stream_of[:n], minlength=len(weights))
            if n > len(total) or any(taken[k] >= len(upcoming[k].length) for k in active):
                slack *= 2  # a stream's upcoming documents ran out inside the batch: look further ahead
                continue
            for k in active:
                if taken[k]:
                    self._advance(k, upcoming[k], int(taken[k]))
            drawn = Drawn.concat([upcoming[k] for k in active])
            return drawn.take(order[:n])

    def _advance(self, stream: int, upcoming: Drawn, n: int) -> None:
        position = self.cursor.streams[self.table.streams[stream]]
        epoch = int(upcoming.epoch[n - 1])
        for e in range(position.epoch + 1, epoch + 1):
            self._on_new_epoch(stream, e)
        position.epoch, position.pos = epoch, int(upcoming.pos[n - 1])
        position.consumed += int(upcoming.length[:n].sum())

    def _upcoming(self, stream: int, n: int) -> Drawn | None:
        """The stream's next n documents that may be drawn, from its position (which is not moved), or None when
        none of its documents may be."""
        position = self.cursor.streams[self.table.streams[stream]]
        epoch, pos = position.epoch, position.pos
        phase = self.cfg.data.phases[self.cursor.phase]
        key = (self.cursor.phase, self._blacklist_version)
        parts: list[Drawn] = []
        got, passed_without_any, total = 0, 0, int(self.table.stream_docs[stream])
        while got < n:
            layout = self._windows.layout(stream, epoch)
            if pos >= layout.size:
                epoch, pos = epoch + 1, 0
                continue
            w = layout.window_of(pos)
            window = self._window(stream, epoch, w)
            first = int(layout.starts[w])
            hits = np.flatnonzero(window.eligible(key, phase, self._blacklist)[pos - first:])[: n - got] + pos - first
            if len(hits):
                extra = self._extra_tokens(window.doc_id[hits])
                parts.append(Drawn(window.doc_id[hits], window.shard[hits], window.row[hits],
                                   window.length[hits].astype(np.int64) + extra, np.full(len(hits), epoch),
                                   first + hits.astype(np.int64) + 1))
                got += len(hits)
                passed_without_any = 0
            else:
                passed_without_any += int(layout.starts[w + 1]) - pos
                # Two epochs' length in a row always holds one whole epoch: no document of it may be drawn.
                if passed_without_any >= 2 * total:
                    return None
            pos = int(layout.starts[w + 1])
        return Drawn.concat(parts)

    def _extra_tokens(self, doc_ids: np.ndarray) -> np.ndarray:
        if self.objective.name != "fim":
            return np.zeros(len(doc_ids), dtype=np.int64)
        return np.fromiter((self.objective.extra_tokens(int(d)) for d in doc_ids), dtype=np.int64,
                           count=len(doc_ids))

    def _window(self, stream: int, epoch: int, w: int) -> Window:
        """The window being read, kept at hand: asking the read-ahead for it again is only needed when it changes."""
        current = self._current.get(stream)
        if current is None or current[0] != (epoch, w):
            current = self._current[stream] = ((epoch, w), self._windows.get(stream, epoch, w))
        return current[1]

    def _on_new_epoch(self, stream: int, epoch: int) -> None:
        source, bucket = self.table.streams[stream]
        limit = self.cfg.data.epoch_warning
        # Said when the limit is passed, then at every doubling (a tiny source may cycle thousands of times).
        passes = epoch // limit
        if self.warn_epochs and epoch % limit == 0 and passes >= 1 and passes & (passes - 1) == 0:
            log.warning("data: source %r (bucket %r) has been read %d times and starts pass %d, beyond "
                        "data.epoch_warning=%d; its documents repeat — add data or lower its weight",
                        source, bucket, epoch, epoch + 1, limit)

    def _restore_carry(self):
        carry = self.cursor.carry
        if carry is None:
            return None
        expected = shard = row = None
        try:
            found_shard, found_row = self.table.locate(np.array([carry.doc]))
            shard, row = int(found_shard[0]), int(found_row[0])
            columns = self.columns.read(shard)
            if columns is not None:
                expected = int(columns.length[row]) + self.objective.extra_tokens(carry.doc)
        except KeyError:
            pass
        if expected != carry.length or not 0 < carry.offset < carry.length or carry.doc in self.cursor.blacklist:
            log.warning("data cursor: the partly packed document %d (%d tokens) is not in this dataset as "
                        "recorded, or is blacklisted; continuing with the next document", carry.doc, carry.length)
            self.cursor.carry = None
            return None
        return Piece(carry.doc, shard, row, carry.length), carry.offset
