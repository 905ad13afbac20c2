"""The planner: the same global batches as the plainest reference (random shard sizes, streams,
weights, phases, filters, skips and blacklists), cursors that round-trip anywhere, every world size seeing the
same batches, unreadable shards, and a 10^9-document synthetic manifest planned deep into a run."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_planner import ReferencePlanner, same_batches

from datasets import config, random_docs, write_dataset
from raytrainer.config import Phase
from raytrainer.data.cursor import Cursor, StreamPosition
from raytrainer.data.fs import open_storage
from raytrainer.data.manifest import DataError, LengthBucket, Manifest
from raytrainer.data.objectives import Objective
from raytrainer.data.packing import DOC
from raytrainer.data.pipeline import step_work
from raytrainer.data.plan import Planner
from raytrainer.data.shard_table import ParquetColumns, ShardTable, SyntheticColumns, synthetic_dataset

TOKENIZER = {"name": "byte", "eos_id": 256, "pad_id": 257}
BUCKETS = (LengthBucket("short", 40), LengthBucket("long", None))


def random_table(draw_sizes: list[int], n_sources: int, bucketed: bool) -> ShardTable:
    sources = ("books", "code", "web")[:n_sources]
    buckets = BUCKETS if bucketed else (LengthBucket("all", None),)
    streams = tuple((s, b.name) for s in sources for b in buckets)
    num_docs = np.array(draw_sizes, dtype=np.int64)
    stream = (np.arange(len(num_docs)) % len(streams)).astype(np.int16)
    first = np.concatenate([[0], np.cumsum(num_docs)[:-1]]).astype(np.int64)
    return ShardTable(stream=stream, num_docs=num_docs, num_tokens=num_docs * 30, first_doc=first, streams=streams,
                      buckets=buckets, fingerprint="random")


@st.composite
def scenarios(draw):
    sizes = draw(st.lists(st.integers(0, 25), min_size=1, max_size=30))
    if not sum(sizes):
        sizes[0] = 3
    n_sources = draw(st.integers(1, 3))
    bucketed = draw(st.booleans())
    table = random_table(sizes, n_sources, bucketed)
    # Every stream needs a document: a stream with weight but none cannot be drawn from (tested below).
    present = {int(table.stream[i]) for i in range(len(table)) if table.num_docs[i]}
    if present != set(range(len(table.streams))):
        table = random_table([max(s, 1) for s in sizes] + [1] * len(table.streams), n_sources, bucketed)
    phases = [Phase()]
    if draw(st.booleans()):
        sources = sorted({s for s, _ in table.streams})
        weights = {s: draw(st.sampled_from([0.5, 1.0, 3.0])) for s in sources}
        phases.append(Phase(start_step=draw(st.integers(1, 4)), seq_len=draw(st.sampled_from([None, 16])),
                            source_weights=weights if draw(st.booleans()) else {},
                            max_doc_tokens=draw(st.sampled_from([None, 60, 200])),
                            min_quality=draw(st.sampled_from([None, 0.2]))))
    cfg = config(seq_len=32, global_batch_tokens=32 * draw(st.integers(1, 6)), micro_batch_size=2,
                 seed=draw(st.integers(0, 2**32)), phases=phases, max_workers=1,
                 shuffle_window_shards=draw(st.integers(1, 5)))
    skips = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(1, 3)), max_size=2))
    blacklist_at = draw(st.sampled_from([None, 2, 5]))
    return table, cfg, skips, blacklist_at


@given(scenarios())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_planner_equals_the_reference(scenario):
    table, cfg, skips, blacklist_at = scenario
    columns = SyntheticColumns(table, seed=3, mean_length=30)
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    ours, ref = Planner(table, columns, cfg, objective), ReferencePlanner(table, columns, cfg, objective)
    for start, n in skips:
        ours.skip_batches(start, start + n)
        ref.skip_batches(start, start + n)
    got, want = [], []
    for i in range(12):
        if i == blacklist_at:
            victims = sorted({int(d) for d in want[-1].segments[:, DOC]})[:2]
            ours.blacklist_documents(victims)
            ref.blacklist_documents(victims)
        try:
            want.append(ref.next_batch())
        except DataError:  # everything blacklisted: the window planner says so too
            with pytest.raises(DataError, match="no stream .* is not blacklisted"):
                ours.next_batch()
            return
        got.append(ours.next_batch())
    assert same_batches(got, want)
    assert ours.epochs() == pytest.approx(ref.epochs())


@given(scenarios(), st.integers(1, 10))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_cursor_saved_anywhere_continues_the_same_stream(scenario, at):
    table, cfg, skips, _ = scenario
    columns = SyntheticColumns(table, seed=3, mean_length=30)
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    whole = Planner(table, columns, cfg, objective)
    for start, n in skips:
        whole.skip_batches(start, start + n)
    saved = None
    batches = []
    for i in range(at + 6):
        if i == at:
            saved = whole.cursor.to_dict()
        batches.append(whole.next_batch())
    resumed = Planner(table, columns, cfg, objective, Cursor.from_dict(saved))
    assert same_batches([resumed.next_batch() for _ in range(6)], batches[at:])


@pytest.mark.parametrize("world_size", [1, 2, 4, 16])
def test_every_world_size_sees_the_same_global_batches(world_size):
    table, columns = synthetic_dataset(200, 50, seed=1, sources=("web", "code"), buckets=BUCKETS, mean_length=30)
    cfg = config(seq_len=64, global_batch_tokens=64 * 32, phases=[Phase(), Phase(start_step=3, seq_len=32)])
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    reference = Planner(table, columns, cfg, objective)
    ranks = [Planner(table, columns, cfg, objective) for _ in range(world_size)]  # one planner per rank
    for _ in range(6):
        planned = reference.next_batch()
        rows = []
        for rank, planner in enumerate(ranks):
            work = step_work(planner.next_batch(), rank, world_size)
            if work is not None:
                rows.append(work.segments)
        assert np.array_equal(np.concatenate(rows), planned.segments)


def test_a_stream_no_document_of_which_passes_the_filters_is_named():
    table, columns = synthetic_dataset(8, 10, seed=1, sources=("web", "code"), mean_length=30)
    cfg = config(seq_len=32, global_batch_tokens=32 * 4, phases=[Phase(min_quality=2.0)])
    planner = Planner(table, columns, cfg, Objective.from_config(cfg.data, 0, TOKENIZER))
    with pytest.raises(DataError, match=r"data.phases\[0\]: no stream .* min_quality=2.0"):
        planner.next_batch()


def test_an_unreadable_shard_fails_naming_it_or_is_left_out(tmp_path):
    rng = np.random.default_rng(2)
    root = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 120, mean_length=100)}, docs_per_shard=20)
    manifest = Manifest.load(str(root))
    lost = manifest.shards[2]
    (root / lost.path).unlink()
    table = ShardTable.from_manifest(manifest)
    cfg = config(seq_len=64, global_batch_tokens=64 * 8, shuffle_window_shards=2)
    objective = Objective.from_config(cfg.data, 0, manifest.tokenizer)
    failing = Planner(table, ParquetColumns(open_storage(str(root)), manifest, "fail"), cfg, objective)
    with pytest.raises(DataError, match=f"shard .*{lost.path}: missing.*data.on_bad_shard=skip"):
        for _ in range(40):
            failing.next_batch()
    columns = ParquetColumns(open_storage(str(root)), manifest, "skip")
    skipping = Planner(table, columns, cfg, objective)
    drawn = {int(d) for _ in range(40) for d in skipping.next_batch().segments[:, DOC]}
    first = int(table.first_doc[2])
    assert drawn.isdisjoint(range(first, first + lost.num_docs)) and len(drawn) == 100
    assert columns.dropped == {lost.path}


def test_a_billion_documents_plan_deep_into_a_run_in_flat_memory():
    """10^5 shards, 10^9 documents (generated lengths, no token data), the llama-8b shapes: ranks 0 and 1,023
    of 1,024 plan from a cursor at step 10^6 as fast as from the start, in well under a GB."""
    from raytrainer.config import load_config

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table, columns = synthetic_dataset(10**5, 10**4, seed=0, sources=("web", "code", "books"))
    assert table.num_documents > 0.99e9
    cfg = load_config("llama-8b", [])
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    per_stream = table.stream_docs
    deep = Cursor(batch=10**6, step=10**6, fingerprint=None, streams={
        key: StreamPosition(epoch=0, pos=int(per_stream[k]) // 2, consumed=0) for k, key in enumerate(table.streams)})
    timings = {}
    for name, cursor in (("start", None), ("deep", deep)):
        t0 = time.perf_counter()
        planner = Planner(table, columns, cfg, objective, cursor)
        batch = planner.next_batch()
        timings[name] = time.perf_counter() - t0
        for rank in (0, 1023):
            work = step_work(batch, rank, 1024)
            assert work is None or work.n_rows <= batch.n_rows
    assert batch.batch == 10**6 and batch.segments[:, DOC].min() > 0
    assert timings["deep"] < 3 * timings["start"] + 1.0, timings
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    assert grown_gb < 1.0, grown_gb
