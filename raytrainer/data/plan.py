"""The global batch stream as a pure function of (manifest, seed, curriculum, global batch size in tokens),
planned with memory that grows with the shards being read, not with the corpus.

    planner = Planner(table, columns, cfg, objective, cursor=None)   # ShardTable, ParquetColumns
    batch = planner.next_batch()     # PlannedBatch: global batch index, seq_len, rows as segments
    planner.cursor.to_dict()         # the position after it (JSON)

Streams. Every (source, length bucket) pair is a stream, read in the order `raytrainer.data.order` gives: its
shards in a seeded order per epoch, documents shuffled within windows of `data.shuffle_window_shards` shards.
Documents that the active phase filters out (length > max_doc_tokens, quality < min_quality; a document
without a quality score passes), that are blacklisted, or that sit in a shard left out as unreadable
(data.on_bad_shard=skip) are passed over where they would have been drawn. A cursor holds each stream's
(epoch, position), so seeking to step 10^6 reads what seeking to step 10 reads: the windows at the cursor.

Mixture. Phase weights give every stream a share: a source's share is its `source_weights` entry (or its
token count when source_weights is empty; a source left out of a non-empty source_weights is not used),
split among its buckets by `bucket_weights` (or by their token counts when empty). Token counts are the
manifest's: a stream's whole count, or none when the phase's max_doc_tokens is below its length bucket. The
next document comes from the stream with the least tokens drawn in this phase per unit of share (ties: the
first stream), a deterministic weighted interleave whose token shares stay within one document of the
targets. A stream none of whose documents may be drawn is left out of the mixture, with a warning.

Packing. Documents fill rows of seq_len tokens back to back (see `raytrainer.data.packing`); a document cut
at a row end continues in the next row, which may be in the next global batch (or the next phase: a
document already started is finished even if the new phase's filters would not have drawn it). A batch is
drawn and packed with vector operations (`_interleave`, `pack_rows`): the same rows `fill_rows` gives.

Indices. Phases switch by global batch index: batch n uses the phase with the largest start_step <= n, its
seq_len (Config.seq_len_at(n)) and Config.rows_per_global_batch(n) rows. A skipped batch [a, b) is planned
as usual (it consumes its documents) but never served, so every later batch is exactly the batch of the
uninterrupted stream; training steps count served batches, so after a skip the training step and the batch
index differ by the number of batches skipped before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from raytrainer.config import Config, Phase
from raytrainer.data.cursor import Carry as CursorCarry
from raytrainer.data.cursor import Cursor, StreamPosition
from raytrainer.data.manifest import DataError
from raytrainer.data.objectives import Objective
from raytrainer.data.order import Window, WindowReader
from raytrainer.data.packing import DOC, END, ROW, SEGMENT_COLUMNS, SHARD, SHARD_ROW, START, Carry, Piece
from raytrainer.data.shard_table import ColumnSource, ShardTable

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class PlannedBatch:
    batch: int  # index in the global batch stream
    step: int  # index among served batches (the training step)
    phase: int
    seq_len: int
    n_rows: int
    segments: np.ndarray  # int64 [n, 6], see raytrainer.data.packing

    @property
    def documents(self) -> list[int]:
        """Ids of the documents (or pieces of them) in this global batch."""
        return sorted({int(d) for d in np.unique(self.segments[:, 1])})


def phase_index(cfg: Config, batch: int) -> int:
    """Index of the phase that global batch `batch` belongs to."""
    starts = [p.start_step for p in cfg.data.phases]
    return max(i for i, s in enumerate(starts) if s <= batch)


def stream_weights(phase: Phase, streams: tuple[tuple[str, str], ...], tokens: np.ndarray,
                   bucket_names: list[str], where: str) -> np.ndarray:
    """Each stream's share of the tokens (sums to 1) under `phase`, given the tokens that pass its filters."""
    sources = sorted({s for s, _ in streams})
    for name in phase.source_weights:
        if name not in sources:
            raise DataError(f"{where}.source_weights names source {name!r}, which the dataset does not have "
                            f"(sources: {sources})")
    for name in phase.bucket_weights:
        if name not in bucket_names:
            raise DataError(f"{where}.bucket_weights names bucket {name!r}, which the dataset does not have "
                            f"(length buckets: {bucket_names})")
    weights = np.zeros(len(streams), dtype=np.float64)
    source_tokens = {s: sum(float(t) for (src, _), t in zip(streams, tokens, strict=True) if src == s)
                     for s in sources}
    source_share = {s: (phase.source_weights.get(s, 0.0) if phase.source_weights else source_tokens[s])
                    for s in sources}
    for s in sources:
        if source_share[s] > 0 and source_tokens[s] == 0:
            log.warning("%s: source %r has weight %g but no document passes the filters; it is left out",
                        where, s, source_share[s])
            source_share[s] = 0.0
    total = sum(source_share.values())
    if total <= 0:
        raise DataError(f"{where}: no document passes the phase's filters with a positive weight "
                        f"(source_weights={phase.source_weights}, bucket_weights={phase.bucket_weights}, "
                        f"max_doc_tokens={phase.max_doc_tokens}, min_quality={phase.min_quality})")
    for s in sources:
        members = [i for i, (src, _) in enumerate(streams) if src == s and tokens[i] > 0]
        shares = np.array([phase.bucket_weights.get(streams[i][1], 0.0) if phase.bucket_weights
                           else float(tokens[i]) for i in members])
        if source_share[s] == 0 or not len(members):
            continue
        if shares.sum() <= 0:
            log.warning("%s: source %r gets weight %g but none of its buckets with documents %s has a bucket "
                        "weight; it is left out", where, s, source_share[s], [streams[i][1] for i in members])
            continue
        weights[members] = source_share[s] / total * shares / shares.sum()
    if weights.sum() <= 0:
        raise DataError(f"{where}: the bucket weights {phase.bucket_weights} leave no stream with documents")
    return weights / weights.sum()


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


