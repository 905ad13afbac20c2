"""The global batch stream: deterministic, resumable mid-epoch and mid-document, identical at any world size,
phases, mixture, filters, skip ranges and blacklists that survive the cursor, epochs, bad shards."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets import Doc, config, random_docs, write_dataset
from raytrainer.config import Phase
from raytrainer.data.cursor import Cursor, merge_ranges
from raytrainer.data.feed import DataFeed
from raytrainer.data.fs import open_storage
from raytrainer.data.manifest import DataError, Manifest
from raytrainer.data.objectives import Objective
from raytrainer.data.order import epoch_layout, load_window
from raytrainer.data.packing import DOC, END, START
from raytrainer.data.plan import Planner
from raytrainer.data.shard_table import ParquetColumns, ShardTable


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(11)
    sources = {
        "books": random_docs(rng, 60, mean_length=500),
        "code": random_docs(rng, 40, mean_length=300, quality=False),
        "web": random_docs(rng, 120, mean_length=200),
    }
    return write_dataset(tmp_path_factory.mktemp("plan") / "ds", sources, docs_per_shard=20)


def planner(root, cfg, cursor=None) -> Planner:
    manifest = Manifest.load(str(root))
    objective = Objective.from_config(cfg.data, cfg.train.seed, manifest.tokenizer)
    return Planner(ShardTable.from_manifest(manifest), ParquetColumns(open_storage(str(root)), manifest), cfg,
                   objective, None if cursor is None else Cursor.from_dict(cursor))


class Docs:
    """Every document's source, bucket, shard, length and quality, by id (for checking what the plan drew)."""

    def __init__(self, root):
        manifest = Manifest.load(str(root))
        columns = ParquetColumns(open_storage(str(root)), manifest)
        self.table = ShardTable.from_manifest(manifest)
        parts = [columns.read(i) for i in range(len(self.table))]
        self.length = np.concatenate([p.length for p in parts])
        self.quality = np.concatenate([p.quality for p in parts])
        self.shard = np.repeat(np.arange(len(self.table)), self.table.num_docs)
        self.stream = self.table.stream[self.shard]
        self.source = np.array([self.table.streams[k][0] for k in self.stream])

    def of_stream(self, source: str, bucket: str) -> list[int]:
        return np.flatnonzero(self.stream == self.table.streams.index((source, bucket))).tolist()


def plan(root, cfg, n, cursor=None):
    p = planner(root, cfg, cursor)
    return [p.next_batch() for _ in range(n)], p


def global_rows(feeds) -> list[dict[str, np.ndarray]]:
    """One step from every rank's feed: the real (not padding) rows, concatenated in rank order."""
    parts = []
    accumulations = set()
    for feed in feeds:
        micro = feed.next_step()
        accumulations.add(len(micro))
        for mb in micro:
            if (mb["labels"] == -100).all() and (mb["input_ids"] == 257).all():
                continue  # a padding micro-batch
            parts.append(mb)
    assert len(accumulations) == 1  # every rank runs the same number of micro-steps
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def same_batches(a, b) -> bool:
    pairs = zip(a, b, strict=True)
    return all(x.batch == y.batch and np.array_equal(x.segments, y.segments) for x, y in pairs)


def test_same_cursor_same_batches_and_the_seed_matters(dataset):
    cfg = config()
    first, p = plan(dataset, cfg, 30)
    second, _ = plan(dataset, cfg, 30)
    assert same_batches(first, second)
    other, _ = plan(dataset, config(seed=8), 30)
    assert not same_batches(first, other)
    cursor = p.cursor.to_dict()
    assert json.loads(json.dumps(cursor)) == cursor
    assert Cursor.from_dict(cursor).to_dict() == cursor


def test_resumed_stream_equals_the_uninterrupted_one_mid_epoch_and_mid_document(tmp_path):
    rng = np.random.default_rng(3)
    sources = {"web": random_docs(rng, 30, mean_length=100), "books": random_docs(rng, 20, mean_length=300)}
    dataset = write_dataset(tmp_path / "ds", sources, docs_per_shard=8)
    cfg = config(seq_len=64, global_batch_tokens=64 * 4)
    whole = DataFeed(cfg, str(dataset), use_ray=False)
    steps = [whole.next_step() for _ in range(60)]
    cursors = []
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    for _ in range(60):
        feed.next_step()
        cursors.append(feed.cursor())
    # A cursor in the middle of a document and in the middle of some stream's epoch, and a later one
    # after some stream wrapped into its second epoch.
    mid_doc = next(i for i, c in enumerate(cursors) if c["carry"] and c["carry"]["offset"] > 0)
    wrapped = next(i for i, c in enumerate(cursors)
                   if any(p["epoch"] > 0 for b in c["streams"].values() for p in b.values()))
    for at in (0, mid_doc, wrapped):
        resumed = DataFeed(cfg, str(dataset), cursor=json.loads(json.dumps(cursors[at])), use_ray=False)
        for k in range(at + 1, 60):
            got = resumed.next_step()
            for a, b in zip(got, steps[k], strict=True):
                assert all(np.array_equal(a[key], b[key]) for key in a)


