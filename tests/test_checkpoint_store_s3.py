"""The checkpoint store against a real S3 server that goes away: outages mid-save, and the mirror."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raytrainer.checkpoint import CheckpointError, CheckpointStore
from raytrainer.storage import StorageError, open_storage

pytestmark = pytest.mark.slow

RUN = "run-s3"


def stage(root, step: int, rank: int, nbytes: int = 256 * 1024):
    d = root / f"stage-{step}-{rank}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"shard-{rank}.bin").write_bytes(os.urandom(nbytes))
    return d


def test_outage_during_async_save_surfaces_and_never_yields_a_torn_checkpoint(s3_server, s3_url, tmp_path):
    store = CheckpointStore(s3_url, RUN, s3_server.s3_config())
    store.save_rank(10, stage(tmp_path, 10, 0), 0, 1)
    s3_server.stop()
    try:
        store.save_rank_async(20, stage(tmp_path, 20, 0, nbytes=4 * 1024 * 1024), 0, 1)
        with pytest.raises(CheckpointError, match="step 20"):
            store.wait()
    finally:
        s3_server.start()
    assert store.latest_complete() == 10 and not store.is_complete(20)
    store.save_rank(20, tmp_path / "stage-20-0", 0, 1)  # retried after the outage: the staging dir was kept
    assert store.latest_complete() == 20 and store.verify(20, full=True).ok
    store.close()


def test_an_upload_hit_by_a_short_outage_is_retried_and_commits(s3_server, s3_url, tmp_path, caplog):
    import threading

    store = CheckpointStore(s3_url, RUN, s3_server.s3_config(), upload_retry_s=120)
    store.save_rank(10, stage(tmp_path, 10, 0), 0, 1)
    s3_server.stop()
    comeback = threading.Timer(4.0, s3_server.start)
    comeback.start()
    try:
        store.save_rank_async(20, stage(tmp_path, 20, 0, nbytes=4 * 1024 * 1024), 0, 1)
        store.wait()  # no error: the upload thread outlasted the outage
    finally:
        comeback.join()
        s3_server.start()
    assert store.latest_complete() == 20 and store.verify(20, full=True).ok
    assert "retrying for up to 120 s" in caplog.text and "uploaded to" in caplog.text
    store.close()


def test_an_outage_longer_than_the_retry_time_fails_the_upload(s3_server, s3_url, tmp_path):
    store = CheckpointStore(s3_url, RUN, s3_server.s3_config(), upload_retry_s=3)
    s3_server.stop()
    try:
        store.save_rank_async(20, stage(tmp_path, 20, 0), 0, 1)
        with pytest.raises(CheckpointError, match=r"step 20 rank 0 .* failed \(failing for \d+ s, \d+ attempts\)"):
            store.wait()
    finally:
        s3_server.start()
    assert not store.is_complete(20)


def test_server_restart_keeps_committed_checkpoints(s3_server, s3_url, tmp_path):
    store = CheckpointStore(s3_url, RUN, s3_server.s3_config())
    for rank in range(2):
        store.save_rank(5, stage(tmp_path, 5, rank), rank, 2)
    s3_server.stop()
    with pytest.raises(StorageError, match="cannot list checkpoints"):
        store.latest_complete()  # an outage is an error, never "no checkpoint, start fresh"
    s3_server.start()
    assert store.latest_complete() == 5 and store.verify(5, full=True).ok


def test_a_pruned_step_is_gone_from_the_listing_though_the_server_keeps_its_empty_prefix(s3_server, s3_url,
                                                                                          tmp_path):
    store = CheckpointStore(s3_url, RUN, s3_server.s3_config())
    for step in (10, 20, 30):
        store.save_rank(step, stage(tmp_path, step, 0), 0, 1)
    assert store.prune(keep_last=2) == [10]
    # What some servers (SeaweedFS) and clients leave behind: the deleted step's prefix, empty.
    store.primary.fs.create_dir(store.primary.path("step_00000010"))
    assert store.step_numbers() == [10, 20, 30]
    assert [(c.step, c.complete) for c in store.list()] == [(20, True), (30, True)]
    assert store.steps() == [20, 30]


def test_local_mirror_serves_loads_while_s3_is_down(s3_server, s3_url, tmp_path):
    store = CheckpointStore(s3_url, RUN, s3_server.s3_config(), mirror=str(tmp_path / "mirror"))
    for rank in range(2):
        store.save_rank(7, stage(tmp_path, 7, rank), rank, 2)
    s3_server.stop()
    try:
        assert store.latest_complete() == 7
        loaded = store.download(7, tmp_path / "dl")
        assert loaded.location == "mirror"
        original = (tmp_path / "stage-7-1" / "shard-1.bin").read_bytes()
        assert (tmp_path / "dl" / "shard-1.bin").read_bytes() == original
        assert store.prune(keep_last=1) == []  # no housekeeping from half a view
    finally:
        s3_server.start()


def test_command_line_server_prints_endpoint_and_keys(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "raytrainer.storage_server", "--dir", str(tmp_path / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("(pid"):
                break
        text = "".join(lines)
        endpoint = next(ln.split()[-1] for ln in lines if ln.startswith("S3 endpoint:"))
        assert "access key:" in text and "secret key:" in text and "s3://raytrainer" in text
        from raytrainer.config import S3Config

        cfg = S3Config(endpoint_url=endpoint, access_key_id="raytrainer-access",
                       secret_access_key="raytrainer-secret")
        storage = open_storage("s3://raytrainer/cli", cfg)
        storage.write_bytes("x", b"1")
        assert storage.read_bytes("x") == b"1"
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, "".join(lines)
