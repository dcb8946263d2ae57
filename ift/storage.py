"""Local and s3:// paths behind one small set of functions.

S3 goes through boto3 (and pyarrow's S3FileSystem for parquet), honouring
AWS_ENDPOINT_URL so S3-compatible stores work. Writes are atomic: a local file is written
to a temporary name and renamed; an S3 object appears whole or not at all. Directories
that must be complete (checkpoints, prepared datasets) carry a marker file written last.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE"


def is_remote(path: str) -> bool:
    return str(path).startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{str(p).strip('/')}"
        return out
    return os.path.join(base, *parts)


def split_s3(path: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    rest = path[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# Attempts per S3 request (the first one included) unless AWS_MAX_ATTEMPTS, the AWS SDKs'
# own setting, says otherwise. Retries carry a run through a store that restarts under it.
S3_ATTEMPTS = 10


def max_attempts() -> int:
    value = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if not value:
        return S3_ATTEMPTS
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"AWS_MAX_ATTEMPTS={value!r}: expected a whole number >= 1") from None
    if n < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS={value!r}: expected a whole number >= 1")
    return n


@lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, attempts: int = S3_ATTEMPTS):
    import boto3
    from botocore.config import Config as BotoConfig

    # Standard mode: exponential backoff with jitter, connection errors included.
    cfg = BotoConfig(retries={"total_max_attempts": attempts, "mode": "standard"},
                     connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def s3_client():
    return _s3_client(endpoint_url(), max_attempts())


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem whose pickle keeps its options, the retry strategy included.

    Ray ships a run's storage filesystem to its controller and workers by pickling it, and
    pyarrow's own pickle drops the retry strategy (back to 3 attempts)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._ift_kwargs = kwargs

    def __reduce__(self):
        return _s3_filesystem, (self._ift_kwargs,)


def _s3_filesystem(kwargs: dict) -> _S3FileSystem:
    return _S3FileSystem(**kwargs)


def arrow_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    if is_remote(path):
        bucket, key = split_s3(path)
        ep = endpoint_url()
        # pyarrow's own default gives up after 3 quick attempts (about a second); with
        # exponential backoff from 25 ms, 10 attempts ride out about 25 s.
        kwargs: dict = {"retry_strategy": pafs.AwsDefaultS3RetryStrategy(
            max_attempts=max_attempts())}
        if ep:
            scheme, _, host = ep.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme or "http")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return _S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    if is_remote(path):
        bucket, key = split_s3(path)
        cli = s3_client()
        try:
            cli.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:  # noqa: BLE001 - a missing key raises ClientError 404
            resp = cli.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
            return resp.get("KeyCount", 0) > 0
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        bucket, key = split_s3(path)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(path, "rb") as f:
        return f.read()


def read_range(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file."""
    if end <= start:
        return b""
    if is_remote(path):
        bucket, key = split_s3(path)
        resp = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        return resp["Body"].read()
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def size(path: str) -> int:
    if is_remote(path):
        bucket, key = split_s3(path)
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> dict:
    """A JSON file's content, or {} when the file is absent or not valid JSON (a status
    file being rewritten, or never written)."""
    if not exists(path):
        return {}
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError:
        return {}


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: readers see the old file or the whole new one."""
    if is_remote(path):
        bucket, key = split_s3(path)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names directly under a directory (files and sub-directories)."""
    if is_remote(path):
        bucket, key = split_s3(path)
        prefix = key.rstrip("/") + "/" if key else ""
        names: set[str] = set()
        for page in s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        ):
            for c in page.get("CommonPrefixes", []):
                names.add(c["Prefix"][len(prefix) :].rstrip("/"))
            for o in page.get("Contents", []):
                names.add(o["Key"][len(prefix) :])
        return sorted(n for n in names if n)
    if not os.path.isdir(path):
        return []
    return sorted(os.listdir(path))


def walk_files(path: str) -> Iterator[str]:
    """Every file below a directory, recursively, sorted."""
    if is_remote(path):
        bucket, key = split_s3(path)
        prefix = key.rstrip("/") + "/" if key else ""
        for k, _etag, _size in sorted(_s3_objects(bucket, prefix)):
            yield f"s3://{bucket}/{k}"
        return
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            yield os.path.join(root, name)


