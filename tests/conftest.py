"""Shared fixtures. `s3_server` is a real S3 server (SeaweedFS) on free loopback ports for the session."""

from __future__ import annotations

import re
import uuid

import pytest

from raytrainer.storage_server import LocalS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server with one bucket.

    Attributes: endpoint_url, access_key, secret_key, bucket, pid, data_dir; s3_config() gives the
    raytrainer S3Config; url("a", "b") gives s3://<bucket>/a/b. Tests may stop() it (e.g. mid-save) and
    start() it again: same ports, same data. It is stopped by its PID when the session ends."""
    server = LocalS3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """A fresh s3:// prefix for one test (the server is restarted first if an earlier test stopped it)."""
    s3_server.start()  # a no-op when it serves; waits for a restart under way in another thread
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return s3_server.url("tests", f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def one_thread():
    """In-process training on one torch thread: the two cores are shared with whatever else runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
