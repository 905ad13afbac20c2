"""Per-document blame: a reproduced loss spike is split by document; the few documents without which the
batch is no spike are blacklisted, named in the events log (shard, row, first characters) and the report,
and the step is skipped without counting towards a rollback."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from raytrainer.config import GuardianConfig
from raytrainer.data.packing import SEGMENT_COLUMNS
from raytrainer.fault.blame import DocumentLoss, culprits, document_losses, merge, name_documents
from raytrainer.fault.guardian import Guardian
from runs import micro_config

IGNORE = -100


def doc(i: int, mean: float, tokens: int) -> DocumentLoss:
    return DocumentLoss(i, "s.parquet", i, mean * tokens, tokens, 0)


# ---------------------------------------------------------------- splitting a batch by document


def test_token_losses_are_split_by_document_and_a_cut_document_is_counted_once_across_ranks():
    # Global rows 0..2 of T=4 tokens. Row 0: doc 7 [0, 2) then doc 8 [0, 2); row 1: doc 8 [2, 6) (cut, goes
    # on); row 2: doc 8 [6, 7) then doc 9 [0, 3). Rank 0 holds rows 0-1, rank 1 row 2.
    seg = np.array([[0, 7, 0, 3, 0, 2], [0, 8, 1, 4, 0, 2], [1, 8, 1, 4, 2, 6], [2, 8, 1, 4, 6, 7],
                    [2, 9, 0, 5, 0, 3]], dtype=np.int64)
    assert seg.shape[1] == SEGMENT_COLUMNS
    doc_ids = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
    labels = np.array([[1, IGNORE, 1, 1], [1, 1, 1, 1], [IGNORE, 1, 1, IGNORE]])  # each document's last token
    ce = np.where(labels != IGNORE, np.arange(1, 13, dtype=np.float64).reshape(3, 4), 0.0)
    ids = np.arange(100, 112).reshape(3, 4)
    shards = ["a.parquet", "b.parquet"]
    rank0 = document_losses(ce[:2], labels[:2], doc_ids[:2], ids[:2], seg, 0, shards)
    rank1 = document_losses(ce[2:], labels[2:], doc_ids[2:], ids[2:], seg, 2, shards)
    got = {d.doc: d for d in merge([rank0, rank1])}
    assert sorted(got) == [7, 8, 9]
    assert (got[7].ce_sum, got[7].tokens, got[7].shard, got[7].shard_row) == (1.0, 1, "a.parquet", 3)
    assert (got[8].ce_sum, got[8].tokens) == (3 + 4 + 5 + 6 + 7 + 8, 6)  # pieces on both ranks, one document
    assert got[8].start == 0 and got[8].prefix == (102, 103, 104, 105, 106, 107, 108)  # its pieces, in order
    assert (got[9].ce_sum, got[9].tokens, got[9].shard) == (10 + 11, 2, "a.parquet")
    name_documents(list(got.values()), lambda ids: "".join(chr(65 + i - 100) for i in ids))
    assert got[8].text == "CDEFGHI" and got[7].text == "AB"


def test_a_document_first_seen_past_its_beginning_is_named_as_cut():
    seg = np.array([[0, 4, 0, 0, 10, 14]], dtype=np.int64)
    (d,) = document_losses(np.ones((1, 4)), np.ones((1, 4)), np.zeros((1, 4), int), np.arange(4)[None], seg, 0,
                           ["s"])
    name_documents([d], lambda ids: "xyz")
    assert d.start == 10 and d.text == "...xyz"


# ---------------------------------------------------------------- who is to blame


def test_the_poisoned_document_is_found_among_clean_ones():
    docs = [doc(i, 2.5 + 0.1 * (i % 3), 300) for i in range(10)] + [doc(99, 9.0, 1500)]
    blamed = culprits(docs, 2.6, max_docs=8, max_tokens=0.75, min_rise=0.6)
    assert [d.doc for d in blamed] == [99]


def test_a_spike_spread_over_the_batch_blames_nobody():
    # Every document twice as bad: the model, not the data.
    assert culprits([doc(i, 5.0 + 0.2 * (i % 4), 300) for i in range(12)], 2.5, max_docs=8, max_tokens=0.75,
                    min_rise=0.6) == []
    # Bad documents that would have to be most of the batch are no explanation either.
    assert culprits([doc(0, 9.0, 900), doc(1, 2.5, 100)], 2.5, max_docs=8, max_tokens=0.75, min_rise=0.6) == []
    # More culprits than blame_max_docs: nobody.
    many = [doc(i, 12.0, 100) for i in range(10)] + [doc(100 + i, 2.5, 100) for i in range(10)]
    assert culprits(many, 2.5, max_docs=8, max_tokens=0.75, min_rise=0.6) == []
    # Only as many as it takes for the rest to be no spike (9 here), the worst first.
    assert len(culprits(many, 2.5, max_docs=10, max_tokens=0.75, min_rise=0.6)) == 9


def test_blame_takes_only_the_documents_needed():
    docs = [doc(1, 12.0, 500), doc(2, 4.5, 100)] + [doc(10 + i, 2.5, 300) for i in range(8)]
    # Without document 1 the rest is 2.5-ish: document 2 (high, but the batch is no spike without it) stays.
    assert [d.doc for d in culprits(docs, 2.5, max_docs=8, max_tokens=0.75, min_rise=0.6)] == [1]


# ---------------------------------------------------------------- the guardian's decision


def numbers(loss: float) -> dict:
    return {"loss": loss, "grad_norm": 1.0, "finite": True,
            "metrics": {"rank_ce_sum": [loss * 100], "rank_grad_norm": [1.0]}}


def test_blamed_spikes_are_skipped_blacklisted_and_never_escalate_to_a_rollback():
    events: list[dict] = []
    g = Guardian(GuardianConfig(warmup_exempt_steps=0, min_window=8, skips_before_rollback=1), "r",
                 on_event=events.append)
    for step in range(30):
        assert g.decide(step, numbers(2.5 + 0.01 * (step % 3))).action == "continue"
    g.on_checkpoint_staged(30)
    g.on_checkpoint(30)
    for k, step in enumerate(range(30, 34)):  # four spikes in a row, each carried by one bad document
        clean = [doc(1000 * k + i, 2.5, 300) for i in range(8)]
        first = g.decide(step, numbers(6.0))
        assert first.action == "rerun" and first.blame
        final = g.decide(step, numbers(6.0), rerun=numbers(6.0), documents=clean + [doc(7 + k, 9.0, 700)])
        assert (final.action, final.rerun, final.blacklist) == ("skip", "reproduced", [7 + k])
        assert "blacklisted" in final.reason and "s.parquet row" in final.reason
    assert g.blacklisted_documents() == [7, 8, 9, 10] and g.rollbacks == 0
    blames = [e for e in events if e["event"] == "blame"]
    assert [e["documents"][0]["doc"] for e in blames] == [7, 8, 9, 10]
    assert blames[0]["loss_without"] == pytest.approx(2.5) and blames[0]["documents"][0]["shard_row"] == 7
    assert g.skipped_ranges() == [(30, 34)]

    # An unexplained spike still counts: with skips_before_rollback=1, the second one rolls back.
    for step in (34, 35):
        assert g.decide(step, numbers(6.0)).action == "rerun"
        spread = [doc(5000 + step * 10 + i, 6.0, 300) for i in range(8)]
        final = g.decide(step, numbers(6.0), rerun=numbers(6.0), documents=spread)
        assert final.blacklist == []
    assert final.action == "rollback" and final.rollback_to == 30

    # The blacklist survives the state: a restart or a checkpoint's state keeps it.
    again = Guardian(GuardianConfig(), "r")
    again.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert again.blacklisted_documents() == [7, 8, 9, 10]


def test_blame_can_be_switched_off():
    g = Guardian(GuardianConfig(warmup_exempt_steps=0, min_window=8, blame_documents=False), "r")
    for step in range(30):
        g.decide(step, numbers(2.5))
    assert not g.decide(30, numbers(6.0)).blame


# ---------------------------------------------------------------- end to end on real text

JUNK_CHARS = 240  # random CJK characters: 720 byte tokens, ~70% of a micro batch


def junk_text(seed: int = 5) -> str:
    rng = np.random.default_rng(seed)
    return "".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FFF, JUNK_CHARS))


@pytest.fixture(scope="module")
def junk_dataset(tmp_path_factory):
    """The sample corpus (real prose and code) with one garbage document of its own source."""
    from raytrainer.data.prepare import prepare_dataset
    from raytrainer.data.sample_corpus import build_sample_corpus
    from raytrainer.data.sources import InputSpec

    root = tmp_path_factory.mktemp("junk")
    raw = root / "raw"
    build_sample_corpus(raw, 300_000)
    (raw / "junk.jsonl").write_text(json.dumps({"text": junk_text()}) + "\n")
    out = root / "dataset"
    prepare_dataset([InputSpec(str(raw / "code-*.jsonl"), "code"), InputSpec(str(raw / "docs-*.jsonl"), "docs"),
                     InputSpec(str(raw / "junk.jsonl"), "junk")], str(out), "byte", use_ray=False)
    return out


def junk_position(dataset, seed: int, steps: int) -> tuple[int, int, float] | None:
    """(step, junk doc id, its share of the batch's tokens) where the junk document is drawn, if before
    `steps`."""
    from raytrainer.data.feed import DataFeed
    from raytrainer.data.packing import DOC, END, START

    cfg = micro_config(dataset, "unused", steps=steps, extra=[f"train.seed={seed}"])
    feed = DataFeed(cfg, str(dataset), use_ray=False)
    junk_stream = next(k for k, (source, _) in enumerate(feed.table.streams) if source == "junk")
    junk = int(feed.table.first_doc[np.flatnonzero(feed.table.stream == junk_stream)[0]])
    for step in range(steps):
        feed.next_step()
        seg = feed.last_plan.segments
        mine = seg[seg[:, DOC] == junk]
        if len(mine):
            share = float((mine[:, END] - mine[:, START]).sum()) / (feed.last_plan.n_rows * feed.last_plan.seq_len)
            return step, junk, share
    return None


def test_a_garbage_document_in_real_text_is_blamed_named_and_blacklisted(junk_dataset, tmp_path, one_thread):
    """The tiny preset's guardian thresholds (spike_min_rise 0.6) and learning rate on the micro model; the
    train seed is chosen so that the plan draws the garbage document, in one piece, after the warm-up."""
    from raytrainer.cli import main
    from raytrainer.fault.events import EventLog, RunStore
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    seed, at = next((s, p) for s in range(200) if (p := junk_position(junk_dataset, s, 45)) is not None
                    and p[0] >= 25 and 0.6 <= p[2] <= 0.72)
    step, junk, share = at
    cfg = micro_config(junk_dataset, str(tmp_path), name="junk", steps=step + 3, extra=[f"train.seed={seed}"])
    assert cfg.guardian.spike_min_rise == 0.6  # the preset's own level
    events: list[dict] = []
    log = EventLog(RunStore.for_run(cfg))
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=lambda e: (events.append(e), log.append(e)))
    trainer = build_trainer(cfg, WorkerEnv(nodes=["this-node"]), torch.device("cpu"), guardian=guardian)
    history = trainer.fit()["history"]
    log.flush()

    hit = next(h for h in history if h.get("step") == step)
    assert (hit["action"], hit["rerun"], hit["applied"]) == ("skip", "reproduced", False), hit
    (blame,) = [e for e in events if e["event"] == "blame"]
    (named,) = blame["documents"]
    assert named["doc"] == junk and named["shard"].endswith(".parquet") and named["shard_row"] == 0
    assert named["text"] == junk_text()[:16]  # 48 byte tokens: 16 three-byte characters
    assert named["mean_loss"] > 1.6 * blame["baseline"] and blame["loss_without"] < 1.6 * blame["baseline"]
    assert junk in trainer.feed.cursor()["blacklist"] and guardian.rollbacks == 0
    # Every other step trained, and the loss around the skipped one is the run's usual.
    assert [h["step"] for h in history if h.get("action") != "continue"] == [step]
    assert all(math.isfinite(h["loss"]) for h in history)

    # The checkpoints saved after the blame are lost (a crash before the next save, say): the run resumes from
    # an older one (or from scratch), whose data cursor predates the blame, and still never draws it again.
    for path in (tmp_path / "junk" / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    resumed = build_trainer(cfg, WorkerEnv(nodes=["this-node"]), torch.device("cpu"), guardian=guardian)
    assert resumed.restore() <= step
    assert junk in resumed.feed.cursor()["blacklist"]

    # `raytrainer report` lists it.
    assert main(["report", "--run", str(tmp_path / "junk")]) == 0
    section = (tmp_path / "junk" / "report" / "report.md").read_text().split("## Blamed documents")[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {step} | {junk} |"))
    assert named["shard"] in row and junk_text()[:16] in row


def test_the_live_view_says_what_was_blamed():
    import io

    from raytrainer.live.view import LiveView

    out = io.StringIO()
    LiveView(total_steps=100, log_every=10, out=out, tty=False).feed(
        {"kind": "blame", "step": 31, "documents": [{"doc": 7, "shard": "junk-00000.parquet", "shard_row": 0,
                                                      "text": "garbage"}]})
    assert out.getvalue().splitlines() == [
        "step 31: the spike is in the data: document 7 (junk-00000.parquet row 0: 'garbage') blacklisted, the "
        "update skipped"]
