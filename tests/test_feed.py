"""DataFeed: the batch format of the contract, tokens traced back to the shards, FIM/SFT/MLM through the
stream, padding micro-batches, and (slow) the Ray Data pipeline and S3 giving identical tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets import EOS, PAD, config, documents_by_id, random_docs, write_dataset
from raytrainer.config import Phase
from raytrainer.data.feed import DataFeed
from raytrainer.data.packing import DOC, END, ROW, START
from raytrainer.data.pipeline import RayStepStream, materialise, step_work
from raytrainer.data.plan import Planner

IGNORE = -100


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(21)
    docs = {"web": random_docs(rng, 80, mean_length=150), "books": random_docs(rng, 30, mean_length=600)}
    for d in docs["web"][::3]:  # instruction-style documents: a prompt, then the response
        d.prompt_length = max(1, len(d.tokens) // 3)
    root = tmp_path_factory.mktemp("feed") / "ds"
    return write_dataset(root, docs, docs_per_shard=16, with_prompt_length=True)


@pytest.fixture(scope="module")
def docs(dataset):
    return documents_by_id(dataset)


def rows_of(micro_batches) -> dict[str, torch.Tensor]:
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def test_micro_batches_follow_the_contract_and_hold_the_shards_tokens(dataset, docs):
    cfg = config(seq_len=64, global_batch_tokens=64 * 8, micro_batch_size=3)
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    for _ in range(25):
        micro = feed.next_step()
        assert [mb["input_ids"].shape for mb in micro] == [(3, 64), (3, 64), (2, 64)]
        assert len(micro) == cfg.accumulation_steps(0, 1)
        assert all(set(mb) == {"input_ids", "labels", "position_ids", "doc_ids"} for mb in micro)
        assert all(t.dtype == torch.int64 and t.device.type == "cpu" for mb in micro for t in mb.values())
        rows = {k: v.numpy() for k, v in rows_of(micro).items()}
        plan = feed.last_plan
        at = np.zeros(plan.n_rows, dtype=int)
        for seg in plan.segments:
            r, tokens = int(seg[ROW]), docs[int(seg[DOC])].tokens
            s, e = int(seg[START]), int(seg[END])
            span = slice(at[r], at[r] + e - s)
            assert np.array_equal(rows["input_ids"][r, span], tokens[s:e])
            want = np.append(tokens[s + 1:e + 1], [IGNORE] * (e + 1 - len(tokens)))[: e - s]
            assert np.array_equal(rows["labels"][r, span], want)  # CLM: next token, -100 after the EOS
            assert rows["position_ids"][r, at[r]] == 0
            at[r] += e - s
        assert (at == 64).all()  # rows are full: no padding in a stream that never ends
        # Attention rule: a row's doc_ids only grow, and position ids restart exactly where they change.
        changes = np.diff(rows["doc_ids"], axis=1) != 0
        assert (np.diff(rows["doc_ids"], axis=1) >= 0).all()
        assert np.array_equal(changes, rows["position_ids"][:, 1:] == 0)


def test_short_ranks_get_all_ignored_padding_micro_batches(dataset):
    # 10 rows on 4 ranks: 3, 3, 3 and 1.
    cfg = config(seq_len=32, global_batch_tokens=32 * 10, micro_batch_size=2)
    last = DataFeed(cfg, str(dataset), rank=3, world_size=4, use_ray=False)
    first = DataFeed(cfg, str(dataset), rank=0, world_size=4, use_ray=False)
    micro, full = last.next_step(), first.next_step()
    assert len(micro) == len(full) == cfg.accumulation_steps(0, 4) == 2
    assert micro[0]["input_ids"].shape == (1, 32) and (micro[0]["labels"] != IGNORE).any()
    pad = micro[1]
    assert (pad["labels"] == IGNORE).all() and (pad["input_ids"] == PAD).all()
    assert (pad["doc_ids"] == 0).all() and pad["position_ids"][0].tolist() == list(range(32))


def test_a_group_sharing_its_rows_reads_them_once_and_trains_on_the_same_batches(dataset, monkeypatch):
    """Tensor-parallel ranks share their rows: the reader's step goes to the others, who read nothing."""
    cfg = config(seq_len=32, global_batch_tokens=32 * 8, micro_batch_size=2)
    sent = []

    def share(item):
        if item is not None:
            sent.append(item)
        return sent[-1]

    reader = DataFeed(cfg, str(dataset), rank=1, world_size=2, use_ray=False, share=share, reads=True)
    other = DataFeed(cfg, str(dataset), rank=1, world_size=2, use_ray=False, share=share, reads=False)
    alone = DataFeed(cfg, str(dataset), rank=1, world_size=2, use_ray=False)
    monkeypatch.setattr(other, "_read_item", lambda: pytest.fail("a rank that does not read read its rows"))
    for _ in range(3):
        mine, theirs, own = reader.next_step(), other.next_step(), alone.next_step()
        for a, b, c in zip(mine, theirs, own, strict=True):
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
        assert other.cursor() == reader.cursor() == alone.cursor()
        assert other.last_rows == reader.last_rows
    assert len(sent) == 3


def test_fim_through_the_stream_packs_the_transformed_documents(dataset, docs):
    cfg = config(seq_len=64, global_batch_tokens=64 * 8, objective="fim", fim_rate=0.5)
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    transformed, seen = 0, set()
    for _ in range(30):
        rows = {k: v.numpy() for k, v in rows_of(feed.next_step()).items()}
        plan = feed.last_plan
        at = np.zeros(plan.n_rows, dtype=int)
        for seg in plan.segments:
            doc, r, s, e = int(seg[DOC]), int(seg[ROW]), int(seg[START]), int(seg[END])
            packed, _ = feed.objective.document(doc, docs[doc].tokens)
            assert np.array_equal(rows["input_ids"][r, at[r]: at[r] + e - s], packed[s:e])
            if s == 0:
                seen.add(doc)
                transformed += len(packed) == len(docs[doc].tokens) + 3
            at[r] += e - s
        assert (at == 64).all()  # the planner packed the transformed lengths exactly
    assert 0.25 < transformed / len(seen) < 0.75


