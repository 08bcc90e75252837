"""What the S3 executor's modules share: limits, the mapping of S3 failures onto the domain
errors, and the s3fs/rclone metadata convention (see executors/s3.py)."""
from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from .base import ExecutorError, InvalidArgument, NameTooLong, NotFound, PermissionDenied, RetriesExhausted

MiB = 1 << 20
GiB = 1 << 30
MAX_KEY_BYTES = 1024
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux; Python 3.11 does not name it
MAX_COPY_OBJECT = 5 * GiB  # CopyObject's limit; above it, a multipart copy (UploadPartCopy)
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
              "ServiceUnavailable", "RequestLimitExceeded"}

Statvfs = namedtuple("Statvfs", "f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_fsid "
                                "f_flag f_namemax")


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND or status == 404:
            raise NotFound(f"{what}: {code}") from exc
        if code in _DENIED or status == 403:
            raise PermissionDenied(f"{what}: {code}") from exc
        if code == "KeyTooLongError":
            raise NameTooLong(what) from exc
        if code in _THROTTLED or status >= 500 or status == 429:
            raise RetriesExhausted(f"{what}: {code or status} after retries") from exc
        raise ExecutorError(f"{what}: {code or status} {err.get('Message', '')}") from exc
    except (BotoConnectionError, BotoCoreError) as exc:
        raise RetriesExhausted(f"{what}: {exc}") from exc


def parse_root(root: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ('bucket', 'some/prefix/'); the bucket root has prefix ''."""
    if not root.startswith("s3://"):
        raise InvalidArgument(f"not an s3:// root: {root}")
    bucket, _, prefix = root[len("s3://"):].partition("/")
    if not bucket:
        raise InvalidArgument(f"no bucket in {root}")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def _mode_from_meta(raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        return int(raw, 8) if len(raw) > 1 and raw.startswith("0") else int(raw)
    except ValueError:
        return None


def _ns_from_meta(raw: str | None) -> int | None:
    if not raw:
        return None
    sec, _, frac = raw.partition(".")
    try:
        return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    except ValueError:
        return None


def _ns_to_meta(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def now_ns() -> int:
    """The time S3 changes are stamped with: the kernel's coarse clock, as a native filesystem
    stamps them (current_time()), so that a time the kernel takes for UTIME_NOW is never
    before a ctime this backend gave a moment earlier."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else value
