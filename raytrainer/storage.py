"""Opening storage: a local directory or s3://bucket/prefix, as a pyarrow FileSystem plus a root path.

    storage = open_storage("s3://bucket/runs", cfg.checkpoint.s3)
    storage.write_bytes("tiny/notes.txt", b"...")      # paths are relative to the root
    storage.fs, storage.root        # for Ray: RunConfig(storage_filesystem=..., storage_path=...)

S3 settings come from S3Config; every field left unset falls back to the standard AWS chain
(AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, ~/.aws/credentials and config, instance metadata). `preflight()` proves, within a
few seconds, that a location can be written, read back and deleted, and says in words why not.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from configparser import ConfigParser
from configparser import Error as IniError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raytrainer.config import S3Config, is_redacted, reveal

CHUNK_BYTES = 8 * 1024 * 1024
RANGE_BYTES = 16 * 1024 * 1024  # one ranged GET when fetching a big object in parallel
PREFLIGHT_TIMEOUT_S = 10.0


class StorageError(RuntimeError):
    """A storage location cannot be used. `kind` is one of: unreachable, timeout, credentials, no_bucket,
    config, local, other."""

    def __init__(self, message: str, kind: str = "other", url: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.url = url


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class S3Settings:
    """S3Config merged with the AWS environment: what actually gets used."""

    endpoint_url: str | None  # full URL, e.g. http://127.0.0.1:8333; None = AWS
    region: str | None
    access_key_id: str | None = field(repr=False)  # None = AWS credential chain
    secret_access_key: str | None = field(repr=False)

    @property
    def endpoint_host(self) -> str | None:
        if self.endpoint_url is None:
            return None
        parsed = urlparse(self.endpoint_url)
        return parsed.netloc or parsed.path

    @property
    def scheme(self) -> str:
        if self.endpoint_url is None:
            return "https"
        return urlparse(self.endpoint_url).scheme or "https"

    def describe(self) -> str:
        endpoint = self.endpoint_url or "AWS S3"
        creds = "the AWS credential chain"
        if self.access_key_id:
            creds = f"access key {_mask(self.access_key_id)}"
        return f"endpoint {endpoint}, region {self.region or 'default'}, {creds}"


def resolve_s3_settings(s3cfg: S3Config | None) -> S3Settings:
    s3cfg = s3cfg or S3Config()
    env = os.environ
    endpoint = s3cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        raise StorageError(
            f"S3 endpoint_url={endpoint!r} needs a scheme, e.g. http://{endpoint} or https://{endpoint}",
            "config",
        )
    region = s3cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region is None and endpoint:
        region = "us-east-1"  # S3-compatible servers ignore it, but signing needs one
    key_id, secret = _resolve_keys(s3cfg)
    return S3Settings(endpoint or None, region, key_id, secret)


_ENV_NAMES = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}


def _resolve_keys(s3cfg: S3Config) -> tuple[str | None, str | None]:
    """The key pair: from the config, else `credentials_file`, else (None, None) for the AWS chain.

    A redacted value (a config read back from a checkpoint) counts as unset and is filled from the
    environment, so a resumed run takes its keys from where it runs now, never from the checkpoint."""
    keys = {name: reveal(getattr(s3cfg, name)) for name in _ENV_NAMES}
    redacted = {name for name, value in keys.items() if is_redacted(value)}
    keys = {name: (None if name in redacted else value) or None for name, value in keys.items()}
    if not any(keys.values()) and not redacted and s3cfg.credentials_file:
        keys = _read_credentials_file(s3cfg.credentials_file, s3cfg.credentials_profile)
    if any(keys.values()) or redacted:
        for name, env in _ENV_NAMES.items():
            keys[name] = keys[name] or os.environ.get(env) or None
        missing = [name for name, value in keys.items() if not value]
        if missing:
            why = " (the config holds a redacted value)" if redacted & set(missing) else ""
            raise StorageError(
                f"s3.{missing[0]} is missing{why}: s3.access_key_id and s3.secret_access_key must be set "
                f"together; give s3.{missing[0]} in s3.credentials_file or {_ENV_NAMES[missing[0]]}, or "
                "leave both unset to use the AWS credential chain", "config"
            )
    return keys["access_key_id"], keys["secret_access_key"]


def _read_credentials_file(path: str, profile: str) -> dict[str, str | None]:
    # The AWS CLI's format, so the file `aws configure` writes works as is.
    parser = ConfigParser()
    try:
        with open(os.path.expanduser(path)) as f:
            parser.read_file(f)
    except OSError as e:
        raise StorageError(f"s3.credentials_file {path}: cannot be read ({e.strerror}); it must exist on "
                           "every node that opens storage", "config") from None
    except IniError:
        raise StorageError(f"s3.credentials_file {path}: not an INI file like ~/.aws/credentials "
                           "([default] with aws_access_key_id = ... and aws_secret_access_key = ...)",
                           "config") from None
    if not parser.has_section(profile):
        raise StorageError(f"s3.credentials_file {path}: no [{profile}] section (set s3.credentials_profile; "
                           f"sections: {parser.sections()})", "config")
    section = parser[profile]
    keys = {"access_key_id": section.get("aws_access_key_id"),
            "secret_access_key": section.get("aws_secret_access_key")}
    for name, value in keys.items():
        if not value:
            raise StorageError(f"s3.credentials_file {path}: [{profile}] has no aws_{name}", "config")
    return keys


def _mask(key: str | None) -> str:
    # Enough of the key id to tell two apart in a message, not enough to matter if logged.
    if not key:
        return "(none)"
    return key[:4] + "..." if len(key) > 8 else key


def pyarrow_s3_options(
    settings: S3Settings,
    connect_timeout: float | None = None,
    request_timeout: float | None = None,
    max_attempts: int | None = None,
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.access_key_id:
        options.update(access_key=settings.access_key_id, secret_key=settings.secret_access_key)
    if settings.region:
        options["region"] = settings.region
    if settings.endpoint_url:
        options.update(endpoint_override=settings.endpoint_host, scheme=settings.scheme)
    if connect_timeout is not None:
        options["connect_timeout"] = connect_timeout
    if request_timeout is not None:
        options["request_timeout"] = request_timeout
    if max_attempts is not None:
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    return options


def s3fs_options(s3cfg: S3Config | None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, max_attempts: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `s3fs.S3FileSystem` (also usable as fsspec `storage_options`)."""
    settings = resolve_s3_settings(s3cfg)
    options: dict[str, Any] = {}
    if settings.access_key_id:
        options.update(key=settings.access_key_id, secret=settings.secret_access_key)
    if settings.endpoint_url:
        options["endpoint_url"] = settings.endpoint_url
    if settings.region:
        options["client_kwargs"] = {"region_name": settings.region}
    config: dict[str, Any] = {}
    if connect_timeout is not None:
        config["connect_timeout"] = connect_timeout
    if read_timeout is not None:
        config["read_timeout"] = read_timeout
    if max_attempts is not None:
        config["retries"] = {"max_attempts": max_attempts, "mode": "standard"}
    if config:
        options["config_kwargs"] = config
    return options