def stream_tokens(table: ShardTable, phase: Phase) -> np.ndarray:
    """Each stream's tokens under `phase`, from the manifest: all of them, or none when no document of the
    stream's length bucket can be as short as max_doc_tokens."""
    tokens = table.stream_tokens()
    if phase.max_doc_tokens is not None:
        for k in range(len(table.streams)):
            if table.lowest_length(k) > phase.max_doc_tokens:
                tokens[k] = 0
    return tokens


class Planner:
    """Plans global batches one after another from a cursor (or from the start)."""

    def __init__(self, table: ShardTable, columns: ColumnSource, cfg: Config, objective: Objective,
                 cursor: Cursor | None = None, warn_epochs: bool = True):
        self.table = table
        self.columns = columns
        self.cfg = cfg
        self.objective = objective
        self.warn_epochs = warn_epochs
        self.seed = cfg.train.seed
        self.cursor = cursor.copy() if cursor is not None else Cursor(fingerprint=self.fingerprint)
        if self.cursor.fingerprint not in (None, self.fingerprint):
            log.warning("data cursor was made for another dataset or seed, or by an earlier data order (fingerprint "
                        "%s, now %s): the stream continues from the saved positions but does not reproduce the "
                        "original run",
                        self.cursor.fingerprint, self.fingerprint)
            self.cursor.fingerprint = self.fingerprint
        for key in table.streams:
            self.cursor.streams.setdefault(key, StreamPosition())
        self._windows = WindowReader(table, columns, self.seed, cfg.data.shuffle_window_shards)
        self._blacklist = np.array(self.cursor.blacklist, dtype=np.int64)
        self._blacklist_version = 0
        self._setup: tuple[int, np.ndarray] | None = None  # (phase, weights)
        self._empty: tuple[tuple, set[int]] = ((), set())  # streams found without a drawable document
        self._current: dict[int, tuple[tuple[int, int], Window]] = {}
        self._mean_length = table.stream_tokens() / np.maximum(table.stream_docs, 1)  # tokens per document
        self._carry = self._restore_carry()

    @property
    def fingerprint(self) -> str:
        # "w": the windowed order; a cursor of the earlier whole-corpus order is told apart (and warned about)
        return f"w{self.table.fingerprint}-{self.seed & _MASK64:x}"

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
        mean_length = self._mean_length
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
                wanted = int(need * w / max(mean_length[k], 1.0) * slack) + 2
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