def test_small_dataset_wraps_epochs_and_each_epoch_visits_every_document_once(tmp_path, caplog):
    rng = np.random.default_rng(5)
    root = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 30, mean_length=40, max_length=120)},
                         docs_per_shard=7)
    cfg = config(seq_len=32, global_batch_tokens=32 * 4, epoch_warning=2)
    docs = Docs(root)
    with caplog.at_level(logging.WARNING, logger="raytrainer.data.plan"):
        batches, p = plan(root, cfg, 80)
    starts = [int(s[DOC]) for b in batches for s in b.segments if s[START] == 0]
    short = docs.of_stream("web", "short")
    n = len(short)
    assert p.epochs()["web"] > 3
    # Only the "short" stream exists here (every document <= 512 tokens): each epoch is a permutation.
    first, second = starts[:n], starts[n:2 * n]
    assert sorted(first) == sorted(short) == sorted(second) and first != second
    assert any("starts pass 3" in r.message and "data.epoch_warning=2" in r.message for r in caplog.records)


def test_windowed_shuffle_is_a_permutation_that_keeps_windows_together(dataset):
    docs = Docs(dataset)
    manifest = Manifest.load(str(dataset))
    columns = ParquetColumns(open_storage(str(dataset)), manifest)
    stream = docs.table.streams.index(("web", "short"))

    def epoch(window_shards: int, number: int = 0) -> np.ndarray:
        layout = epoch_layout(docs.table, stream, 1, number, window_shards)
        windows = [load_window(docs.table, layout, stream, 1, number, w,
                               [columns.read(int(s)) for s in layout.window_shard_ids(w)])
                   for w in range(len(layout.starts) - 1)]
        return np.concatenate([w.doc_id for w in windows])

    for window in (1, 2, 16):
        assert sorted(epoch(window).tolist()) == docs.of_stream("web", "short")
    shards = docs.shard[epoch(1)]
    assert (np.diff(shards) != 0).sum() == len(np.unique(shards)) - 1  # one shard after another
    assert not np.array_equal(epoch(1), epoch(1, number=1))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_world_size_sees_the_same_global_batches(dataset, world):
    # 10 rows per global batch: uneven splits (4 ranks: 3, 3, 3, 1 rows) need padding micro-batches.
    cfg = config(seq_len=32, global_batch_tokens=32 * 10, micro_batch_size=2)
    single = [DataFeed(cfg, str(dataset), 0, 1, use_ray=False)]
    ranks = [DataFeed(cfg, str(dataset), r, world, use_ray=False) for r in range(world)]
    for _ in range(12):
        a, b = global_rows(single), global_rows(ranks)
        assert a["input_ids"].shape == (10, 32)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    expected_micro = cfg.accumulation_steps(0, world)
    assert all(len(f.next_step()) == expected_micro for f in ranks)


def test_phase_switch_changes_seq_len_rows_weights_and_filters(dataset):
    phases = [Phase(), Phase(start_step=6, seq_len=128, max_doc_tokens=200, source_weights={"web": 1})]
    cfg = config(seq_len=64, global_batch_tokens=512, phases=phases)
    batches, p = plan(dataset, cfg, 30)
    assert [(b.seq_len, b.n_rows, b.phase) for b in batches[:6]] == [(64, 8, 0)] * 6
    assert [(b.seq_len, b.n_rows, b.phase) for b in batches[6:]] == [(128, 4, 1)] * 24
    docs = Docs(dataset)
    docs_after = [int(s[DOC]) for b in batches[7:] for s in b.segments if s[START] == 0]
    assert (docs.length[docs_after] <= 200).all()
    assert set(docs.source[docs_after]) == {"web"}
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    shapes = [feed.next_step()[0]["input_ids"].shape for _ in range(8)]
    assert shapes[5] == (2, 64) and shapes[6] == (2, 128)