def test_sft_masks_prompt_targets_of_documents_with_a_prompt_length(dataset, docs):
    cfg = config(seq_len=64, global_batch_tokens=64 * 8, objective="sft")
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    checked = 0
    for _ in range(30):
        rows = {k: v.numpy() for k, v in rows_of(feed.next_step()).items()}
        at = np.zeros(feed.last_plan.n_rows, dtype=int)
        for seg in feed.last_plan.segments:
            doc, r, s, e = int(seg[DOC]), int(seg[ROW]), int(seg[START]), int(seg[END])
            labels = rows["labels"][r, at[r]: at[r] + e - s]
            targets = np.arange(s, e) + 1  # position j predicts token j + 1
            prompt = docs[doc].prompt_length or 0
            assert (labels[targets < prompt] == IGNORE).all()
            learned = (targets >= prompt) & (targets < len(docs[doc].tokens))
            assert np.array_equal(labels[learned], docs[doc].tokens[targets[learned]])
            checked += prompt > s + 1
            at[r] += e - s
    assert checked > 5


def test_mlm_global_batches_are_identical_at_any_world_size(dataset):
    cfg = config(seq_len=32, global_batch_tokens=32 * 8, micro_batch_size=2, objective="mlm")
    single = DataFeed(cfg, str(dataset), use_ray=False)
    pair = [DataFeed(cfg, str(dataset), r, 2, use_ray=False) for r in range(2)]
    for _ in range(5):
        one = rows_of(single.next_step())
        two = [rows_of(f.next_step()) for f in pair]
        for k in one:
            assert torch.equal(one[k], torch.cat([two[0][k], two[1][k]]))
        selected = one["labels"] != IGNORE
        assert 0.05 < selected.float().mean() < 0.3
        assert not selected[one["input_ids"] == EOS].any()


@pytest.mark.parametrize("use_ray", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_shard_lost_mid_run_fails_the_step_naming_the_file(tmp_path, use_ray, request):
    if use_ray:
        request.getfixturevalue("local_ray")
    rng = np.random.default_rng(4)
    root = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 40, mean_length=100)}, docs_per_shard=10)
    feed = DataFeed(config(), str(root), use_ray=use_ray)
    for path in root.rglob("*.parquet"):
        path.unlink()
    # Whichever notices first: the plan reading the window's columns, or the reader of the tokens.
    with pytest.raises(Exception, match=r"shard .*/web/short/shard-00000\d.parquet: (not found|missing)"):
        feed.next_step()
    feed.close()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ray_pipeline_gives_the_local_paths_tensors(dataset, local_ray):
    phases = [Phase(), Phase(start_step=12, seq_len=64, source_weights={"web": 1, "books": 2})]
    cfg = config(seq_len=32, global_batch_tokens=32 * 10, micro_batch_size=2, objective="fim", phases=phases)
    for rank in range(2):
        on_ray = DataFeed(cfg, str(dataset), rank, 2)
        local = DataFeed(cfg, str(dataset), rank, 2, use_ray=False)
        assert on_ray.use_ray
        for step in range(30):
            if step == 15:  # a rollback-style change restarts planning from the last step taken
                for feed in (on_ray, local):
                    feed.skip_batches(17, 20)
                    feed.blacklist_documents(feed.last_documents()[:2])
            a, b = on_ray.next_step(), local.next_step()
            assert len(a) == len(b) and on_ray.batch_index == local.batch_index
            for x, y in zip(a, b, strict=True):
                assert all(torch.equal(x[k], y[k]) for k in x)
            assert on_ray.cursor() == local.cursor()
        assert isinstance(on_ray._stream, RayStepStream)  # made by Ray Data tasks, not in this process
        on_ray.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ray_stream_across_many_small_windows(dataset, local_ray):
    cfg = config(seq_len=32, global_batch_tokens=32 * 10, micro_batch_size=2)
    feed = DataFeed(cfg, str(dataset), 1, 3, use_ray=False)
    stream = RayStepStream(Planner(feed.table, feed.columns, cfg, feed.objective), feed.spec, 1, 3, prefetch_batches=1,
                           chunk_tokens=64, max_chunk_steps=2, window_chunks=3)
    reference = Planner(feed.table, feed.columns, cfg, feed.objective)
    try:
        for _ in range(30):
            item = stream.next()
            planned = reference.next_batch()
            assert item.planned.batch == planned.batch and item.cursor == reference.cursor.to_dict()
            want = materialise(feed.spec, step_work(planned, 1, 3))
            assert all(np.array_equal(item.arrays[k], want[k]) for k in want)
    finally:
        stream.close()


@pytest.mark.slow
def test_dataset_on_s3_streams_the_same_batches(dataset, s3_server, s3_url):
    from raytrainer.data.fs import open_storage

    s3 = s3_server.s3_config()
    storage = open_storage(s3_url, s3)
    for path in dataset.rglob("*"):
        if path.is_file():
            storage.write_bytes(str(path.relative_to(dataset)), path.read_bytes())
    cfg = config()
    remote = DataFeed(cfg.model_copy(update={"data": cfg.data.model_copy(update={"s3": s3})}), s3_url,
                      use_ray=False)
    local = DataFeed(cfg, str(dataset), use_ray=False)
    for _ in range(10):
        for x, y in zip(remote.next_step(), local.next_step(), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