# --------------------------------------------------------------------------- opening


def split_url(url: str) -> tuple[str, str]:
    """("s3", "bucket/prefix") for s3:// URLs; ("local", "/absolute/path") for paths and file:// URLs;
    (scheme, url) for anything else pyarrow understands (gs://, hdfs://...)."""
    url = str(url)
    parsed = urlparse(url)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"storage URL {url!r} has no bucket; expected s3://bucket/prefix",
                               "config", url)
        path = posixpath.normpath(f"{parsed.netloc}/{parsed.path.strip('/')}").rstrip("/")
        return "s3", path
    if parsed.scheme == "file":
        return "local", os.path.abspath(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        # Absolute, because Ray runs workers in their own working directories.
        return "local", os.path.abspath(os.path.expanduser(url))
    return parsed.scheme, url


def open_filesystem(url: str, s3cfg: S3Config | None = None, *, connect_timeout: float | None = None,
                    request_timeout: float | None = None, max_attempts: int | None = None
                    ) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path on it) for a local path or s3://bucket/prefix."""
    kind, path = split_url(url)
    if kind == "local":
        return pafs.LocalFileSystem(), path
    if kind == "s3":
        settings = resolve_s3_settings(s3cfg)
        options = pyarrow_s3_options(settings, connect_timeout, request_timeout, max_attempts)
        if "region" not in options and not settings.endpoint_url:
            options["region"] = _aws_bucket_region(path.split("/", 1)[0])
        return pafs.S3FileSystem(**options), path
    try:
        fs, fs_path = pafs.FileSystem.from_uri(url)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"storage URL {url!r}: unsupported ({e}); use a local path or s3://bucket/prefix",
                           "config", url) from e
    return fs, fs_path