def token_shares(batches, docs: Docs) -> dict[str, float]:
    tokens: dict[str, int] = {}
    for b in batches:
        for seg in b.segments:
            source = str(docs.source[seg[DOC]])
            tokens[source] = tokens.get(source, 0) + int(seg[END] - seg[START])
    total = sum(tokens.values())
    return {k: v / total for k, v in tokens.items()}


def test_mixture_follows_source_weights_and_defaults_to_token_proportions(dataset):
    docs = Docs(dataset)
    weighted = config(seq_len=64, global_batch_tokens=1024,
                      phases=[Phase(source_weights={"web": 3, "books": 1, "code": 0})])
    shares = token_shares(plan(dataset, weighted, 60)[0], docs)
    assert abs(shares["web"] - 0.75) < 0.03 and abs(shares["books"] - 0.25) < 0.03 and "code" not in shares
    natural = {s: docs.length[docs.source == s].sum() for s in ("web", "books", "code")}
    total = sum(natural.values())
    shares = token_shares(plan(dataset, config(seq_len=64, global_batch_tokens=1024), 50)[0], docs)
    for s, n in natural.items():
        assert abs(shares[s] - n / total) < 0.04
    buckets = config(seq_len=64, global_batch_tokens=1024, phases=[Phase(bucket_weights={"short": 1})])
    drawn = [int(s[DOC]) for b in plan(dataset, buckets, 40)[0][1:] for s in b.segments if s[START] == 0]
    assert (docs.length[drawn] <= 512).all()


def test_filters_drop_long_and_low_quality_documents_but_keep_unscored_ones(dataset):
    docs = Docs(dataset)
    cfg = config(phases=[Phase(max_doc_tokens=300, min_quality=0.5)])
    batches, _ = plan(dataset, cfg, 60)
    drawn = [int(s[DOC]) for b in batches for s in b.segments]
    assert (docs.length[drawn] <= 300).all()
    quality = docs.quality[drawn]
    assert (np.isnan(quality) | (quality >= 0.5)).all() and np.isnan(quality).any()


def test_unknown_source_in_weights_is_an_error_naming_the_phase(dataset):
    cfg = config(phases=[Phase(source_weights={"wbe": 1})])
    with pytest.raises(DataError, match=r"data.phases\[0\].source_weights names source 'wbe'.*'web'"):
        plan(dataset, cfg, 1)


def test_skipped_batches_are_consumed_and_later_batches_equal_the_uninterrupted_stream(dataset):
    cfg = config()
    whole, _ = plan(dataset, cfg, 30)
    p = planner(dataset, cfg)
    p.skip_batches(5, 9)
    p.skip_batches(12, 13)
    served = [p.next_batch() for _ in range(20)]
    expected = [b for b in whole if not (5 <= b.batch < 9 or b.batch == 12)][:20]
    assert same_batches(served, expected)
    assert [b.step for b in served] == list(range(20))  # training steps count served batches only


