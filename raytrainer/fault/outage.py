"""An object-store outage on cue, for rehearsals on Ray: a named actor hosts a local S3 server and takes it down
for a while when a worker's `s3_outage` fault fires (raytrainer.train.ray_entry routes the hook here).

    switch = start_outage_switch("chaos", data_dir, seconds=10)   # after ray.init, before the run
    cfg = ... checkpoint.storage=switch_url, checkpoint.s3 = ray.get(switch.info.remote())
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytrainer.storage_server import port_open


def actor_name(run_name: str) -> str:
    return f"raytrainer-s3-outage:{run_name}"


class S3OutageSwitch:
    """Owns the server's process, so a worker on any node can take it down and it comes back by itself."""

    def __init__(self, data_dir: str, seconds: float):
        from raytrainer.storage_server import LocalS3Server

        self.server = LocalS3Server(Path(data_dir))
        self.server.start()
        self.seconds = seconds
        self.outages: list[int] = []
        self._cycle: threading.Thread | None = None
        self._cancelled = threading.Event()

    def info(self) -> dict:
        return {"endpoint_url": self.server.endpoint_url, "access_key": self.server.access_key,
                "secret_key": self.server.secret_key, "url": self.server.url()}

    def outage(self, step: int) -> None:
        """Take the server down and bring it back `seconds` later. Returns once S3 refuses connections: the
        server's graceful stop can take many seconds more with connections open, and that wait must not stall
        the worker that asked (its step watchdog would fire)."""
        self.outages.append(step)
        self._cancelled.clear()
        self._cycle = threading.Thread(target=self._down_and_up, args=(time.monotonic(),), daemon=True,
                                       name="s3-outage")
        self._cycle.start()
        host, port = self.server.host, self.server.ports["s3.port"]
        deadline = time.monotonic() + REFUSE_WAIT_S
        while time.monotonic() < deadline and port_open(host, port):
            time.sleep(0.05)

    def _down_and_up(self, began: float) -> None:
        self.server.stop()
        if not self._cancelled.wait(max(0.0, began + self.seconds - time.monotonic())):
            self.server.start()

    def history(self) -> list[int]:
        return list(self.outages)

    def running(self) -> bool:
        return self.server.running

    def shutdown(self) -> None:
        if self._cycle is not None:  # a server brought back after this would outlive the run
            self._cancelled.set()
            self._cycle.join()
        self.server.stop()


REFUSE_WAIT_S = 5.0


def start_outage_switch(run_name: str, data_dir: str, seconds: float = 10.0) -> Any:
    import ray

    actor = ray.remote(num_cpus=0)(S3OutageSwitch).options(name=actor_name(run_name)).remote(data_dir, seconds)
    ray.get(actor.info.remote())  # started
    return actor


def outage_hook(run_name: str) -> Callable[[int], None]:
    """The `s3_outage` hook of a Ray worker: asks the run's switch to take the server down."""
    def take_down(step: int) -> None:
        import ray

        try:
            switch = ray.get_actor(actor_name(run_name))
        except ValueError:
            raise RuntimeError(f"fault s3_outage at step {step}: no actor {actor_name(run_name)!r} runs; start one "
                               "with raytrainer.fault.outage.start_outage_switch before the run") from None
        ray.get(switch.outage.remote(step))

    return take_down
