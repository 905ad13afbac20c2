"""Which documents `prepare` holds out for validation: decided by a hash of each document's tokens, so the
split depends on the documents alone (not on their order, the workers, or the shard size), and a document
is never in both splits.

A document is held out when its hash (in [0, 1)) is below `fraction`. When that gives fewer than
`min_tokens`, the documents with the next-smallest hashes are held out too until it does, but never past
MAX_TOPUP_SHARE of all tokens (a small corpus keeps most of itself for training): while the stream runs,
those candidates wait in a reserve of at most about `min_tokens` tokens, the rest go to training.
"""

from __future__ import annotations

import hashlib
import heapq

import numpy as np
import pyarrow as pa

DEFAULT_VAL_FRACTION = 0.005
MIN_VAL_TOKENS = 8192
MAX_TOPUP_SHARE = 0.1


def document_hashes(table: pa.Table) -> np.ndarray:
    """A number in [0, 1) per row, from the bytes of its tokens."""
    tokens = table.column("tokens").combine_chunks()
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy(zero_copy_only=False)
    raw = values.astype(values.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    width = values.dtype.itemsize
    out = np.empty(len(offsets) - 1, dtype=np.float64)
    for i in range(len(out)):
        digest = hashlib.blake2b(raw[offsets[i] * width: offsets[i + 1] * width].tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


class Holdout:
    def __init__(self, fraction: float = DEFAULT_VAL_FRACTION, min_tokens: int = MIN_VAL_TOKENS):
        if not 0 <= fraction < 1:
            raise ValueError(f"validation fraction {fraction} must be in [0, 1)")
        self.fraction = fraction
        self.min_tokens = min_tokens if fraction > 0 else 0
        self.val_tokens = 0
        self.total_tokens = 0
        self._reserve: list[tuple[float, int, pa.Table]] = []  # max-heap on the hash: (-hash, seq, row)
        self._reserve_tokens = 0
        self._seq = 0

    def split(self, table: pa.Table) -> tuple[pa.Table | None, pa.Table | None]:
        """(rows for training, rows for validation) decided now; the rest wait in the reserve."""
        if self.fraction == 0 or table.num_rows == 0:
            return table, None
        hashes = document_hashes(table)
        lengths = table.column("length").to_numpy()
        self.total_tokens += int(lengths.sum())
        held = hashes < self.fraction
        self.val_tokens += int(lengths[held].sum())
        direct = np.zeros(table.num_rows, dtype=bool)  # rows that go straight to training
        released: list[pa.Table] = []
        for i in np.flatnonzero(~held):
            if not self._wanted_more() and not (self._reserve and hashes[i] < -self._reserve[0][0]):
                direct[i] = True
                continue
            heapq.heappush(self._reserve, (-float(hashes[i]), self._seq, table.slice(int(i), 1)))
            self._seq += 1
            self._reserve_tokens += int(lengths[i])
            released += self._shrink()
        released += self._shrink()
        train = [table.filter(pa.array(direct))] if direct.any() else []
        train += released
        val = table.filter(pa.array(held)) if held.any() else None
        return (pa.concat_tables(train) if train else None), val

    def finish(self) -> tuple[pa.Table | None, pa.Table | None]:
        """The reserve: the smallest hashes go to validation until it holds min_tokens (within the top-up
        limit), the rest to training."""
        rows = sorted(self._reserve, key=lambda e: -e[0])
        self._reserve, self._reserve_tokens = [], 0
        limit = MAX_TOPUP_SHARE * self.total_tokens
        val, train = [], []
        for _, _, row in rows:
            n = int(row.column("length")[0].as_py())
            if self.val_tokens < self.min_tokens and self.val_tokens + n <= limit:
                val.append(row)
                self.val_tokens += n
            else:
                train.append(row)
        return (pa.concat_tables(train) if train else None), (pa.concat_tables(val) if val else None)

    def _wanted_more(self) -> bool:
        return self.val_tokens + self._reserve_tokens < self.min_tokens

    def _shrink(self) -> list[pa.Table]:
        """Release the largest-hash candidates the reserve no longer needs."""
        out = []
        while self._reserve:
            need = self.min_tokens - self.val_tokens
            top_tokens = int(self._reserve[0][2].column("length")[0].as_py())
            if self._reserve_tokens - top_tokens < need:
                break
            _, _, row = heapq.heappop(self._reserve)
            self._reserve_tokens -= top_tokens
            out.append(row)
        return out