def test_skip_ranges_and_blacklist_survive_a_cursor_round_trip(dataset):
    cfg = config()
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    for _ in range(3):
        feed.next_step()
    feed.skip_batches(6, 10)
    feed.skip_batches(1, 2)  # already past: changes nothing ahead, but is remembered
    bad = feed.last_documents()
    feed.blacklist_documents(bad)
    cursor = json.loads(json.dumps(feed.cursor()))
    assert cursor["skip"] == [[1, 2], [6, 10]] and cursor["blacklist"] == sorted(bad)
    expected = [feed.next_step() for _ in range(8)]
    indices = [feed.batch_index]
    resumed = DataFeed(cfg, str(dataset), cursor=cursor, use_ray=False)
    served_batches = []
    for want in expected:
        got = resumed.next_step()
        served_batches.append(resumed.batch_index)
        for a, b in zip(got, want, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert served_batches == [3, 4, 5, 10, 11, 12, 13, 14] and indices[-1] == 14
    p = planner(dataset, cfg, cursor)
    for _ in range(40):
        assert not set(p.next_batch().documents) & set(bad)


def test_blacklisting_the_document_being_packed_drops_its_rest(dataset):
    cfg = config()
    p = planner(dataset, cfg)
    while p.cursor.carry is None or p.cursor.carry.offset == 0:
        p.next_batch()
    doc = p.cursor.carry.doc
    p.blacklist_documents([doc])
    assert p.cursor.carry is None
    assert all(doc not in p.next_batch().documents for _ in range(20))


def test_rollback_rebuilds_the_feed_from_an_old_cursor_and_applies_skips(dataset):
    cfg = config()
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    feed.next_step()
    feed.next_step()
    checkpoint = feed.cursor()
    reference = [feed.next_step() for _ in range(10)]  # batches 2..11
    rebuilt = DataFeed(cfg, str(dataset), cursor=checkpoint, use_ray=False)
    rebuilt.skip_batches(3, 6)
    got = [rebuilt.next_step() for _ in range(5)]  # batches 2, 6, 7, 8, 9
    for g, want in zip(got, [reference[0], *reference[4:8]], strict=True):
        assert all(np.array_equal(g[0][k], want[0][k]) for k in g[0])


def test_unreadable_shard_fails_naming_the_file_or_is_left_out(tmp_path, caplog):
    rng = np.random.default_rng(2)
    root = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 60, mean_length=100)}, docs_per_shard=20)
    manifest = Manifest.load(str(root))
    broken = manifest.shards[1].path
    (root / broken).write_bytes(b"not parquet at all")
    # The plan reads a shard's columns when it reaches the shard's window (here the first: all shards).
    with pytest.raises(DataError, match=rf"shard .*{broken}: cannot be read.*on_bad_shard=skip"):
        DataFeed(config(), str(root), use_ray=False).next_step()
    cfg = config(on_bad_shard="skip")
    feed = DataFeed(cfg, str(root), use_ray=False)
    with caplog.at_level(logging.WARNING, logger="raytrainer.data.shard_table"):
        feed.next_step()
    assert feed.dropped_shards == (broken,)
    assert sum(f"leaving out shard {root / broken}" in r.message for r in caplog.records) == 1
    lost = range(int(feed.table.first_doc[1]), int(feed.table.first_doc[1]) + manifest.shards[1].num_docs)
    for _ in range(20):
        feed.next_step()
        assert not set(feed.last_documents()) & set(lost)


def test_malformed_cursor_is_rejected_with_what_is_wrong():
    with pytest.raises(DataError, match="version None"):
        Cursor.from_dict({"batch": 3})
    bad = Cursor().to_dict()
    bad["streams"] = {"web": {"short": {"epoch": 1}}}
    with pytest.raises(DataError, match="malformed cursor"):
        Cursor.from_dict(bad)
    assert merge_ranges([(5, 7), (1, 2), (6, 9), (3, 3)]) == [(1, 2), (5, 9)]


def test_documents_with_identical_tokens_are_still_distinct_documents(tmp_path):
    same = np.array([1, 2, 3, 256])
    root = write_dataset(tmp_path / "ds", {"web": [Doc(same.copy(), 0.5) for _ in range(10)]})
    batches, _ = plan(root, config(seq_len=8, global_batch_tokens=16, max_workers=1), 3)
    assert sorted({d for b in batches for d in b.documents}) == list(range(10))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stop=st.integers(0, 40), skips=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 6)), max_size=3),
       seq_len=st.sampled_from([16, 32, 64]), phase_at=st.integers(1, 50))
def test_resuming_from_any_cursor_continues_the_same_stream(dataset, stop, skips, seq_len, phase_at):
    phases = [Phase(), Phase(start_step=phase_at, seq_len=2 * seq_len, min_quality=0.3)]
    cfg = config(seq_len=seq_len, global_batch_tokens=seq_len * 8, phases=phases)
    p = planner(dataset, cfg)
    for a, n in skips:
        p.skip_batches(a, a + n)
    for _ in range(stop):
        p.next_batch()
    cursor = json.loads(json.dumps(p.cursor.to_dict()))
    resumed = planner(dataset, cfg, cursor)
    assert same_batches([p.next_batch() for _ in range(15)], [resumed.next_batch() for _ in range(15)])


def test_a_cursor_from_another_dataset_warns_and_still_continues(dataset, tmp_path, caplog):
    rng = np.random.default_rng(8)
    other = write_dataset(tmp_path / "other", {"web": random_docs(rng, 20, mean_length=50)})
    cfg = config()
    _, p = plan(dataset, cfg, 5)
    assert p.cursor.carry is not None
    with caplog.at_level(logging.WARNING, logger="raytrainer.data.plan"):
        moved = planner(other, cfg, p.cursor.to_dict())
    assert any("made for another dataset or seed, or by an earlier data order" in r.message for r in caplog.records)
    assert moved.cursor.carry is None  # the cut document of the first dataset means nothing here
    feed = DataFeed(cfg, str(other), cursor=p.cursor.to_dict(), use_ray=False)
    assert len(feed.next_step()) == cfg.accumulation_steps(5, 1) and feed.batch_index == 5
