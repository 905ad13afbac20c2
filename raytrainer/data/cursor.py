"""The data cursor: the position in the global batch stream after any step, small and JSON-serialisable.

    {"version": 1, "fingerprint": "3f2a...",      # the documents and seed it was made for
     "batch": 1207,                               # next global batch index in the stream
     "step": 1200,                                # global batches served so far (= the next training step)
     "phase": 1,                                  # curriculum phase the mixture counters belong to
     "streams": {"web": {"short": {"epoch": 2, "pos": 913, "consumed": 48211}}, ...},
     "carry": {"doc": 5521, "offset": 1790, "length": 4096} | null,   # a document cut at a row end
     "skip": [[40, 48], [1100, 1107]],            # global batches [a, b) planned but never served
     "blacklist": [17, 5521]}                     # document ids never drawn again

`pos` is the position of the next document in the stream's permutation for `epoch`; `consumed` counts the
tokens the stream has contributed in the current phase (the weighted interleave compares consumed/weight).
Restoring a cursor re-creates the permutations from (seed, source, bucket, epoch), so the rest of the stream
is reproduced exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from raytrainer.data.manifest import DataError

CURSOR_VERSION = 1


@dataclass
class StreamPosition:
    epoch: int = 0
    pos: int = 0  # next position in this epoch's permutation
    consumed: int = 0  # tokens drawn in the current phase


@dataclass
class Carry:
    """The document being packed when a row filled up: `offset` of its `length` tokens are already out."""

    doc: int
    offset: int
    length: int  # packed length (after the objective's per-document transform)


@dataclass
class Cursor:
    batch: int = 0
    step: int = 0
    phase: int = 0
    streams: dict[tuple[str, str], StreamPosition] = field(default_factory=dict)
    carry: Carry | None = None
    skip: list[tuple[int, int]] = field(default_factory=list)
    blacklist: tuple[int, ...] = ()
    fingerprint: str | None = None

    def copy(self) -> Cursor:
        return copy.deepcopy(self)

    def is_skipped(self, batch: int) -> bool:
        return any(a <= batch < b for a, b in self.skip)

    def add_skip(self, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"skip range [{start}, {end}) must satisfy 0 <= start <= end")
        if end > start:
            self.skip = merge_ranges([*self.skip, (start, end)])

    def add_blacklist(self, doc_ids: Iterable[int]) -> None:
        self.blacklist = tuple(sorted(set(self.blacklist) | {int(d) for d in doc_ids}))

    # ---- JSON

    def to_dict(self) -> dict[str, Any]:
        streams: dict[str, dict[str, dict[str, int]]] = {}
        for (source, bucket), p in sorted(self.streams.items()):
            streams.setdefault(source, {})[bucket] = {"epoch": p.epoch, "pos": p.pos, "consumed": p.consumed}
        carry = None
        if self.carry is not None:
            carry = {"doc": self.carry.doc, "offset": self.carry.offset, "length": self.carry.length}
        return {
            "version": CURSOR_VERSION,
            "fingerprint": self.fingerprint,
            "batch": self.batch,
            "step": self.step,
            "phase": self.phase,
            "streams": streams,
            "carry": carry,
            "skip": [[a, b] for a, b in self.skip],
            "blacklist": list(self.blacklist),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = "data cursor") -> Cursor:
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
        version = raw.get("version")
        if version != CURSOR_VERSION:
            raise DataError(f"{where}: version {version!r} is not {CURSOR_VERSION}; it was written by "
                            "another version of raytrainer.data and cannot be resumed exactly")
        try:
            streams = {
                (source, bucket): StreamPosition(int(p["epoch"]), int(p["pos"]), int(p["consumed"]))
                for source, buckets in raw["streams"].items()
                for bucket, p in buckets.items()
            }
            carry = raw.get("carry")
            cursor = cls(
                batch=int(raw["batch"]),
                step=int(raw["step"]),
                phase=int(raw["phase"]),
                streams=streams,
                carry=None if carry is None else Carry(int(carry["doc"]), int(carry["offset"]),
                                                       int(carry["length"])),
                skip=merge_ranges((int(a), int(b)) for a, b in raw.get("skip", [])),
                blacklist=tuple(sorted({int(d) for d in raw.get("blacklist", [])})),
                fingerprint=raw.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed cursor ({type(e).__name__}: {e}); expected the fields "
                            "written by Cursor.to_dict()") from None
        if min(cursor.batch, cursor.step, cursor.phase) < 0 or cursor.step > cursor.batch:
            raise DataError(f"{where}: batch={cursor.batch}, step={cursor.step}, phase={cursor.phase} must "
                            "be non-negative with step <= batch")
        return cursor


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-empty half-open ranges covering the same batches."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
