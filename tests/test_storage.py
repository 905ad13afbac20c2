"""Opening storage (local and S3), its helpers, and the preflight's error messages."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pyarrow.fs as pafs
import pytest

from raytrainer.config import S3Config
from raytrainer.storage import (
    StorageError,
    explain_storage_error,
    join,
    open_filesystem,
    open_fsspec,
    open_storage,
    preflight,
    resolve_s3_settings,
    s3fs_options,
    split_url,
)

# --------------------------------------------------------------------------- URLs and settings


def test_split_url_kinds(tmp_path, monkeypatch):
    assert split_url("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert split_url("s3://bucket") == ("s3", "bucket")
    assert split_url(f"file://{tmp_path}/x") == ("local", f"{tmp_path}/x")
    monkeypatch.chdir(tmp_path)
    assert split_url("runs") == ("local", f"{tmp_path}/runs")  # absolute: Ray workers change directory
    with pytest.raises(StorageError, match="no bucket"):
        split_url("s3:///prefix")


def test_join_ignores_empty_parts_and_slashes():
    assert join("bucket/p", "", "/run/", "x.json") == "bucket/p/run/x.json"
    assert join("s3://b/p", "step") == "s3://b/p/step"
    assert join("/", "a") == "/a"


def test_s3_settings_come_from_config_then_environment(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-host:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s = resolve_s3_settings(None)
    assert (s.endpoint_url, s.endpoint_host, s.scheme, s.region) == (
        "http://env-host:9000", "env-host:9000", "http", "eu-west-1")
    assert s.access_key_id is None  # left to the AWS credential chain
    s = resolve_s3_settings(S3Config(endpoint_url="https://cfg-host", region="us-west-2",
                                     access_key_id="AKIAEXAMPLE", secret_access_key="s"))
    assert (s.endpoint_host, s.scheme, s.region, s.access_key_id) == (
        "cfg-host", "https", "us-west-2", "AKIAEXAMPLE")
    assert "AKIA..." in s.describe() and "AKIAEXAMPLE" not in s.describe()


def test_s3_settings_errors_name_the_field(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(StorageError, match="access_key_id and s3.secret_access_key must be set together"):
        resolve_s3_settings(S3Config(access_key_id="only-the-id"))
    with pytest.raises(StorageError, match="needs a scheme, e.g. http://localhost:9000"):
        resolve_s3_settings(S3Config(endpoint_url="localhost:9000"))


def test_custom_endpoint_gets_a_region_and_s3fs_options(monkeypatch):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    cfg = S3Config(endpoint_url="http://127.0.0.1:1", access_key_id="k", secret_access_key="s")
    fs, path = open_filesystem("s3://b/p", cfg)
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/p"
    assert fs.region == "us-east-1"
    opts = s3fs_options(cfg, connect_timeout=1, max_attempts=2)
    assert opts["endpoint_url"] == "http://127.0.0.1:1" and opts["key"] == "k" and opts["secret"] == "s"
    assert opts["config_kwargs"] == {"connect_timeout": 1, "retries": {"max_attempts": 2, "mode": "standard"}}


@pytest.mark.parametrize(
    "message, kind",
    [
        ("AWS Error NETWORK_CONNECTION during HeadObject: curlCode: 7, Could not connect", "unreachable"),
        ("AWS Error SIGNATURE_DOES_NOT_MATCH during CreateMultipartUpload operation", "credentials"),
        ("AWS Error INVALID_ACCESS_KEY_ID during PutObject", "credentials"),
        ("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload: bucket does not exist", "no_bucket"),
        ("Bucket 'x' not found", "no_bucket"),
        ("something odd", "other"),
    ],
)
def test_explain_storage_error(message, kind):
    assert explain_storage_error(OSError(message))[0] == kind


# --------------------------------------------------------------------------- local round trip


def _exercise(storage, tmp_path):
    """The helpers every Storage must support; used for local and S3."""
    storage.write_bytes("a/b/hello.txt", b"hello")
    assert storage.exists("a/b/hello.txt") and storage.size("a/b/hello.txt") == 5
    assert storage.read_bytes("a/b/hello.txt") == b"hello"
    storage.write_bytes("a/b/hello.txt", b"hello again")  # overwrite is whole
    assert storage.read_bytes("a/b/hello.txt") == b"hello again"
    assert storage.listdir("a") == ["b"]
    assert storage.list_files() == {"a/b/hello.txt": 11}
    assert b"".join(storage.read_chunks("a/b/hello.txt")) == b"hello again"
    assert storage.listdir("missing") == [] and storage.list_files("missing") == {}

    payload = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    size, sha = storage.upload_file(src, "big/data.bin")
    assert (size, sha) == (len(payload), hashlib.sha256(payload).hexdigest())
    size2, sha2 = storage.download_file("big/data.bin", tmp_path / "back.bin")
    assert (size2, sha2) == (size, sha) and (tmp_path / "back.bin").read_bytes() == payload
    assert storage.hash_file("big/data.bin") == (size, sha)
    (tmp_path / "empty").write_bytes(b"")
    assert storage.upload_file(tmp_path / "empty", "empty") == (0, hashlib.sha256(b"").hexdigest())
    assert storage.download_file("empty", tmp_path / "empty-back") == (0, hashlib.sha256(b"").hexdigest())

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "x.txt").write_text("x")
    (tree / "sub" / "y.txt").write_text("yy")
    storage.upload_dir(tree, "copy")
    assert storage.list_files("copy") == {"x.txt": 1, "sub/y.txt": 2}
    storage.download_dir("copy", tmp_path / "down")
    assert (tmp_path / "down" / "sub" / "y.txt").read_text() == "yy"

    storage.delete_tree("copy")
    # Files only: some S3 servers (SeaweedFS) keep showing an emptied prefix as a directory.
    assert storage.list_files("copy") == {} and not storage.exists("copy/x.txt")
    storage.delete_tree("copy")  # deleting what is gone is fine
    storage.delete_file("a/b/hello.txt")
    assert not storage.exists("a/b/hello.txt")
    with pytest.raises(FileNotFoundError):
        storage.delete_file("a/b/hello.txt", missing_ok=False)
    child = storage.child("big")
    assert child.read_bytes("data.bin") == payload and child.uri("data.bin") == storage.uri("big", "data.bin")


def test_local_round_trip(tmp_path):
    storage = open_storage(str(tmp_path / "store"))
    assert storage.is_local and storage.root == str(tmp_path / "store")
    _exercise(storage, tmp_path)
    assert not [p for p in (tmp_path / "store").rglob("*.tmp-*")]  # atomic writes leave nothing behind


def test_local_fsspec_variant(tmp_path):
    fs, path = open_fsspec(str(tmp_path / "f"))
    fs.makedirs(path, exist_ok=True)
    fs.pipe(f"{path}/x", b"123")
    assert fs.cat(f"{path}/x") == b"123"


def test_local_preflight_ok_and_leaves_nothing(tmp_path):
    preflight(str(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_local_preflight_names_the_path_when_a_file_is_in_the_way(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError) as err:
        preflight(str(tmp_path / "file" / "runs"))
    assert str(tmp_path / "file" / "runs") in str(err.value)


def test_preflight_times_out_on_a_silent_endpoint():
    """A port that accepts connections but never answers: bounded by the preflight deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s")
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            preflight("s3://bucket/runs", cfg, timeout_s=3)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    assert time.monotonic() - started < 8
    assert err.value.kind in ("timeout", "unreachable") and "s3://bucket/runs" in str(err.value)


