"""Packing documents into fixed-length rows, and turning packed rows into token arrays.

A row is `seq_len` input positions. Documents (each ending in EOS) are laid end to end; one that does not
fit in what remains of a row is cut, and its rest starts the next row (position ids restart there). So
rows are full and padding appears only when the documents run out (the tail of a finite unit).

A packed row is described by segments, one per piece of a document, as int64 rows of a table:

    ROW   row index in the global batch
    DOC   document id
    SHARD, SHARD_ROW   where the document is stored (index into manifest.shards, row in that shard)
    START, END         the piece is tokens [START, END) of the document as packed

Token arrays (one row each): input_ids = doc[START:END]; labels = doc[START+1:END+1], -100 at the
document's last token (no prediction crosses a boundary); position_ids restart at 0 at every segment;
doc_ids number the segments of the row 0, 1, ...; tail padding is one more document with pad ids and
ignored labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raytrainer.data.objectives import IGNORE, Objective

ROW, DOC, SHARD, SHARD_ROW, START, END = range(6)
SEGMENT_COLUMNS = 6
ARRAY_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


@dataclass(frozen=True)
class Piece:
    """A document entering the packer."""

    doc: int
    shard: int
    shard_row: int
    length: int  # tokens as packed (after the objective's per-document transform)


Carry = tuple[Piece, int]  # a document and how many of its tokens are already packed


def fill_rows(n_rows: int, seq_len: int, next_doc: Callable[[], Piece | None], carry: Carry | None = None
              ) -> tuple[np.ndarray, Carry | None]:
    """Pack `n_rows` rows of `seq_len` tokens, starting with the rest of `carry`, then documents from
    `next_doc()` (None: no more documents; the rest is padding). Returns (segments, new carry).

    Works a document at a time: a long document's whole rows are laid out in one vector operation, so
    planning costs per document, not per row."""
    if n_rows < 0 or seq_len <= 0:
        raise ValueError(f"n_rows={n_rows} must be >= 0 and seq_len={seq_len} > 0")
    blocks: list[np.ndarray] = []
    pending: list[tuple[int, int, int, int, int, int]] = []
    row = filled = 0
    while row < n_rows:
        if carry is None:
            piece = next_doc()
            if piece is None:
                break
            if piece.length <= 0:
                raise ValueError(f"document {piece.doc} has length {piece.length}; it must be >= 1")
            carry = (piece, 0)
        piece, offset = carry
        # What fits in the current row ...
        take = min(seq_len - filled, piece.length - offset)
        pending.append((row, piece.doc, piece.shard, piece.shard_row, offset, offset + take))
        offset += take
        filled += take
        if filled == seq_len:
            row, filled = row + 1, 0
        # ... then whole rows of the same document (only once the current row is full) ...
        whole = min((piece.length - offset) // seq_len, n_rows - row)
        if whole > 0:
            if pending:
                blocks.append(np.array(pending, dtype=np.int64))
                pending = []
            starts = offset + seq_len * np.arange(whole, dtype=np.int64)
            block = np.empty((whole, SEGMENT_COLUMNS), dtype=np.int64)
            block[:] = (0, piece.doc, piece.shard, piece.shard_row, 0, 0)
            block[:, ROW] = row + np.arange(whole)
            block[:, START] = starts
            block[:, END] = starts + seq_len
            blocks.append(block)
            offset += whole * seq_len
            row += whole
        # ... and the rest, which starts the next row.
        rest = piece.length - offset
        if rest > 0 and row < n_rows:
            pending.append((row, piece.doc, piece.shard, piece.shard_row, offset, offset + rest))
            offset += rest
            filled = rest
        carry = None if offset == piece.length else (piece, offset)
    if pending:
        blocks.append(np.array(pending, dtype=np.int64))
    segments = np.concatenate(blocks) if blocks else np.zeros((0, SEGMENT_COLUMNS), dtype=np.int64)
    return segments, carry


# --------------------------------------------------------------------------- rows to arrays


DocLoader = Callable[[int, int, int], tuple[np.ndarray, np.ndarray | None]]


def build_rows(segments: np.ndarray, seq_len: int, row_start: int, n_rows: int, load_doc: DocLoader,
               objective: Objective, batch: int, out: dict[str, np.ndarray] | None = None
               ) -> dict[str, np.ndarray]:
    """Token arrays ([n_rows, seq_len]) for global rows [row_start, row_start + n_rows) of batch `batch`.
    `segments` holds at least those rows' segments, in row order (ROW is the global row index);
    load_doc(doc, shard, shard_row) -> (document as packed, learnable mask or None).

    Written into `out` when given (C-contiguous arrays of that shape, in any integer dtypes wide enough:
    a pipeline packs many steps straight into one block); otherwise into new int32 arrays."""
    shape = (n_rows, seq_len)
    in_range = (segments[:, ROW] >= row_start) & (segments[:, ROW] < row_start + n_rows)
    mine = segments[in_range]
    rows = mine[:, ROW] - row_start
    if len(rows) > 1 and (np.diff(rows) < 0).any():
        raise ValueError("segments must be in row order")
    lengths = mine[:, END] - mine[:, START]
    fill = np.bincount(rows, weights=lengths, minlength=n_rows).astype(np.int64)
    if (fill > seq_len).any():
        r = int(np.argmax(fill > seq_len))
        raise ValueError(f"row {r + row_start} of batch {batch} overflows: {fill[r]} tokens > "
                         f"seq_len {seq_len}")
    if out is None:
        out = {key: np.empty(shape, dtype=np.int32) for key in ARRAY_KEYS}
    _check_out(out, shape)

    # Gather the pieces (views into the shards' token arrays), then place them with a few vector operations.
    docs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # a document cut across rows is loaded once
    inputs, targets, masks = [], [], []
    for i, (_, doc, shard, shard_row, start, end) in enumerate(mine.tolist()):
        if doc not in docs:
            docs[doc] = load_doc(doc, shard, shard_row)
        tokens, learnable = docs[doc]
        if end > len(tokens):
            raise ValueError(f"segment [{start}, {end}) of document {doc} is past its {len(tokens)} tokens; "
                             "the shard does not match the plan (was the dataset rewritten?)")
        inputs.append(tokens[start:end])
        targets.append(tokens[start + 1: end + 1])
        if end == len(tokens):
            targets.append(_NO_TARGET)  # the document's last token (its EOS) predicts nothing
        if learnable is not None:
            masks.append((i, learnable[start:end]))
    total = int(lengths.sum())
    # Full rows (always, unless the documents ran out) are the flat arrays themselves: written in place.
    full = bool((fill == seq_len).all())
    flats = {key: out[key].reshape(-1) if full else np.empty(total, dtype=np.int32) for key in ARRAY_KEYS}
    if inputs:
        np.concatenate(inputs, out=flats["input_ids"], casting="unsafe")
        np.concatenate(targets, out=flats["labels"], casting="unsafe")
    begin = np.cumsum(lengths) - lengths  # each segment's offset in the flat arrays
    for i, keep in masks:
        flats["labels"][begin[i]: begin[i] + lengths[i]][~keep] = IGNORE
    index = np.arange(len(mine))
    row_first = np.maximum.accumulate(np.where(np.r_[True, rows[1:] != rows[:-1]], index, 0)) if len(mine) \
        else index
    offset_in_flat = np.arange(total) - np.repeat(begin, lengths)
    np.copyto(flats["position_ids"], offset_in_flat, casting="unsafe")
    np.copyto(flats["doc_ids"], np.repeat(index - row_first, lengths), casting="unsafe")

    if not full:
        out["input_ids"][...] = objective.pad_id
        out["labels"][...] = IGNORE
        out["position_ids"][...] = 0
        out["doc_ids"][...] = 0
        within_row = begin - begin[row_first] if len(mine) else begin
        destination = np.repeat(rows * seq_len + within_row, lengths) + offset_in_flat
        for key, flat in flats.items():
            out[key].reshape(-1)[destination] = flat
        column = np.arange(seq_len)[None, :]
        padding = column >= fill[:, None]  # tail padding: one more document of pad ids
        out["position_ids"][padding] = (column - fill[:, None])[padding]
        count = np.bincount(rows, minlength=n_rows)
        out["doc_ids"][padding] = np.broadcast_to(count[:, None], shape)[padding]
    if objective.name == "mlm":
        real = np.arange(seq_len)[None, :] < fill[:, None]
        for r in range(n_rows):
            objective.transform_row(batch, row_start + r, out["input_ids"][r], out["labels"][r], real[r])
    return out


def _check_out(out: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
    for key in ARRAY_KEYS:
        array = out.get(key)
        if array is None or array.shape != shape or not array.flags.c_contiguous:
            raise ValueError(f"build_rows(out=...): {key!r} must be a C-contiguous array of shape {shape}")
    if not np.issubdtype(out["labels"].dtype, np.signedinteger):
        raise ValueError(f"build_rows(out=...): labels need a signed dtype to hold {IGNORE}, "
                         f"not {out['labels'].dtype}")


_NO_TARGET = np.array([IGNORE], dtype=np.int32)


# --------------------------------------------------------------------------- ranks and micro-batches


def rank_rows(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous rows [start, end) of a global batch that `rank` trains on (ceil division; the last
    ranks may get fewer rows, or none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    per_rank = math.ceil(n_rows / world_size)
    start = min(n_rows, rank * per_rank)
    return start, min(n_rows, start + per_rank)


def micro_batch_sizes(n_rows: int, micro_batch_size: int, accumulation_steps: int) -> list[int]:
    """Rows in each of `accumulation_steps` micro-batches; 0 marks a padding micro-batch (all ignored)."""
    if n_rows > micro_batch_size * accumulation_steps:
        raise ValueError(f"{n_rows} rows do not fit in {accumulation_steps} micro-batches of "
                         f"{micro_batch_size} rows")
    sizes = []
    left = n_rows
    for _ in range(accumulation_steps):
        take = min(micro_batch_size, left)
        sizes.append(take)
        left -= take
    return sizes
