"""Resume decisions of the checkpoint manager: a damaged newest checkpoint is passed over with one warning
that names it (and `raytrainer inspect` marks it), and a finished run resubmitted is a no-op."""

from __future__ import annotations

import json
import logging

from fakes import FakeEngine, FakeFeed
from raytrainer.checkpoint import CheckpointStore
from raytrainer.checkpoint.manager import CheckpointManager
from raytrainer.config import load_config
from raytrainer.fault.guardian import Guardian
from raytrainer.report import inspect_checkpoint
from raytrainer.train.loop import Trainer, WorkerEnv


def _trainer(tmp_path, steps: int = 30) -> Trainer:
    cfg = load_config("tiny", [f"checkpoint.storage={tmp_path}", "run.name=resume", f"train.steps={steps}",
                               "checkpoint.every_steps=10", "checkpoint.keep_last=3", "train.log_every=1000"])
    manager = CheckpointManager(cfg, WorkerEnv(), staging_root=tmp_path / "staging")
    return Trainer(cfg, WorkerEnv(), FakeEngine(set()), FakeFeed, manager, Guardian(cfg.guardian, "resume"))


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_truncated_newest_checkpoint_is_named_once_and_the_previous_one_used(tmp_path, caplog):
    _trainer(tmp_path).fit()
    weights = tmp_path / "resume" / "checkpoints" / "step_00000030" / "model" / "weights.json"
    weights.write_bytes(weights.read_bytes()[:-3])  # truncated by hand
    caplog.set_level(logging.WARNING)
    resumed = _trainer(tmp_path, steps=40)
    assert resumed.restore() == 20
    warnings = [m for m in _messages(caplog) if "passed over" in m]
    assert len(warnings) == 1, _messages(caplog)
    assert "step 30" in warnings[0] and "weights.json" in warnings[0] and "bytes" in warnings[0]
    assert "resuming from step 20" in warnings[0]
    inspected = inspect_checkpoint(str(tmp_path / "resume"))
    assert inspected["step"] == 20
    assert [u["step"] for u in inspected["unusable"]] == [30] and "weights.json" in inspected["unusable"][0][
        "problems"][0]


def test_corrupt_bytes_of_the_same_size_are_caught_at_load_and_marked(tmp_path, caplog):
    _trainer(tmp_path).fit()
    weights = tmp_path / "resume" / "checkpoints" / "step_00000030" / "model" / "weights.json"
    data = bytearray(weights.read_bytes())
    data[1] = ord("9") if data[1] != ord("9") else ord("8")
    weights.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    assert _trainer(tmp_path, steps=40).restore() == 20
    warnings = [m for m in _messages(caplog) if "cannot be loaded" in m]
    assert len(warnings) == 1 and "step 30" in warnings[0] and "sha256" in warnings[0]
    assert "trying step 20" in warnings[0]
    store = CheckpointStore(str(tmp_path), "resume")
    assert not store.is_complete(30)  # marked damaged: never offered again
    assert "marked damaged" in inspect_checkpoint(str(tmp_path / "resume"))["unusable"][0]["problems"][0]


def test_a_finished_run_resubmitted_is_a_no_op_that_says_so(tmp_path, caplog):
    _trainer(tmp_path).fit()
    record = tmp_path / "resume" / "checkpoints" / "step_00000030" / "_commit" / "rank-00000.json"
    before = json.loads(record.read_text())
    caplog.set_level(logging.INFO)
    result = _trainer(tmp_path).fit()
    assert result["already_finished"] and result["step"] == 30
    assert json.loads(record.read_text()) == before  # not rewritten
    assert any("already finished at step 30" in r.getMessage() for r in caplog.records)
