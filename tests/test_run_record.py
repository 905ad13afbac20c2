"""A resumed run trains on the shards it started with: the first start records them in the run's directory, a
later start with the dataset prepared again is refused naming the first shard that differs, unless allowed;
before its first checkpoint a run has no data position, and its dataset may change."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from datasets import random_docs, write_dataset
from raytrainer.checkpoint import CheckpointStore
from raytrainer.config import ConfigError
from raytrainer.data.manifest import Manifest
from raytrainer.launch import check_dataset
from raytrainer.storage import open_storage
from runs import micro_config


def commit_a_checkpoint(tmp_path, storage: str, name: str, step: int = 10) -> None:
    """A complete one-rank checkpoint, so that a start resumes a data position."""
    local = tmp_path / f"stage-{step}"
    local.mkdir()
    (local / "trainer_state.json").write_text(json.dumps({"step": step, "cursor": {"batch": step}}))
    CheckpointStore(storage, name).save_rank(step, local, 0, 1, {"step": step})


def test_a_dataset_prepared_again_under_a_run_is_refused_naming_the_shard(tmp_path, caplog):
    rng = np.random.default_rng(1)
    dataset = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 40, mean_length=80)}, docs_per_shard=10)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="r")
    run = open_storage(str(tmp_path / "runs")).child("r")
    check_dataset(cfg, run)  # the first start records the shards ...
    recorded = json.loads(run.read_bytes("data/shards.json"))
    assert [row[0] for row in recorded["shards"]] == [s.path for s in Manifest.load(str(dataset)).shards]
    commit_a_checkpoint(tmp_path, str(tmp_path / "runs"), "r")
    check_dataset(cfg, run)  # ... and a resumption on the same shards goes on
    # Prepared again with other documents: same paths, other contents.
    write_dataset(tmp_path / "ds", {"web": random_docs(rng, 45, mean_length=80)}, docs_per_shard=10)
    changed = Manifest.load(str(dataset)).shards[0]
    with pytest.raises(ConfigError, match=rf"the dataset changed since this run started .*shard {changed.path}: "
                                          r"num_tokens .* sha256 .*more differences.*allow_manifest_change=true"):
        check_dataset(cfg, run)
    assert json.loads(run.read_bytes("data/shards.json")) == recorded  # nothing already written is lost
    allowed = micro_config(dataset, str(tmp_path / "runs"), name="r", extra=["data.allow_manifest_change=true"])
    with caplog.at_level(logging.WARNING, logger="raytrainer.data.run_record"):
        check_dataset(allowed, run)
    assert any("going on (data.allow_manifest_change=true)" in r.message for r in caplog.records)
    check_dataset(cfg, run)  # the new shards are the run's from now on


def test_before_its_first_checkpoint_a_run_may_change_its_dataset(tmp_path):
    """A start refused after its dataset was recorded (too few workers, say) or crashed before a checkpoint
    leaves no data position: the next start, on a corrected dataset, records that one instead of being refused."""
    rng = np.random.default_rng(2)
    wrong = write_dataset(tmp_path / "wrong", {"web": random_docs(rng, 30, mean_length=80)}, docs_per_shard=10)
    right = write_dataset(tmp_path / "right", {"web": random_docs(rng, 40, mean_length=80)}, docs_per_shard=10)
    run = open_storage(str(tmp_path / "runs")).child("r")
    check_dataset(micro_config(wrong, str(tmp_path / "runs"), name="r"), run)
    check_dataset(micro_config(right, str(tmp_path / "runs"), name="r"), run)
    assert json.loads(run.read_bytes("data/shards.json"))["dataset"] == str(right)
    commit_a_checkpoint(tmp_path, str(tmp_path / "runs"), "r")
    with pytest.raises(ConfigError, match="the dataset changed since this run started"):
        check_dataset(micro_config(wrong, str(tmp_path / "runs"), name="r"), run)
