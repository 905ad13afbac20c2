"""A resumed run trains on the shards it started with: the first start records them in the run's directory, a
later start with the dataset prepared again is refused naming the first shard that differs, unless allowed."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from datasets import random_docs, write_dataset
from raytrainer.config import ConfigError
from raytrainer.data.manifest import Manifest
from raytrainer.launch import check_dataset
from raytrainer.storage import open_storage
from runs import micro_config


def test_a_dataset_prepared_again_under_a_run_is_refused_naming_the_shard(tmp_path, caplog):
    rng = np.random.default_rng(1)
    dataset = write_dataset(tmp_path / "ds", {"web": random_docs(rng, 40, mean_length=80)}, docs_per_shard=10)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="r")
    run = open_storage(str(tmp_path / "runs")).child("r")
    check_dataset(cfg, run)  # the first start records the shards ...
    recorded = json.loads(run.read_bytes("data/shards.json"))
    assert [row[0] for row in recorded["shards"]] == [s.path for s in Manifest.load(str(dataset)).shards]
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
