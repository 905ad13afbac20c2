"""Checkpoint store: multi-rank commit, torn checkpoints, verification, retention, async upload, mirror.

Every test runs on local disk; the `store_url` ones run again on the SeaweedFS server (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from raytrainer.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    CheckpointStore,
    MirrorError,
    record_name,
    step_dir_name,
)
from raytrainer.storage import Storage, StorageError

RUN = "run-a"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def where(request, tmp_path):
    """(url, s3cfg) of an empty storage location, local or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "storage"), None
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_url"), server.s3_config()


def stage(root: Path, step: int, rank: int, nbytes: int = 4096, extra: dict | None = None) -> Path:
    """What one rank writes locally before a save: a shard, plus rank 0's JSON trainer state."""
    d = root / f"stage-{step}-{rank}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model").mkdir(exist_ok=True)
    (d / "model" / f"__{rank}_0.distcp").write_bytes(os.urandom(nbytes))
    if rank == 0:
        state = {"step": step, "cursor": {"batch": step}, **(extra or {})}
        (d / "trainer_state.json").write_text(json.dumps(state))
    return d


def save_all(store: CheckpointStore, root: Path, step: int, world_size: int = 2, **kw) -> list:
    return [store.save_rank(step, stage(root, step, r), r, world_size, {"step": step}, **kw)
            for r in range(world_size)]


def primary(store: CheckpointStore, step: int) -> Storage:
    return store.primary.child(step_dir_name(step))


# --------------------------------------------------------------------------- commit