def _s3_objects(bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    """(key, etag, size) of every object under a prefix, without directory-marker keys."""
    out = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                out.append((o["Key"], o.get("ETag", ""), int(o.get("Size", 0))))
    return out


def isdir(path: str) -> bool:
    if is_remote(path):
        bucket, key = split_s3(path)
        resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    return os.path.isdir(path)


def expand(path: str) -> list[str]:
    """A file, glob or folder -> the sorted list of files it names (hidden files skipped)."""
    has_glob = any(c in path for c in "*?[")
    if is_remote(path):
        if has_glob:
            bucket, key = split_s3(path)
            static = key.split("*")[0].split("?")[0].split("[")[0]
            base = f"s3://{bucket}/{static.rsplit('/', 1)[0]}" if "/" in static else f"s3://{bucket}"
            return [f for f in walk_files(base) if fnmatch.fnmatch(f, path)]
        if isdir(path):
            return [f for f in walk_files(path) if not _hidden(f)]
        return [path]
    if has_glob:
        return sorted(f for f in _glob.glob(path, recursive=True) if os.path.isfile(f))
    if os.path.isdir(path):
        return [f for f in walk_files(path) if not _hidden(f)]
    return [path]


def _hidden(path: str) -> bool:
    return os.path.basename(path).startswith((".", "_"))


def rmtree(path: str) -> None:
    if is_remote(path):
        bucket, key = split_s3(path)
        cli = s3_client()
        keys = [{"Key": split_s3(f)[1]} for f in walk_files(path)]
        for i in range(0, len(keys), 1000):
            cli.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
        return
    shutil.rmtree(path, ignore_errors=True)


def upload_dir(local: str, remote: str) -> None:
    """Copy a local directory to a (local or s3) destination, marker files last."""
    files = [f for f in walk_files(local)]
    files.sort(key=lambda f: os.path.basename(f) == COMPLETE_MARKER)
    for f in files:
        rel = os.path.relpath(f, local)
        dest = join(remote, *rel.split(os.sep))
        if is_remote(remote):
            bucket, key = split_s3(dest)
            s3_client().upload_file(f, bucket, key)
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(f, dest)


def download_dir(remote: str, local: str) -> str:
    """Copy a (local or s3) directory to a local one; returns the local path."""
    if not is_remote(remote):
        if os.path.abspath(remote) != os.path.abspath(local):
            shutil.copytree(remote, local, dirs_exist_ok=True)
        return local
    bucket, key = split_s3(remote)
    prefix = key.rstrip("/") + "/"
    for f in walk_files(remote):
        rel = split_s3(f)[1][len(prefix) :]
        dest = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        s3_client().download_file(bucket, split_s3(f)[1], dest)
    return local


def local_copy(path: str, cache_root: str | None = None) -> str:
    """A local directory holding `path`: itself when local, a cached download when s3://."""
    if not is_remote(path):
        return path

    root = cache_root or os.path.join(tempfile.gettempdir(), "ift-cache")
    # Keyed by the listing (keys, etags, sizes) too, so a rewritten prefix is fetched again.
    bucket, key = split_s3(path)
    listing = sorted(_s3_objects(bucket, key.rstrip("/") + "/"))
    if not listing:
        raise FileNotFoundError(f"{path}: no objects under this prefix")
    fingerprint = hashlib.sha1(repr(listing).encode()).hexdigest()[:12]
    dest = os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16] + "-" + fingerprint)
    if os.path.exists(os.path.join(dest, COMPLETE_MARKER + ".local")):
        return dest
    download_dir(path, dest)
    with open(os.path.join(dest, COMPLETE_MARKER + ".local"), "w") as f:
        f.write(path)
    return dest


def mark_complete(path: str, text: str = "") -> None:
    write_text(join(path, COMPLETE_MARKER), text)


def is_complete(path: str) -> bool:
    return exists(join(path, COMPLETE_MARKER))
