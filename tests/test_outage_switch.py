"""The chaos harness's S3 outage: the worker whose fault fires gets its step back as soon as S3 refuses
connections, however long the server takes to stop, and the server comes back with its data."""

from __future__ import annotations

import time

import pytest

from raytrainer.fault.outage import S3OutageSwitch
from raytrainer.storage import open_storage
from raytrainer.storage_server import port_open

pytestmark = pytest.mark.slow


def test_an_outage_returns_once_s3_refuses_and_the_server_comes_back_with_its_data(tmp_path):
    switch = S3OutageSwitch(str(tmp_path / "s3"), seconds=3)
    server = switch.server
    try:
        store = open_storage(server.url("outage"), server.s3_config())
        store.write_bytes("kept.txt", b"written before the outage")
        graceful_stop = server.stop

        def slow_stop(*args, **kwargs):  # a server that lingers on its open connections before it exits
            graceful_stop(*args, **kwargs)
            time.sleep(8)

        server.stop = slow_stop
        t0 = time.monotonic()
        switch.outage(39)
        assert time.monotonic() - t0 < 3  # not the 8 s the stop takes
        assert not port_open(server.host, server.ports["s3.port"])
        # `running` turns true when the process starts, before S3 answers: wait for the whole comeback.
        switch._cycle.join(timeout=90)
        assert server.running and time.monotonic() - t0 >= 3  # back, and not before its outage was over
        assert store.read_bytes("kept.txt") == b"written before the outage"
        assert switch.history() == [39]
    finally:
        server.stop = type(server).stop.__get__(server)
        switch.shutdown()
    assert not server.running


def test_a_shutdown_during_an_outage_keeps_the_server_down(tmp_path):
    switch = S3OutageSwitch(str(tmp_path / "s3"), seconds=2)
    switch.outage(9)
    switch.shutdown()
    time.sleep(3)
    assert not switch.server.running
