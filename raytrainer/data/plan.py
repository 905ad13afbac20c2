"""The global batch stream as a pure function of (dataset, seed, curriculum, global batch size in tokens).

    planner = Planner(index, cfg, objective, cursor=None)
    batch = planner.next_batch()     # PlannedBatch: global batch index, seq_len, rows as segments
    planner.cursor.to_dict()         # the position after it (JSON)

Streams. Every (source, length bucket) pair is a stream. Each epoch of a stream visits all its documents
in a seeded order: the stream's shards are shuffled, then the documents of each window of
`data.shuffle_window_shards` consecutive shards are shuffled together (so a reader needs only that many
shards of a stream at a time; with at least as many shards in the window as the stream has, this is a
plain permutation). The order depends only on (seed, source, bucket, epoch). Documents that the active
phase filters out (length > max_doc_tokens, quality < min_quality; a document without a quality score
passes) or that are blacklisted are passed over where they would have been drawn.

Mixture. Phase weights give every stream a share: a source's share is its `source_weights` entry (or its
token count when source_weights is empty; a source left out of a non-empty source_weights is not used),
split among its buckets by `bucket_weights` (or by their token counts when empty); token counts are those
that pass the phase's filters. The next document comes from the stream with the least tokens drawn in this
phase per unit of share (ties: the first stream), a deterministic weighted interleave whose token shares
stay within one document of the targets.

Packing. Documents fill rows of seq_len tokens back to back (see `raytrainer.data.packing`); a document cut
at a row end continues in the next row, which may be in the next global batch (or the next phase: a
document already started is finished even if the new phase's filters would not have drawn it).

Indices. Phases switch by global batch index: batch n uses the phase with the largest start_step <= n, its
seq_len (Config.seq_len_at(n)) and Config.rows_per_global_batch(n) rows. A skipped batch [a, b) is planned
as usual (it consumes its documents) but never served, so every later batch is exactly the batch of the
uninterrupted stream; training steps count served batches, so after a skip the training step and the batch
index differ by the number of batches skipped before it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from raytrainer.config import Config, Phase
from raytrainer.data.cursor import Carry, Cursor, StreamPosition
from raytrainer.data.index import DocIndex
from raytrainer.data.manifest import DataError
from raytrainer.data.objectives import Objective
from raytrainer.data.packing import Piece, fill_rows

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_SCAN = 256  # permutation entries checked at once when passing over filtered documents


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


def _stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


def epoch_order(index: DocIndex, stream: int, seed: int, epoch: int, window_shards: int) -> np.ndarray:
    """Index positions of a stream's documents in the order epoch `epoch` visits them."""
    shards = index.stream_shards(stream)
    if not shards:
        return np.zeros(0, dtype=np.int64)
    source, bucket = index.streams[stream]
    rng = np.random.default_rng([seed & _MASK64, _stable_hash(source, bucket), epoch])
    order = rng.permutation(len(shards))
    windows = [rng.permutation(np.concatenate([shards[i] for i in order[w: w + window_shards]]))
               for w in range(0, len(order), window_shards)]
    order = np.concatenate(windows)
    return order.astype(np.int32) if len(index) < 2**31 else order