def _aws_bucket_region(bucket: str) -> str | None:
    # Real AWS needs the bucket's own region; a failed lookup leaves it to the SDK's default chain.
    try:
        return pafs.resolve_s3_region(bucket)
    except Exception:
        return None


def open_fsspec(url: str, s3cfg: S3Config | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for the same locations, for libraries that speak fsspec."""
    kind, path = split_url(url)
    if kind == "local":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), path
    if kind == "s3":
        import s3fs

        return s3fs.S3FileSystem(**s3fs_options(s3cfg)), path
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(url)
    return fs, fs_path


def open_storage(url: str, s3cfg: S3Config | None = None, **timeouts: Any) -> Storage:
    """A Storage rooted at `url` (local path or s3://bucket/prefix). `timeouts`: connect_timeout,
    request_timeout, max_attempts (S3 only)."""
    fs, root = open_filesystem(url, s3cfg, **timeouts)
    settings = resolve_s3_settings(s3cfg) if split_url(url)[0] == "s3" else None
    return Storage(fs=fs, root=root, url=_display_url(url), settings=settings)


def _display_url(url: str) -> str:
    kind, path = split_url(url)
    if kind == "s3":
        return f"s3://{path}"
    return path if kind == "local" else url


# --------------------------------------------------------------------------- the handle


@dataclass(frozen=True)
class Storage:
    """A filesystem and a root directory on it. Every path argument is relative to the root."""

    fs: pafs.FileSystem
    root: str  # path on fs: "bucket/prefix" for S3, an absolute path locally
    url: str  # for messages: s3://bucket/prefix or the local path
    settings: S3Settings | None = None

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return join(self.url, *parts)

    def child(self, *parts: str) -> Storage:
        return Storage(self.fs, self.path(*parts), self.uri(*parts), self.settings)

    def describe(self) -> str:
        return self.url + (f" ({self.settings.describe()})" if self.settings else "")

    # ---- queries

    def info(self, rel: str = "") -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        """A file or directory is there. On S3 a "directory" is a prefix, and some servers (SeaweedFS) keep
        reporting an emptied prefix as one, so ask list_files() whether a directory holds anything."""
        return self.info(rel).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int | None:
        info = self.info(rel)
        return info.size if info.type == pafs.FileType.File else None

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel (files and directories), sorted; [] when it does not exist."""
        base = self.path(rel)
        if self.is_local:
            # Names only: pyarrow's local selector stats every entry, which grows with a run's step count.
            try:
                return sorted(os.listdir(base))
            except (FileNotFoundError, NotADirectoryError):
                return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def list_files(self, rel: str = "") -> dict[str, int]:
        """{path relative to rel: size} for every file below rel (recursive); {} when it does not exist."""
        base = self.path(rel).rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        return {_relative(i.path, base): i.size for i in infos if i.type == pafs.FileType.File}

    # ---- bytes

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object. An S3 PUT is atomic; locally the file is written aside and renamed, so a
        reader never sees half of it."""
        target = self.path(rel)
        if not self.is_local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def delete_file(self, rel: str, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_tree(self, rel: str = "") -> None:
        """Delete a directory and everything under it; nothing happens when it does not exist."""
        target = self.path(rel)
        info = self.fs.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            try:
                self.fs.delete_dir(target)
            except FileNotFoundError:
                pass  # an emptied S3 prefix that the server still reported as a directory
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(target)

    # ---- files and directories

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> tuple[int, str]:
        """Stream a local file up; returns (size, sha256) computed from the bytes as they are sent."""
        target = self.path(rel)
        if self.is_local:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
        digest = hashlib.sha256()
        size = 0
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        with open(local_path, "rb", buffering=0) as src, self.fs.open_output_stream(target) as dst:
            while n := src.readinto(buf):
                chunk = view[:n]
                digest.update(chunk)
                dst.write(chunk)
                size += n
        return size, digest.hexdigest()

    def read_chunks(self, rel: str, parallel: int = 4) -> Iterator[memoryview | bytes]:
        """The object's bytes in order. On S3, big objects are fetched as concurrent ranged GETs
        (`parallel` in flight, RANGE_BYTES each) while the caller consumes them in order: one stream
        per object is latency-bound, and a checkpoint is usually one big file per rank."""
        path = self.path(rel)
        if self.is_local or parallel <= 1:
            with self.fs.open_input_stream(path) as src:
                while chunk := src.read(CHUNK_BYTES):
                    yield chunk
            return
        with self.fs.open_input_file(path) as src:
            size = src.size()
            offsets = range(0, size, RANGE_BYTES)
            if len(offsets) <= 1:
                yield src.read_at(size, 0) if size else b""
                return
            # read_at is a stateless ranged GET, safe to issue from several threads on one handle.
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                pending: deque = deque()
                for offset in offsets:
                    pending.append(pool.submit(src.read_at, min(RANGE_BYTES, size - offset), offset))
                    if len(pending) > parallel:
                        yield memoryview(pending.popleft().result())
                while pending:
                    yield memoryview(pending.popleft().result())

    def download_file(self, rel: str, local_path: str | os.PathLike) -> tuple[int, str]:
        """Fetch an object into a local file; returns (size, sha256) of the bytes received."""
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with open(local_path, "wb") as dst:
            for chunk in self.read_chunks(rel):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def hash_file(self, rel: str) -> tuple[int, str]:
        """(size, sha256) of an object, read back from storage."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self.read_chunks(rel):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    def upload_dir(self, local_dir: str | os.PathLike, rel: str = "") -> None:
        """Copy a local directory tree under rel (pyarrow.fs.copy_files)."""
        target = self.path(rel)
        if self.is_local:
            self.fs.create_dir(target, recursive=True)
        # Threaded uploads to S3 through copy_files can deadlock (apache/arrow#32372), as Ray also notes.
        pafs.copy_files(str(Path(local_dir).resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs, chunk_size=CHUNK_BYTES * 8,
                        use_threads=self.is_local)

    def download_dir(self, rel: str, local_dir: str | os.PathLike) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(Path(local_dir).resolve()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem(), chunk_size=CHUNK_BYTES * 8)


def join(base: str, *parts: str) -> str:
    """Join path segments with '/', ignoring empty ones (works for fs paths and URLs alike)."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out not in ("", "/") else f"{out}{part}"
    return out


def _relative(path: str, base: str) -> str:
    path = path.rstrip("/")
    if base and path.startswith(base + "/"):
        return path[len(base) + 1:]
    return posixpath.relpath(path, base)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- preflight


def explain_storage_error(exc: BaseException) -> tuple[str, str]:
    """(kind, plain-words reason) for an exception raised by pyarrow/AWS/the OS."""
    text = str(exc)
    upper = text.upper()
    if any(t in upper for t in ("NO_SUCH_BUCKET", "NOSUCHBUCKET", "BUCKET DOES NOT EXIST")) or (
        "BUCKET" in upper and "NOT FOUND" in upper
    ):
        return "no_bucket", "no such bucket"
    if any(t in upper for t in ("SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH", "INVALID_ACCESS_KEY_ID",
                                "INVALIDACCESSKEYID", "ACCESS_DENIED", "ACCESSDENIED", "FORBIDDEN",
                                "MISSING_AUTHENTICATION_TOKEN", "UNRECOGNIZEDCLIENT", "EXPIRED_TOKEN",
                                "INVALIDTOKEN", "NO CREDENTIALS", "UNABLE TO LOCATE CREDENTIALS")):
        return "credentials", (
            "credentials rejected: wrong access key id or secret access key, expired token, or no "
            "permission on this bucket/prefix"
        )
    if any(t in upper for t in ("NETWORK_CONNECTION", "COULD NOT CONNECT", "COULDN'T CONNECT",
                                "COULD NOT RESOLVE", "COULDN'T RESOLVE", "CONNECTION REFUSED",
                                "CURLCODE: 7", "CURLCODE: 6", "CURLCODE: 28", "TIMEOUT", "TIMED OUT")):
        return "unreachable", "endpoint unreachable (nothing answers at that host and port, or DNS fails)"
    if isinstance(exc, PermissionError):
        return "local", "permission denied"
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return "local", "a file is in the way of the directory"
    return "other", text


def preflight(url: str, s3cfg: S3Config | None = None, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Write, read back and delete a probe object under `url`; raise StorageError saying why not.

    Timeouts and retries are kept low and the whole probe has a deadline, so a wrong port, wrong
    secret or missing bucket is reported in seconds rather than after the SDK's minutes of retries.
    """
    storage = open_storage(url, s3cfg, connect_timeout=2.0, request_timeout=5.0, max_attempts=1)
    where = _describe_location(url, s3cfg)
    if storage.is_local:
        try:
            Path(storage.root).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            kind, reason = explain_storage_error(e)
            message = f"storage {where}: cannot create the directory: {reason} ({e})"
            raise StorageError(message, kind, url) from e

    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        name = f".raytrainer-preflight-{uuid.uuid4().hex[:12]}"
        payload = f"raytrainer preflight {uuid.uuid4()}".encode()
        try:
            storage.write_bytes(name, payload)
            back = storage.read_bytes(name)
            storage.delete_file(name, missing_ok=False)
            if back != payload:
                raise OSError(f"read back {len(back)} bytes that differ from the {len(payload)} written")
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="storage-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StorageError(
            f"storage {where}: no answer within {timeout_s:.0f}s writing a probe object; the endpoint is "
            "unreachable or not an S3 server (check the host, port and scheme)", "timeout", url
        )
    error = outcome.get("error")
    if error is not None:
        kind, reason = explain_storage_error(error)
        if kind == "no_bucket" and not storage.is_local:
            reason += f" {storage.root.split('/', 1)[0]!r}"
        hint = {
            "no_bucket": "create the bucket first or fix the bucket name in the URL",
            "credentials": "check s3.credentials_file or s3.access_key_id / s3.secret_access_key (or "
                           "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)",
            "unreachable": "check s3.endpoint_url (or AWS_ENDPOINT_URL), and that the server is running",
        }.get(kind, "")
        message = f"storage {where} is not usable: {reason}"
        if reason != str(error):
            message += f" [{error}]"
        if hint:
            message += f"; {hint}"
        raise StorageError(message, kind, url) from error


def _describe_location(url: str, s3cfg: S3Config | None) -> str:
    if split_url(url)[0] == "s3":
        return f"{_display_url(url)} ({resolve_s3_settings(s3cfg).describe()})"
    return _display_url(url)
