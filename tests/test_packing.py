"""Packing documents into rows and rows into arrays: property tests (no token lost or duplicated, exact
lengths, boundaries, position ids), rank assignment, micro-batches, and efficiency on realistic lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrainer.data.objectives import IGNORE, Objective
from raytrainer.data.packing import (
    DOC,
    END,
    ROW,
    START,
    Piece,
    build_rows,
    fill_rows,
    micro_batch_sizes,
    rank_rows,
)

PAD, EOS = 9_999_999, 9_999_998
CLM = Objective(name="clm", seed=0, eos_id=EOS, pad_id=PAD)

lengths_st = st.lists(st.integers(1, 300), min_size=0, max_size=40)


def source_of(lengths):
    docs = iter(Piece(doc=100 + i, shard=i % 3, shard_row=i, length=n) for i, n in enumerate(lengths))
    return lambda: next(docs, None)


def doc_tokens(doc: int, length: int) -> np.ndarray:
    # Distinct ids per (document, position), ending in EOS, so every token can be traced.
    return np.append(doc * 1000 + np.arange(length - 1), EOS).astype(np.int64)


def rows_needed(lengths, seq_len):
    return math.ceil(sum(lengths) / seq_len) + 1


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(1, 128))
def test_every_token_is_packed_exactly_once_in_order(lengths, seq_len):
    n_rows = rows_needed(lengths, seq_len)
    segs, carry = fill_rows(n_rows, seq_len, source_of(lengths))
    assert carry is None
    # Walking the segments in order retraces the documents in order, each [0, length) exactly once.
    expected = iter((100 + i, n) for i, n in enumerate(lengths))
    doc, length, pos = None, 0, 0
    for seg in segs:
        if doc is None or pos == length:
            assert doc is None or pos == length
            doc, length = next(expected)
            pos = 0
        assert seg[DOC] == doc and seg[START] == pos and seg[END] > seg[START]
        pos = int(seg[END])
    assert next(expected, None) is None and (doc is None or pos == length)
    # Rows are full except at the tail, where the documents ran out.
    fill = np.bincount(segs[:, ROW], weights=segs[:, END] - segs[:, START], minlength=n_rows)
    assert fill.sum() == sum(lengths)
    full_rows = sum(lengths) // seq_len
    assert (fill[:full_rows] == seq_len).all()
    assert (fill[full_rows + 1:] == 0).all()


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(1, 64), cut=st.integers(0, 20))
def test_packing_in_two_calls_with_a_carry_equals_one_call(lengths, seq_len, cut):
    n_rows = rows_needed(lengths, seq_len)
    cut = min(cut, n_rows)
    whole, _ = fill_rows(n_rows, seq_len, source_of(lengths))
    nxt = source_of(lengths)
    first, carry = fill_rows(cut, seq_len, nxt)
    second, _ = fill_rows(n_rows - cut, seq_len, nxt, carry)
    second[:, ROW] += cut
    assert np.array_equal(np.concatenate([first, second]), whole)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(1, 96), row_start=st.integers(0, 3))
def test_arrays_have_exact_tokens_labels_positions_and_doc_ids(lengths, seq_len, row_start):
    n_rows = rows_needed(lengths, seq_len)
    segs, _ = fill_rows(n_rows, seq_len, source_of(lengths))
    length_of = {100 + i: n for i, n in enumerate(lengths)}
    loads = []

    def load(doc, shard, row):
        loads.append(doc)
        return doc_tokens(doc, length_of[doc]), None

    row_start = min(row_start, n_rows - 1)
    rows = n_rows - row_start
    out = build_rows(segs, seq_len, row_start, rows, load, CLM, batch=0)
    assert all(v.shape == (rows, seq_len) for v in out.values())
    assert len(loads) == len(set(loads))  # a document cut across rows is read once per call
    for r in range(rows):
        row_segs = segs[segs[:, ROW] == r + row_start]
        t = 0
        for k, seg in enumerate(row_segs):
            doc, s, e = int(seg[DOC]), int(seg[START]), int(seg[END])
            tokens = doc_tokens(doc, length_of[doc])
            sl = slice(t, t + e - s)
            assert np.array_equal(out["input_ids"][r, sl], tokens[s:e])
            assert np.array_equal(out["position_ids"][r, sl], np.arange(e - s))  # restarts, even when split
            assert (out["doc_ids"][r, sl] == k).all()
            expected_labels = np.append(tokens[s + 1: e + 1], [IGNORE] * (e + 1 - len(tokens)))[: e - s]
            assert np.array_equal(out["labels"][r, sl], expected_labels)
            if e == len(tokens):  # the EOS never predicts the next document's first token
                assert out["labels"][r, t + e - s - 1] == IGNORE
            t += e - s
        if t < seq_len:  # tail padding is one more document, never learned
            assert (out["input_ids"][r, t:] == PAD).all() and (out["labels"][r, t:] == IGNORE).all()
            assert (out["doc_ids"][r, t:] == len(row_segs)).all()
            assert np.array_equal(out["position_ids"][r, t:], np.arange(seq_len - t))


def test_a_document_longer_than_several_rows_is_split_with_labels_across_the_cut():
    segs, carry = fill_rows(3, 4, source_of([10]))
    assert carry is None and segs[:, START].tolist() == [0, 4, 8] and segs[:, END].tolist() == [4, 8, 10]
    out = build_rows(segs, 4, 0, 3, lambda d, s, r: (doc_tokens(d, 10), None), CLM, batch=0)
    # The last token of the first row predicts the first token of the second row (same document).
    assert out["labels"][0, 3] == out["input_ids"][1, 0]
    assert out["labels"][2, 1] == IGNORE and out["input_ids"][2, 1] == EOS
    assert out["labels"][2, 2:].tolist() == [IGNORE, IGNORE]
    assert out["input_ids"][2, 2:].tolist() == [PAD, PAD]


def test_packing_efficiency_on_a_realistic_length_distribution():
    rng = np.random.default_rng(0)
    for seq_len in (512, 2048, 8192):
        # Web-like log-normal lengths (median ~600 tokens, a long tail into the tens of thousands).
        lengths = np.clip(rng.lognormal(6.4, 1.3, size=4000).astype(int), 1, 200_000).tolist()
        n_rows = sum(lengths) // seq_len  # stop before the documents run out (a stream never does)
        segs, _ = fill_rows(n_rows, seq_len, source_of(lengths))
        real = int((segs[:, END] - segs[:, START]).sum())
        assert real == n_rows * seq_len  # every position holds a real token
        ends = int(((segs[:, END] == np.array([lengths[d - 100] for d in segs[:, DOC]]))).sum())
        assert (real - ends) / (n_rows * seq_len) >= 0.99  # positions with a label: all but documents' EOS


@given(n_rows=st.integers(1, 300), world=st.integers(1, 16))
def test_ranks_get_contiguous_disjoint_rows_covering_the_batch(n_rows, world):
    ranges = [rank_rows(n_rows, world, r) for r in range(world)]
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(n_rows))
    assert max(b - a for a, b in ranges) == math.ceil(n_rows / world)


@given(n_rows=st.integers(0, 50), mbs=st.integers(1, 8), extra=st.integers(0, 3))
def test_micro_batches_hold_every_row_and_pad_the_rest(n_rows, mbs, extra):
    accum = math.ceil(n_rows / mbs) + extra
    sizes = micro_batch_sizes(n_rows, mbs, accum)
    assert len(sizes) == accum and sum(sizes) == n_rows and max(sizes, default=0) <= mbs
    assert sizes.count(0) >= extra


def reference_fill_rows(n_rows, seq_len, next_doc, carry=None):
    """Row by row, token counts only: the packing rule in its plainest form."""
    segments = []
    for row in range(n_rows):
        filled = 0
        while filled < seq_len:
            if carry is None:
                piece = next_doc()
                if piece is None:
                    return np.array(segments, dtype=np.int64).reshape(-1, 6), None
                carry = (piece, 0)
            piece, offset = carry
            take = min(seq_len - filled, piece.length - offset)
            segments.append((row, piece.doc, piece.shard, piece.shard_row, offset, offset + take))
            filled += take
            carry = None if offset + take == piece.length else (piece, offset + take)
    return np.array(segments, dtype=np.int64).reshape(-1, 6), carry


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 2000), min_size=0, max_size=30), seq_len=st.integers(1, 128),
       n_rows=st.integers(0, 60), carry_offset=st.integers(0, 500))
def test_fill_rows_equals_the_row_by_row_rule(lengths, seq_len, n_rows, carry_offset):
    carry = None
    if lengths and carry_offset < lengths[0] - 1:  # start inside a document, as after a resume
        carry = (Piece(doc=100, shard=0, shard_row=0, length=lengths[0]), carry_offset + 1)
        lengths = lengths[1:]
    fast, fast_carry = fill_rows(n_rows, seq_len, source_of(lengths), carry)
    slow, slow_carry = reference_fill_rows(n_rows, seq_len, source_of(lengths), carry)
    assert np.array_equal(fast, slow)
    assert fast_carry == slow_carry


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(1, 96), spare_rows=st.integers(0, 2), mlm=st.booleans())
def test_rows_written_into_narrow_arrays_equal_the_int32_ones(lengths, seq_len, spare_rows, mlm):
    # Token ids fit uint16 here; padding rows (spare_rows) take the slow path.
    objective = Objective(name="mlm", seed=3, eos_id=2, pad_id=0, mask_id=1, random_token_limit=1000) if mlm else \
        Objective(name="clm", seed=0, eos_id=2, pad_id=0)
    n_rows = rows_needed(lengths, seq_len) + spare_rows
    segs, _ = fill_rows(n_rows, seq_len, source_of(lengths))
    length_of = {100 + i: n for i, n in enumerate(lengths)}

    def load(doc, shard, row):
        return np.append(3 + (doc * 7 + np.arange(length_of[doc] - 1)) % 900, 2).astype(np.uint16), None

    wide = build_rows(segs, seq_len, 0, n_rows, load, objective, batch=5)
    block = {"input_ids": np.zeros((n_rows + 2, seq_len), np.uint16), "labels": np.zeros((n_rows + 2, seq_len),
             np.int32), "position_ids": np.zeros((n_rows + 2, seq_len), np.uint16),
             "doc_ids": np.zeros((n_rows + 2, seq_len), np.uint16)}
    narrow = build_rows(segs, seq_len, 0, n_rows, load, objective, batch=5,
                        out={k: v[1: 1 + n_rows] for k, v in block.items()})
    for key in wide:
        assert np.array_equal(wide[key], narrow[key].astype(np.int32)), key
        assert (block[key][0] == 0).all() and (block[key][-1] == 0).all()  # nothing written outside its rows


def test_build_rows_refuses_an_unsigned_labels_array():
    segs, _ = fill_rows(1, 4, source_of([4]))
    out = {"input_ids": np.zeros((1, 4), np.uint16), "labels": np.zeros((1, 4), np.uint16),
           "position_ids": np.zeros((1, 4), np.uint16), "doc_ids": np.zeros((1, 4), np.uint16)}
    with pytest.raises(ValueError, match="labels need a signed dtype"):
        build_rows(segs, 4, 0, 1, lambda d, s, r: (doc_tokens(d, 4), None), CLM, batch=0, out=out)