class Planner:
    """Plans global batches one after another from a cursor (or from the start)."""

    def __init__(self, index: DocIndex, cfg: Config, objective: Objective, cursor: Cursor | None = None,
                 warn_epochs: bool = True):
        self.index = index
        self.warn_epochs = warn_epochs  # every rank plans the same stream; one of them says so
        self.cfg = cfg
        self.objective = objective
        self.seed = cfg.train.seed
        self.cursor = cursor.copy() if cursor is not None else Cursor(fingerprint=self.fingerprint)
        if self.cursor.fingerprint not in (None, self.fingerprint):
            log.warning("data cursor was made for another dataset or seed (fingerprint %s, now %s): the "
                        "stream continues from the saved positions but does not reproduce the original run",
                        self.cursor.fingerprint, self.fingerprint)
            self.cursor.fingerprint = self.fingerprint
        for key in index.streams:
            self.cursor.streams.setdefault(key, StreamPosition())
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # stream -> (epoch, order)
        self._setup: tuple[int, np.ndarray, np.ndarray] | None = None  # (phase, eligible, weights)
        self._carry = self._restore_carry()

    @property
    def fingerprint(self) -> str:
        return f"{self.index.fingerprint}-{self.seed & _MASK64:x}"

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
        if self.cursor.carry is not None and self.cursor.carry.doc in set(self.cursor.blacklist):
            self.cursor.carry = None  # the rest of a blacklisted document is dropped too
            self._carry = None
        self._setup = None

    def epochs(self) -> dict[str, float]:
        """Per source, passes made over its most-read bucket (2.5: half-way through the third pass)."""
        out: dict[str, float] = {}
        for k, (source, bucket) in enumerate(self.index.streams):
            position = self.cursor.streams[(source, bucket)]
            size = len(self._order(k, position.epoch))
            done = position.epoch + (position.pos / size if size else 0.0)
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
            self._setup = None
        seq_len, n_rows = self.cfg.seq_len_at(batch), self.cfg.rows_per_global_batch(batch)
        segments, carry = fill_rows(n_rows, seq_len, self._next_piece, self._carry)
        self._carry = carry
        self.cursor.carry = None if carry is None else Carry(carry[0].doc, carry[1], carry[0].length)
        self.cursor.batch += 1
        return PlannedBatch(batch=batch, step=self.cursor.step, phase=phase, seq_len=seq_len, n_rows=n_rows,
                            segments=segments)

    def _next_piece(self) -> Piece:
        _, eligible, weights = self._phase_setup()
        keys = self.index.streams
        # The stream furthest behind its share (first on ties). A handful of streams: plain Python beats
        # numpy's per-call overhead, and this runs once per document.
        stream, behind = 0, math.inf
        for k, weight in enumerate(weights.tolist()):
            if weight > 0:
                score = self.cursor.streams[keys[k]].consumed / weight
                if score < behind:
                    stream, behind = k, score
        p = self._draw(stream, eligible)
        doc = int(self.index.doc_id[p])
        length = int(self.index.length[p]) + self.objective.extra_tokens(doc)
        self.cursor.streams[keys[stream]].consumed += length
        return Piece(doc, int(self.index.shard[p]), int(self.index.row[p]), length)

    def _draw(self, stream: int, eligible: np.ndarray) -> int:
        position = self.cursor.streams[self.index.streams[stream]]
        for _ in range(3):  # the rest of this epoch, then a whole one, always holds an eligible document
            order = self._order(stream, position.epoch)
            if position.pos < len(order) and eligible[order[position.pos]]:  # the usual case, without a scan
                position.pos += 1
                return int(order[position.pos - 1])
            while position.pos < len(order):
                window = order[position.pos: position.pos + _SCAN]
                hits = np.flatnonzero(eligible[window])
                if len(hits):
                    position.pos += int(hits[0]) + 1
                    return int(window[hits[0]])
                position.pos += len(window)
            position.epoch += 1
            position.pos = 0
            self._on_new_epoch(stream, position.epoch)
        raise RuntimeError(f"stream {self.index.streams[stream]} has weight but no eligible document")

    def _on_new_epoch(self, stream: int, epoch: int) -> None:
        source, bucket = self.index.streams[stream]
        limit = self.cfg.data.epoch_warning
        # Said when the limit is passed, then at every doubling (a tiny source may cycle thousands of times).
        passes = epoch // limit
        if self.warn_epochs and epoch % limit == 0 and passes >= 1 and passes & (passes - 1) == 0:
            log.warning("data: source %r (bucket %r) has been read %d times and starts pass %d, beyond "
                        "data.epoch_warning=%d; its documents repeat — add data or lower its weight",
                        source, bucket, epoch, epoch + 1, limit)

    def _order(self, stream: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(stream)
        if cached is None or cached[0] != epoch:
            order = epoch_order(self.index, stream, self.seed, epoch, self.cfg.data.shuffle_window_shards)
            cached = self._orders[stream] = (epoch, order)
        return cached[1]

    def _phase_setup(self) -> tuple[int, np.ndarray, np.ndarray]:
        phase_i = self.cursor.phase
        if self._setup is not None and self._setup[0] == phase_i:
            return self._setup
        phase = self.cfg.data.phases[phase_i]
        index = self.index
        eligible = np.ones(len(index), dtype=bool)
        if phase.max_doc_tokens is not None:
            eligible &= index.length <= phase.max_doc_tokens
        if phase.min_quality is not None:
            eligible &= ~(index.quality < phase.min_quality)  # NaN (no score) passes
        if self.cursor.blacklist:
            eligible[index.positions(list(self.cursor.blacklist))] = False
        tokens = np.bincount(index.stream, weights=np.where(eligible, index.length, 0),
                             minlength=len(index.streams))
        weights = stream_weights(phase, index.streams, tokens, index.manifest.bucket_names(),
                                 where=f"data.phases[{phase_i}]")
        self._setup = (phase_i, eligible, weights)
        return self._setup

    def _restore_carry(self):
        carry = self.cursor.carry
        if carry is None:
            return None
        found = self.index.positions([carry.doc])
        p = int(found[0]) if len(found) else None
        expected = None if p is None else int(self.index.length[p]) + self.objective.extra_tokens(carry.doc)
        if expected != carry.length or not 0 < carry.offset < carry.length or carry.doc in self.cursor.blacklist:
            log.warning("data cursor: the partly packed document %d (%d tokens) is not in this dataset as "
                        "recorded, or is blacklisted; continuing with the next document", carry.doc, carry.length)
            self.cursor.carry = None
            return None
        return Piece(carry.doc, int(self.index.shard[p]), int(self.index.row[p]), carry.length), carry.offset
