"""The events log in the run's storage: JSON lines, rewritten whole, continued across restarts."""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from raytrainer.config import Config
from raytrainer.fault.events import EVENTS_FILE, EventLog, MemoryStore, RunStore, read_events
from raytrainer.fault.guardian import Guardian


def test_events_are_json_lines_in_the_store_and_a_reopened_log_continues(tmp_path):
    store = RunStore.local(tmp_path / "run" / "guardian")
    log = EventLog(store)
    log.append({"event": "skip", "step": 3, "reason": "loss spike"})
    log.append({"event": "rollback", "step": 7, "rollback_to": 0})
    text = (tmp_path / "run" / "guardian" / EVENTS_FILE).read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [3, 7]
    again = EventLog(RunStore.local(tmp_path / "run" / "guardian"))  # a resubmitted job
    again.append({"event": "abort", "step": 9})
    assert [e["event"] for e in read_events(store)] == ["skip", "rollback", "abort"]
    assert not list((tmp_path / "run" / "guardian").glob("*.tmp-*"))  # written via rename, nothing left over


def test_a_callable_sink_gets_the_whole_log_each_time():
    texts = []
    log = EventLog(texts.append)
    log.append({"step": 1})
    log.append({"step": 2})
    assert [len(t.splitlines()) for t in texts] == [1, 2]


def test_write_failures_never_raise_and_are_retried():
    class Flaky(MemoryStore):
        down = True

        def write_text(self, name, text):
            if self.down:
                raise OSError("connection refused")
            super().write_text(name, text)

    store = Flaky()
    log = EventLog(store)
    log.append({"step": 1})  # the store is down: logged, not raised
    assert not log.flush()
    store.down = False
    log.append({"step": 2})
    assert [e["step"] for e in read_events(store)] == [1, 2]


def test_background_writer_flushes(tmp_path):
    store = RunStore.local(tmp_path)
    log = EventLog(store, background=True)
    for i in range(20):
        log.append({"step": i})
    assert log.flush(timeout_s=10)
    assert [e["step"] for e in read_events(store)] == list(range(20))
    log.close()


def test_run_store_location_follows_the_config(tmp_path):
    cfg = Config.model_validate({"checkpoint": {"storage": str(tmp_path / "runs")}, "run": {"name": "r1"}})
    store = RunStore.for_run(cfg)
    assert isinstance(store.fs, pafs.LocalFileSystem)
    assert store.path == str(tmp_path / "runs" / "r1" / "guardian")
    s3_keys = {"endpoint_url": "http://127.0.0.1:9", "access_key_id": "k", "secret_access_key": "s"}
    checkpoint = {"storage": "s3://bucket/prefix", "s3": s3_keys}
    s3 = Config.model_validate({"checkpoint": checkpoint, "run": {"name": "r1"}})
    s3_store = RunStore.for_run(s3)
    assert s3_store.fs.type_name == "s3" and s3_store.path == "bucket/prefix/r1/guardian"


def test_guardian_decisions_reach_the_log(tmp_path):
    from raytrainer.config import GuardianConfig

    store = RunStore.local(tmp_path)
    log = EventLog(store)
    g = Guardian(GuardianConfig(rerun=False), run_name="r", on_event=log.append)
    g.decide(0, {"loss": float("nan"), "grad_norm": 1.0})
    (event,) = read_events(store)
    assert event["event"] == "skip" and event["run"] == "r" and "non-finite" in event["reason"]
