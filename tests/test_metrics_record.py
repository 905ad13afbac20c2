"""Metrics on record: rank 0's JSON lines and TensorBoard files, across a crash-and-resume, and a sink that
cannot be written costs a warning, never the run. (The rollback case runs with the tiny preset's own
settings in test_recovery_defaults.py.)"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from raytrainer.fault.guardian import Guardian
from raytrainer.metrics import MetricsRecorder, read_history
from raytrainer.metrics.history import build_history
from raytrainer.metrics.setup import new_attempt_id
from raytrainer.metrics.sinks import JsonlSink, TensorBoardSink
from raytrainer.storage import open_storage
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import make_dataset, micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("metrics-data"))


def test_metrics_survive_a_crash_and_resume(dataset, tmp_path):
    cfg = micro_config(dataset, str(tmp_path), name="crashy", steps=30)
    first = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    step = first.restore()
    while step < 25:  # the step-20 checkpoint is the last one before the "crash"
        step = first.train_step(step)
        first.keep_books()
    first.checkpoints.settle()  # uploaded, and rank 0's housekeeper has seen every rank commit it
    first.keep_books()
    assert first.recorder.flush(timeout_s=30)  # as the flush before the step-20 save had written
    # The process dies here: no close(), no final records.
    second = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    assert second.fit()["step"] == 30

    run = open_storage(str(tmp_path)).child("crashy")
    history = read_history(run)
    assert len(history.attempts) == 2 and len(history.files) == 2
    assert [r["step"] for r in history.steps] == list(range(30))
    assert {r["attempt"] for r in history.steps if r["step"] >= 20} == {history.attempts[1]}
    assert {r["attempt"] for r in history.steps if r["step"] < 20} == {history.attempts[0]}
    replayed = sorted(r["step"] for r in history.abandoned)
    assert replayed[0] == 20 and set(replayed) <= set(range(20, 25)), replayed
    assert all(r["abandoned_by"] == "restart resumed at step 20" for r in history.abandoned)
    assert [(e["kind"], e["step"]) for e in history.events if e["kind"] in ("start", "resume", "finish")] == [
        ("start", 0), ("resume", 20), ("finish", 30)]
    assert [e["step"] for e in history.of_kind("checkpoint")] == [10, 20, 30]
    last = history.steps[-1]
    for key in ("loss", "perplexity", "grad_norm", "lr", "tokens", "tokens_seen", "tokens_per_s", "mfu",
                "step_time_s", "data_wait_s", "memory_gb", "action", "step_time_spread_s"):
        assert key in last, key
    assert last["tokens_seen"] == 30 * cfg.train.global_batch_tokens  # restored from the checkpoint, then on
    assert math.isclose(last["perplexity"], math.exp(last["loss"]), rel_tol=1e-9)

    # TensorBoard's own reader finds every step of both attempts in the event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "crashy" / "tensorboard"))
    acc.Reload()
    loss_steps = {e.step for e in acc.Scalars("train/loss")}
    assert loss_steps == set(range(30))
    final = [e for e in acc.Scalars("train/loss") if e.step == 29]
    assert final[-1].value == pytest.approx(last["loss"], rel=1e-6)
    assert "train/tokens_per_s" in acc.Tags()["scalars"]


class FailingSink:
    name = "broken bucket"

    def __init__(self):
        self.fail = True
        self.written: list[dict] = []

    def write(self, records):
        if self.fail:
            raise OSError("No space left on device")
        self.written.extend(records)

    def close(self):
        pass


def test_a_sink_that_fails_warns_once_and_catches_up(caplog):
    sink = FailingSink()
    recorder = MetricsRecorder([sink], "attempt", flush_every_s=3600)
    caplog.set_level(logging.WARNING, logger="raytrainer.metrics")
    for step in range(5):
        recorder.log("step", step=step, loss=1.0)
        assert recorder.flush(timeout_s=10)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "broken bucket" in warnings[0] and "No space left" in warnings[0]
    sink.fail = False
    recorder.log("step", step=5, loss=1.0)
    recorder.close()
    assert [r["step"] for r in sink.written] == list(range(6))  # nothing lost while it was down
    assert "written again" in caplog.records[-1].getMessage()


def test_a_run_whose_metrics_storage_is_unwritable_still_trains(dataset, tmp_path, caplog):
    cfg = micro_config(dataset, str(tmp_path / "ck"), name="nowhere", steps=12)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    for q in trainer.recorder._queues:  # the metrics and tensorboard directories cannot be created
        q.sink.storage = open_storage(str(tmp_path / "ck")).child("nowhere", "blocked")
    (tmp_path / "ck" / "nowhere").mkdir(parents=True)
    (tmp_path / "ck" / "nowhere" / "blocked").write_text("a file where a directory must go")
    caplog.set_level(logging.WARNING, logger="raytrainer.metrics")
    assert trainer.fit()["step"] == 12
    cannot = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(cannot) == 2  # once per sink, not once per flush
    assert any("could not be written" in r.getMessage() for r in caplog.records)


def test_attempts_started_within_one_second_sort_in_the_order_they_started():
    # a restart in the same process can begin within the second its predecessor did; the history replays the
    # attempts' files in name order, and the older attempt's records would otherwise win
    ids = [new_attempt_id() for _ in range(64)]
    assert len(set(ids)) == len(ids) and sorted(ids) == ids


def test_history_marks_what_rollbacks_and_restarts_abandon():
    def step(s, attempt="a"):
        return {"kind": "step", "step": s, "attempt": attempt, "loss": 1.0}

    records = [step(s) for s in range(12)]
    records.append({"kind": "eval", "step": 10, "attempt": "a", "val_loss": 2.0})
    records.append({"kind": "rollback", "step": 12, "to": 5, "abandoned": [5, 12], "attempt": "a"})
    records += [step(s) for s in range(5, 9)]
    records.append({"kind": "resume", "step": 7, "attempt": "b"})
    records += [step(s, "b") for s in range(7, 10)]
    history = build_history(records)
    assert [r["step"] for r in history.steps] == list(range(10))
    assert [r["attempt"] for r in history.steps][7:] == ["b", "b", "b"]
    assert sorted(r["step"] for r in history.abandoned) == [5, 6, 7, 7, 8, 8, 9, 10, 11]
    assert history.evals == []  # the eval at 10 measured a model the rollback threw away
    assert history.attempts == ["a", "b"]


def test_jsonl_on_object_storage_is_one_object_per_flush():
    from pyarrow import fs as pafs

    from raytrainer.storage import Storage

    mock = pafs._MockFileSystem()  # cannot append, as S3; unlike S3 it needs its directories made
    mock.create_dir("bucket/runs/r/metrics", recursive=True)
    bucket = Storage(mock, "bucket/runs/r", "s3://bucket/runs/r")
    sink = JsonlSink(bucket, "20261202T000000Z-abcd")
    sink.write([{"kind": "step", "step": 0, "loss": float("nan")}])
    sink.write([{"kind": "step", "step": 1, "loss": 2.0}])
    assert bucket.child("metrics").listdir() == ["20261202T000000Z-abcd.000000.jsonl",
                                                 "20261202T000000Z-abcd.000001.jsonl"]
    history = read_history(bucket)
    assert [r["step"] for r in history.steps] == [0, 1]
    assert history.steps[0]["loss"] is None  # NaN is not JSON: null


def test_tensorboard_files_one_per_attempt_locally_one_per_flush_on_object_storage(tmp_path):
    from pyarrow import fs as pafs

    from raytrainer.storage import Storage

    sink = TensorBoardSink(open_storage(str(tmp_path)), "a")
    sink.write([{"kind": "step", "step": 0, "loss": 1.0}])
    sink.write([{"kind": "step", "step": 1, "loss": 0.5}])
    names = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert len(names) == 1 and names[0].endswith(".a")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 1.0), (1, 0.5)]

    mock = pafs._MockFileSystem()
    mock.create_dir("b/r/tensorboard", recursive=True)
    bucket = Storage(mock, "b/r", "s3://b/r")
    sink = TensorBoardSink(bucket, "a")
    sink.write([{"kind": "step", "step": 0, "loss": 1.0}])
    sink.write([{"kind": "step", "step": 1, "loss": 0.5}])
    names = bucket.child("tensorboard").listdir()
    assert len(names) == 2 and names[0].endswith(".a.000000") and names[1].endswith(".a.000001")