def test_complete_only_after_every_rank_commits(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    assert store.latest_complete() is None and store.list() == []

    rec0 = store.save_rank(10, stage(tmp_path, 10, 0), 0, 2, {"step": 10, "rng": [1, 2, 3]})
    assert not store.is_complete(10) and store.latest_complete() is None
    (info,) = store.list()
    assert (info.step, info.complete, info.committed_ranks) == (10, False, [0])
    assert any("ranks 1 of world_size 2 have not committed" in p for p in info.problems)

    rec1 = store.save_rank(10, stage(tmp_path, 10, 1), 1, 2, {"step": 10})
    assert store.is_complete(10) and store.latest_complete() == 10
    assert [i.step for i in store.list() if i.complete] == [10]

    shard = tmp_path / "stage-10-1" / "model" / "__1_0.distcp"
    assert rec1.files["model/__1_0.distcp"] == {
        "size": shard.stat().st_size, "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    assert set(rec0.files) == {"model/__0_0.distcp", "trainer_state.json"}
    assert store.records(10)[0].metadata == {"step": 10, "rng": [1, 2, 3]}
    assert store.read_json(10, "trainer_state.json")["cursor"] == {"batch": 10}


def test_download_all_or_one_rank(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    save_all(store, tmp_path, 5)
    loaded = store.download(5, tmp_path / "all")
    assert loaded.files == ["model/__0_0.distcp", "model/__1_0.distcp", "trainer_state.json"]
    assert loaded.world_size == 2 and loaded.location == "primary" and loaded.metadata == {"step": 5}
    for rel in loaded.files:
        source = tmp_path / f"stage-5-{1 if '__1' in rel else 0}" / rel
        assert (tmp_path / "all" / rel).read_bytes() == source.read_bytes()
    one = store.download(5, tmp_path / "one", rank=1, include=["*.json"])
    assert one.files == ["model/__1_0.distcp", "trainer_state.json"]
    assert not (tmp_path / "one" / "model" / "__0_0.distcp").exists()


def test_torn_checkpoint_is_ignored_for_the_previous_complete_one(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    save_all(store, tmp_path, 10)
    # Step 20: rank 1 died before its commit record.
    store.save_rank(20, stage(tmp_path, 20, 0), 0, 2)
    stage(tmp_path, 20, 1)
    primary(store, 20).upload_file(tmp_path / "stage-20-1" / "model" / "__1_0.distcp", "model/__1_0.distcp")
    assert store.latest_complete() == 10
    with pytest.raises(CheckpointNotFound, match="have not committed"):
        store.download(20, tmp_path / "dl20")

    # Step 30: both committed, then a shard lost its tail.
    save_all(store, tmp_path, 30)
    assert store.latest_complete() == 30
    shard = primary(store, 30)
    data = shard.read_bytes("model/__1_0.distcp")
    shard.write_bytes("model/__1_0.distcp", data[:100])
    assert not store.is_complete(30)
    assert store.latest_complete() == 10
    assert store.latest_complete(before_step=10) is None
    info = {i.step: i for i in store.list()}
    assert not info[30].complete and any("has 100 bytes" in p for p in info[30].problems)


def test_verify_catches_a_corrupted_file(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    save_all(store, tmp_path, 7)
    assert store.verify(7, full=True).ok
    shard = primary(store, 7)
    data = bytearray(shard.read_bytes("model/__0_0.distcp"))
    data[123] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes("model/__0_0.distcp", bytes(data))
    assert store.verify(7).ok and store.is_complete(7)  # the cheap check cannot see it
    report = store.verify(7, full=True)
    assert not report.ok and report.files_checked == 3
    (problem,) = report.problems
    assert "model/__0_0.distcp" in problem and "sha256" in problem
    with pytest.raises(CheckpointCorrupt, match="__0_0.distcp"):
        store.download(7, tmp_path / "dl")


def test_resave_at_another_world_size_is_incomplete_until_committed(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    save_all(store, tmp_path / "a", 10, world_size=2)
    # Elastic restart with one worker re-saves step 10: rank 0 withdraws its record first.
    store.primary.child(step_dir_name(10)).delete_file(record_name(0))
    assert not store.is_complete(10)
    store.save_rank(10, stage(tmp_path / "b", 10, 0), 0, 1)
    assert store.is_complete(10) and store.records(10)[0].world_size == 1
    loaded = store.download(10, tmp_path / "dl")
    assert loaded.world_size == 1
    assert "model/__1_0.distcp" not in loaded.files  # the stale rank-1 shard is not part of it


def test_records_of_different_attempts_never_make_a_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    store.save_rank(10, stage(tmp_path, 10, 0), 0, 2, save_id="attempt-1")
    store.save_rank(10, stage(tmp_path, 10, 1), 1, 2, save_id="attempt-2")
    assert not store.is_complete(10)
    assert any("does not match rank 0's" in p for p in store.list()[0].problems)
    store.save_rank(10, stage(tmp_path, 10, 0), 0, 2, save_id="attempt-2")
    assert store.is_complete(10)


def test_bad_inputs_are_named(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        store.save_rank(1, stage(tmp_path, 1, 0), 2, 2)
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        store.save_rank(1, stage(tmp_path, 1, 0), 0, 1, {"tensor": object()})
    bad = stage(tmp_path, 2, 0)
    (bad / "_commit").mkdir()
    (bad / "_commit" / "x.json").write_text("{}")
    with pytest.raises(CheckpointError, match="reserved"):
        store.save_rank(2, bad, 0, 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        store.save_rank(3, tmp_path / "nope", 0, 1)
    with pytest.raises(CheckpointNotFound, match="step 99"):
        store.download(99, tmp_path / "dl")
    with pytest.raises(ValueError, match="run_name"):
        CheckpointStore(str(tmp_path / "s"), "a/b")


# --------------------------------------------------------------------------- retention


def test_prune_keeps_last_k_every_p_and_pinned(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    for step in range(10, 101, 10):
        save_all(store, tmp_path, step, world_size=1)
    store.save_rank(25, stage(tmp_path, 25, 0), 0, 2)  # torn leftover, older than the latest
    store.save_rank(110, stage(tmp_path, 110, 0), 0, 2)  # newer and incomplete: maybe still uploading
    store.pin(30, reason="last healthy")
    assert store.pinned() == {30}

    deleted = store.prune(keep_last=2, keep_every=40)
    assert deleted == [10, 20, 25, 50, 60, 70]
    assert store.steps() == [30, 40, 80, 90, 100]
    assert 110 in [i.step for i in store.list()]
    assert store.latest_complete() == 100

    store.unpin(30)
    assert store.prune(keep_last=1) == [30, 40, 80, 90]
    assert store.steps() == [100]


def test_prune_never_deletes_the_latest_complete(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    save_all(store, tmp_path, 10)
    store.save_rank(20, stage(tmp_path, 20, 0), 0, 2)  # newest, incomplete
    assert store.prune(keep_last=1) == []
    assert store.latest_complete() == 10
    with pytest.raises(ValueError, match="keep_last"):
        store.prune(keep_last=0)
    with pytest.raises(CheckpointNotFound):
        store.pin(55)


# --------------------------------------------------------------------------- async


def test_async_save_returns_before_the_upload_and_wait_finishes_it(where, tmp_path, monkeypatch):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3)
    gate = threading.Event()
    real_upload = Storage.upload_file

    def gated_upload(self, local_path, rel):
        assert gate.wait(30)
        return real_upload(self, local_path, rel)

    monkeypatch.setattr(Storage, "upload_file", gated_upload)
    started = time.monotonic()
    for rank in range(2):
        store.save_rank_async(40, stage(tmp_path, 40, rank), rank, 2, {"step": 40}, delete_local=True)
    assert time.monotonic() - started < 5 and not store.is_complete(40)  # nothing uploaded yet
    gate.set()
    records = store.wait()
    assert sorted(r.rank for r in records) == [0, 1]
    assert store.is_complete(40) and store.verify(40, full=True).ok
    assert not (tmp_path / "stage-40-0").exists()  # delete_local after a successful upload
    store.close()


def test_async_upload_error_surfaces_on_the_next_call(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "s"), RUN)

    def broken_upload(self, local_path, rel):
        raise OSError("disk on fire")

    monkeypatch.setattr(Storage, "upload_file", broken_upload)
    store.save_rank_async(1, stage(tmp_path, 1, 0), 0, 1)
    with pytest.raises(CheckpointError, match="disk on fire"):
        store.wait()
    store.wait()  # reported once, then cleared

    store.save_rank_async(2, stage(tmp_path, 2, 0), 0, 1)
    deadline = time.monotonic() + 10
    while not store.writer._errors and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match="disk on fire"):  # the next save raises it
        store.save_rank_async(3, stage(tmp_path, 3, 0), 0, 1)
    assert (tmp_path / "stage-2-0").exists()  # a failed upload keeps its staging directory
    monkeypatch.undo()
    store.save_rank(4, stage(tmp_path, 4, 0), 0, 1)
    store.close()
    assert store.steps() == [4]


def test_async_save_writes_the_late_files_before_listing_them_and_a_failed_write_commits_nothing(tmp_path):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    staged = stage(tmp_path, 5, 0)
    late = staged / "model" / ".metadata"

    def write_model() -> None:
        late.write_bytes(b"weights written on the upload thread")

    store.save_rank_async(5, staged, 0, 1, write_first=write_model)
    store.wait()
    assert store.is_complete(5) and store.verify(5, full=True).ok
    assert "model/.metadata" in primary(store, 5).list_files()

    def failing_write() -> None:
        raise OSError("no space left on device")

    store.save_rank_async(6, stage(tmp_path, 6, 0), 0, 1, write_first=failing_write)
    with pytest.raises(CheckpointError, match="no space left"):
        store.wait()
    assert store.steps() == [5]
    store.close()


# --------------------------------------------------------------------------- mirror


def test_mirror_fallback_when_primary_is_deleted_or_corrupted(where, tmp_path):
    url, s3 = where
    store = CheckpointStore(url, RUN, s3, mirror=str(tmp_path / "mirror"))
    save_all(store, tmp_path, 10)
    save_all(store, tmp_path, 20)
    mirror_step = store.mirror.child(step_dir_name(20))
    assert mirror_step.list_files().keys() == primary(store, 20).list_files().keys()

    # The primary copy of step 20 is gone: the mirror still has it.
    store.primary.child(step_dir_name(20)).delete_tree()
    assert store.latest_complete() == 20
    loaded = store.download(20, tmp_path / "dl20")
    assert loaded.location == "mirror"
    state = (tmp_path / "dl20" / "trainer_state.json").read_text()
    assert state == (tmp_path / "stage-20-0" / "trainer_state.json").read_text()
    assert store.read_json(20, "trainer_state.json")["step"] == 20

    # The primary copy of step 10 is silently corrupted: the download checks it and uses the mirror.
    shard = primary(store, 10)
    data = bytearray(shard.read_bytes("model/__1_0.distcp"))
    data[0] ^= 1
    shard.write_bytes("model/__1_0.distcp", bytes(data))
    loaded = store.download(10, tmp_path / "dl10")
    assert loaded.location == "mirror"
    assert (tmp_path / "dl10" / "model" / "__1_0.distcp").read_bytes() == (
        tmp_path / "stage-10-1" / "model" / "__1_0.distcp").read_bytes()


def test_mirror_failure_is_raised_after_the_primary_commit(tmp_path):
    (tmp_path / "blocker").write_text("a file where the mirror directory should be")
    store = CheckpointStore(str(tmp_path / "s"), RUN, mirror=str(tmp_path / "blocker" / "mirror"))
    with pytest.raises(MirrorError, match="committed to"):
        store.save_rank(1, stage(tmp_path, 1, 0), 0, 1)
    assert store.primary.child(step_dir_name(1)).exists(record_name(0))


def test_unreadable_primary_without_mirror_is_an_error_not_a_fresh_start(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "s"), RUN)
    save_all(store, tmp_path, 10)

    def unreachable(self, rel=""):
        raise OSError("AWS Error NETWORK_CONNECTION: Could not connect to server")

    monkeypatch.setattr(Storage, "list_files", unreachable)
    with pytest.raises(StorageError, match="cannot read checkpoint step 10"):
        store.latest_complete()
    monkeypatch.setattr(Storage, "listdir", unreachable)
    with pytest.raises(StorageError, match="cannot list checkpoints"):
        store.latest_complete()


# --------------------------------------------------------------------------- Ray Train hook


def test_housekeeping_flush_returns_once_a_late_rank_has_committed_the_watched_step():
    """What CheckpointManager.settle promises a stopping group: rank 0 has seen the step committed by every rank,
    even when another rank's upload finishes after rank 0's own."""
    import time

    from raytrainer.checkpoint.housekeeping import Housekeeper

    class LateRankStore:
        def __init__(self, after_s: float):
            self.ready_at = time.monotonic() + after_s

        def is_complete(self, step: int) -> bool:
            return time.monotonic() >= self.ready_at

    keeper = Housekeeper(LateRankStore(after_s=1.0))
    keeper.watch(10)
    assert keeper.flush(30) and keeper.committed() == [10]
    keeper = Housekeeper(LateRankStore(after_s=60.0))
    keeper.watch(20)
    assert not keeper.flush(0.5) and keeper.committed() == []
