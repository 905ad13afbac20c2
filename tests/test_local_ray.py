"""A job without run.address starts a Ray of its own, even where a cluster that died uncleanly (a `ray start`
head that was killed, a test run stopped midway) is still recorded as the current one: a bare `ray.init()`
would try to join that dead address and fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytrainer.config import load_config
from raytrainer.launch import init_ray

pytestmark = pytest.mark.slow

CURRENT = Path("/tmp/ray/ray_current_cluster")


def test_a_stale_current_cluster_record_is_not_joined(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved = CURRENT.read_text() if CURRENT.exists() else None
    CURRENT.parent.mkdir(parents=True, exist_ok=True)
    CURRENT.write_text("127.0.0.1:9")  # nothing listens there
    try:
        init_ray(load_config("tiny", ["run.local_num_cpus=4"]))
        assert ray.cluster_resources().get("CPU") == 4  # our own, with the CPUs we asked for
    finally:
        ray.shutdown()
        if saved is None:
            CURRENT.unlink(missing_ok=True)
        else:
            CURRENT.write_text(saved)