# --------------------------------------------------------------------------- on the S3 server


@pytest.mark.slow
def test_s3_round_trip(s3_server, s3_url, tmp_path, monkeypatch):
    # Small ranges, so the 3 MB object is fetched as 13 concurrent ranged GETs, reassembled in order.
    monkeypatch.setattr("raytrainer.storage.RANGE_BYTES", 256 * 1024)
    storage = open_storage(s3_url, s3_server.s3_config())
    assert not storage.is_local and storage.root == s3_url.removeprefix("s3://")
    _exercise(storage, tmp_path)
    assert len(list(storage.read_chunks("big/data.bin"))) == 13


@pytest.mark.slow
def test_s3_fsspec_variant(s3_server, s3_url):
    fs, path = open_fsspec(s3_url, s3_server.s3_config())
    fs.pipe(f"{path}/x", b"123")
    assert fs.cat(f"{path}/x") == b"123"
    assert open_storage(s3_url, s3_server.s3_config()).read_bytes("x") == b"123"


@pytest.mark.slow
def test_s3_preflight_ok(s3_server, s3_url):
    preflight(s3_url, s3_server.s3_config())
    assert open_storage(s3_url, s3_server.s3_config()).list_files() == {}


def _timed_preflight(url, cfg) -> tuple[StorageError, float]:
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        preflight(url, cfg)
    return err.value, time.monotonic() - started


@pytest.mark.slow
def test_s3_preflight_wrong_port_says_unreachable(s3_server, s3_url):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    cfg = s3_server.s3_config().model_copy(update={"endpoint_url": f"http://127.0.0.1:{port}"})
    error, elapsed = _timed_preflight(s3_url, cfg)
    assert error.kind == "unreachable" and "unreachable" in str(error)
    assert s3_url in str(error) and f"127.0.0.1:{port}" in str(error)
    assert elapsed < 5


@pytest.mark.slow
def test_s3_preflight_wrong_secret_names_credentials(s3_server, s3_url):
    cfg = s3_server.s3_config().model_copy(update={"secret_access_key": "not-the-secret"})
    error, elapsed = _timed_preflight(s3_url, cfg)
    assert error.kind == "credentials" and "credentials" in str(error) and s3_url in str(error)
    assert "not-the-secret" not in str(error)
    assert elapsed < 5


@pytest.mark.slow
def test_s3_preflight_missing_bucket(s3_server):
    url = "s3://no-such-bucket-here/runs"
    error, elapsed = _timed_preflight(url, s3_server.s3_config())
    assert error.kind == "no_bucket" and url in str(error)
    assert "no such bucket 'no-such-bucket-here'" in str(error)
    assert elapsed < 5
