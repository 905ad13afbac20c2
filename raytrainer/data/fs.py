"""Filesystems for datasets: local paths, s3:// and other fsspec URLs, with S3 settings from S3Config.

Opening (endpoint, region and credentials from S3Config, else the AWS environment) is shared with the
checkpoint store in `raytrainer.storage`; this module adds what datasets need on top: listing input files
from a directory or glob, reading small objects by URL, and committing a file so that a reader (or a
re-run after a crash) never sees half of it.

    fs, path = open_arrow_fs("s3://bucket/data/web", cfg.data.s3)   # pyarrow: Parquet, Ray Data
    files = list_files("s3://bucket/raw/**/*.jsonl", cfg.data.s3)   # sorted FileEntry list
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raytrainer.config import S3Config
from raytrainer.storage import Storage, join, open_filesystem, open_fsspec, open_storage, split_url

__all__ = [
    "FileEntry", "Storage", "TMP_MARK", "is_local", "join", "list_files", "open_arrow_fs", "open_fsspec",
    "open_storage", "read_bytes", "remove_temp_files", "sha256_hex", "split_url", "to_url", "write_committed",
]

TMP_MARK = ".tmp-"  # a file whose name contains this is an unfinished write, safe to delete on re-run
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class FileEntry:
    """One input file: where it is, how big, and a version stamp (mtime or ETag) that changes when it does."""

    url: str
    size: int
    version: str


def is_local(url: str) -> bool:
    return split_url(url)[0] == "local"


def open_arrow_fs(url: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path on it) for a local path or s3://bucket/prefix."""
    return open_filesystem(url, s3)


def to_url(fs_path: str, like: str) -> str:
    """Turn a path returned by an fsspec filesystem back into a URL of the same kind as `like`."""
    kind, _ = split_url(like)
    if kind == "local":
        return fs_path
    if kind == "s3":
        return "s3://" + fs_path.removeprefix("s3://")
    protocol = like.split("://", 1)[0]
    return fs_path if "://" in fs_path else f"{protocol}://{fs_path}"


def list_files(pattern: str, s3: S3Config | None = None, suffixes: tuple[str, ...] | None = None
               ) -> list[FileEntry]:
    """Files named by `pattern`, sorted by URL: a single file, a directory (walked recursively, hidden
    files and unfinished writes left out) or a glob (`**` matches any depth). With `suffixes`, only
    names ending in one of them are kept from directories and globs. [] when nothing matches."""
    fs, path = open_fsspec(pattern, s3)
    fs.invalidate_cache()  # fsspec reuses filesystem objects and their listings; inputs may have changed
    if any(c in _GLOB_CHARS for c in path):
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    elif fs.exists(path):
        return [_entry(fs.info(path), pattern)]
    else:
        return []
    entries = []
    for name, info in sorted(infos.items()):
        base = posixpath.basename(name)
        if info.get("type") != "file" or base.startswith(".") or TMP_MARK in base:
            continue
        if suffixes is not None and not base.endswith(suffixes):
            continue
        entries.append(_entry(info, pattern))
    return entries


def _entry(info: dict[str, Any], like: str) -> FileEntry:
    version = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    if hasattr(version, "isoformat"):
        version = version.isoformat()
    return FileEntry(url=to_url(info["name"], like), size=int(info.get("size") or 0), version=str(version))


def read_bytes(url: str, s3: S3Config | None = None) -> bytes:
    fs, path = open_fsspec(url, s3)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_committed(storage: Storage, rel: str, data: bytes) -> None:
    """Write a whole file so that it appears complete or not at all. Locally it is written under a
    temporary name (containing TMP_MARK) in the same directory and renamed; an S3 PUT is already atomic."""
    target = storage.path(rel)
    if not storage.is_local:
        with storage.fs.open_output_stream(target) as f:
            f.write(data)
        return
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_temp_files(storage: Storage) -> list[str]:
    """Delete unfinished writes (names containing TMP_MARK) left under the root by an interrupted run;
    returns their paths relative to the root."""
    removed = []
    for rel in storage.list_files():
        if TMP_MARK in posixpath.basename(rel):
            storage.delete_file(rel)
            removed.append(rel)
    return removed
