"""The S3 executor: a bucket prefix as a directory tree, on boto3.

Layout in the bucket (what s3fs and rclone read and write):
- a file is an object `<prefix><path>`; a directory is a marker object `<prefix><path>/`
  (written by mkdir, so empty directories survive) or only implied by the keys under it;
- mode, owner and times are object metadata `x-amz-meta-mode` (decimal st_mode with the type
  bits, as s3fs writes it; an octal value with a leading 0, as rclone writes it, is read too),
  `-uid`, `-gid`, `-mtime` and `-atime` (seconds, with a fraction for nanoseconds);
- a symlink is an object whose body is the target and whose mode has S_IFLNK (s3fs); a FIFO,
  socket or device is an empty object with its type bits in mode and `x-amz-meta-rdev`.

Writes: content is spooled to a local file under FILESTORE_HOME (the staging area of this
executor, never the bucket) and uploaded when it lands: one PUT, or a multipart upload with
parts sent in parallel above `multipart_threshold`. Every upload carries Content-MD5 (the
store refuses a corrupted body) and its ETag is checked against the one computed locally
before `land` returns, so a write command never commits content S3 does not hold.

Retries: botocore's own retry handler (`standard` mode: exponential backoff with jitter on
throttling, 5xx and connection errors, bounded by `max_attempts`); what still fails raises
RetriesExhausted, which the command reports as EIO.

Names S3 cannot hold are refused before anything is uploaded: a component that is not UTF-8
answers EILSEQ (IllegalName), a key over 1,024 bytes ENAMETOOLONG. There are no hard links
(EPERM) and no atomic RENAME_EXCHANGE (EINVAL, what Linux filesystems without it answer).
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat as stat_mod
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

from .base import (TYPE_BITS, AlreadyExists, ExecutorError, IllegalName, InvalidArgument, NameTooLong,
                   NotEmpty, NotFound, NotPermitted, PartlyDone, PermissionDenied, RetriesExhausted, Stat,
                   from_os_error, kind_of,
                   validate_name)
from .s3cache import ChunkCache, Reader

MiB = 1 << 20
GiB = 1 << 30
MAX_KEY_BYTES = 1024
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


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else value


@dataclass
class _Sparse:
    """A spool file standing for object `key` at `etag`, its parts fetched on demand."""
    key: str
    etag: str
    valid: int  # the old object's bytes below this offset still count (cut by truncation)
    part: int
    present: set[int] = field(default_factory=set)  # parts fetched (or written) into the spool


class S3Executor:
    kind = "s3"
    in_place = False  # no descriptor onto an object: changes to a file go through a spool copy
    owns_files = True  # owner and mode are object metadata, whoever the daemon runs as

    def __init__(self, root: str, *, spool_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 1 * GiB, endpoint_url: str | None = None, region: str | None = None,
                 read_only: bool = False, part_size: int = 16 * MiB, multipart_threshold: int = 32 * MiB,
                 copy_threshold: int = MAX_COPY_OBJECT, chunk_size: int = 8 * MiB, readahead: int = 4,
                 workers: int = 16, max_attempts: int = 5, connect_timeout: float = 5, read_timeout: float = 30,
                 default_uid: int | None = None, default_gid: int | None = None):
        self.root = root
        self.bucket, self.prefix = parse_root(root)
        self.read_only = read_only
        self.part_size = max(part_size, 5 * MiB)  # S3's minimum part (but the last)
        self.multipart_threshold = multipart_threshold
        self.copy_threshold = copy_threshold
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.default_uid = os.getuid() if default_uid is None else default_uid
        self.default_gid = os.getgid() if default_gid is None else default_gid
        config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        max_pool_connections=workers * 2 + 4,
                        # Integrity is checked with MD5s and ETags (below); botocore's default CRC32 on
                        # every upload would be a second pass over the bytes, and aws-chunked bodies.
                        request_checksum_calculation="when_required")
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="s3")
        self._reader_pool = ThreadPoolExecutor(max(readahead, 1) * 2, thread_name_prefix="s3-read")
        self.spool = Path(spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.cache = ChunkCache(Path(cache_dir), cache_bytes) if cache_dir is not None else None
        self._sparse: dict[str, _Sparse] = {}
        self.parts_copied = 0  # parts landed by server-side copy instead of upload (for tests)
        with _s3_errors(f"bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._reader_pool.shutdown(wait=False, cancel_futures=True)

    # -- keys -------------------------------------------------------------------------
    def check_name(self, parent: bytes, name: bytes) -> None:
        """Refuse, before anything is uploaded, a name S3 cannot hold."""
        validate_name(name)
        self._dir_key(self._join(parent, name))

    @staticmethod
    def _join(parent: bytes, name: bytes) -> bytes:
        parent = parent.strip(b"/")
        return parent + b"/" + name if parent else name

    def _key(self, rel: bytes) -> str:
        rel = rel.strip(b"/")
        try:
            text = rel.decode("utf-8")
        except UnicodeDecodeError:
            raise IllegalName(f"S3 keys are UTF-8; {rel!r} is not") from None
        key = self.prefix + text
        if len(key.encode()) + 1 > MAX_KEY_BYTES:  # + 1: a directory's marker ends with '/'
            raise NameTooLong(f"S3 key of {len(key.encode())} bytes (limit {MAX_KEY_BYTES - 1} here)")
        return key

    def _dir_key(self, rel: bytes) -> str:
        rel = rel.strip(b"/")
        return self._key(rel) + "/" if rel else self.prefix

    # -- metadata ---------------------------------------------------------------------
    def _meta(self, kind: str, mode: int, uid: int, gid: int, mtime_ns: int | None = None,
              atime_ns: int | None = None, rdev: int = 0) -> dict[str, str]:
        now = time.time_ns()
        meta = {"mode": str(TYPE_BITS[kind] | (mode & 0o7777)), "uid": str(uid), "gid": str(gid),
                "mtime": _ns_to_meta(mtime_ns or now), "atime": _ns_to_meta(atime_ns or mtime_ns or now)}
        if rdev:
            meta["rdev"] = str(rdev)
        return meta

    def _stat_of(self, head: dict, *, is_dir: bool, key: str) -> Stat:
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        raw_mode = _mode_from_meta(meta.get("mode"))
        if is_dir:
            kind, mode = "dir", stat_mod.S_IMODE(raw_mode) if raw_mode else 0o755
        elif raw_mode and stat_mod.S_IFMT(raw_mode) and stat_mod.S_IFMT(raw_mode) != stat_mod.S_IFDIR:
            kind, mode = kind_of(raw_mode), stat_mod.S_IMODE(raw_mode)
        else:
            kind, mode = "file", stat_mod.S_IMODE(raw_mode) if raw_mode else 0o644
        modified = head.get("LastModified")
        fallback = int(modified.timestamp() * 1e9) if modified is not None else time.time_ns()
        mtime = _ns_from_meta(meta.get("mtime")) or fallback
        size = int(head.get("ContentLength", head.get("Size", 0)) or 0)
        target = self._get_body(key) if kind == "symlink" else None
        return Stat(kind=kind, size=0 if kind in ("dir",) else (len(target) if target is not None else size),
                    mode=mode, uid=int(meta.get("uid", self.default_uid)),
                    gid=int(meta.get("gid", self.default_gid)), rdev=int(meta.get("rdev", 0)),
                    atime_ns=_ns_from_meta(meta.get("atime")) or mtime, mtime_ns=mtime, ctime_ns=mtime,
                    target=target, checksum=None if is_dir else _etag(head.get("ETag")))

    def _implied_dir(self) -> Stat:
        now = time.time_ns()
        return Stat("dir", 0, 0o755, self.default_uid, self.default_gid, 0, now, now, now)

    def _head(self, key: str) -> dict | None:
        try:
            with _s3_errors(f"HEAD {key}"):
                return self.client.head_object(Bucket=self.bucket, Key=key)
        except NotFound:
            return None

    def _get_body(self, key: str) -> bytes:
        with _s3_errors(f"GET {key}"):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def _any_under(self, dir_key: str, *, besides_marker: bool = False) -> bool:
        with _s3_errors(f"LIST {dir_key}"):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=dir_key, MaxKeys=2)
        keys = [o["Key"] for o in resp.get("Contents", [])]
        if besides_marker:
            keys = [k for k in keys if k != dir_key]
        return bool(keys)

    def _is_dir(self, rel: bytes) -> bool:
        return not rel.strip(b"/") or self._head(self._dir_key(rel)) is not None or \
            self._any_under(self._dir_key(rel))

    # -- reading ----------------------------------------------------------------------
    def stat(self, rel: bytes) -> Stat:
        rel = rel.strip(b"/")
        if not rel:
            head = self._head(self.prefix) if self.prefix else None
            return self._stat_of(head, is_dir=True, key=self.prefix) if head else self._implied_dir()
        key = self._key(rel)
        head = self._head(key)
        if head is not None:
            return self._stat_of(head, is_dir=False, key=key)
        head = self._head(key + "/")
        if head is not None:
            return self._stat_of(head, is_dir=True, key=key + "/")
        if self._any_under(key + "/"):
            return self._implied_dir()
        raise NotFound(f"no object or prefix {key}")

    def listdir(self, rel: bytes) -> list[tuple[bytes, Stat]]:
        """Every entry of a directory (paginated LIST with a delimiter); a HEAD per entry,
        in parallel, for the metadata that listings do not carry. Keys that cannot be names
        (an empty component, '.' or '..') are skipped."""
        dir_key = self._dir_key(rel)
        files: dict[str, dict] = {}
        dirs: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(f"LIST {dir_key}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=dir_key, Delimiter="/"):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(dir_key):]
                    if name and name not in (".", ".."):
                        files[name] = obj
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(dir_key):-1]
                    if name and name not in (".", "..") and "/" not in name:
                        dirs.add(name)
        for name in dirs:
            files.pop(name, None)  # a key `x` beside keys under `x/`: the directory wins

        def one(item: tuple[str, bool]) -> tuple[bytes, Stat] | None:
            name, is_dir = item
            key = dir_key + name + ("/" if is_dir else "")
            head = self._head(key)
            if head is None:
                return (name.encode(), self._implied_dir()) if is_dir else None
            return name.encode(), self._stat_of(head, is_dir=is_dir, key=key)

        items = [(n, False) for n in files] + [(n, True) for n in dirs]
        return [r for r in self.pool.map(one, items) if r is not None]

    def readlink(self, rel: bytes) -> bytes:
        return self._get_body(self._key(rel))

    def open_file(self, rel: bytes, *, write: bool) -> int:
        raise InvalidArgument("S3 objects have no descriptor; use reader() and stage()")

    def reader(self, rel: bytes, *, size: int, etag: str | None, cache_key: str | None) -> Reader:
        """Ranged reads of the object at `rel` as it was at `etag` (checked with If-Match);
        chunks are cached under `cache_key` (node id + ETag) when given."""
        key = self._key(rel)
        if etag is None:
            head = self._head(key)
            if head is None:
                raise NotFound(key)
            etag, size = _etag(head["ETag"]), head["ContentLength"]

        def fetch(start: int, end: int) -> bytes:
            with _s3_errors(f"GET {key}"):
                return self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}",
                                              IfMatch=f'"{etag}"')["Body"].read()

        cache = self.cache if cache_key else None
        return Reader(fetch, size, cache, cache_key or "", self._reader_pool, self.chunk_size, self.readahead)

    def statfs(self) -> Statvfs:
        """S3 has no capacity: a large, constant free space, as s3fs and rclone report."""
        blocks = 1 << 40  # 4 PiB in 4 KiB blocks
        return Statvfs(4096, 4096, blocks, blocks, blocks, 1 << 32, 1 << 32, 1 << 32,
                       hash(("s3", self.bucket, self.prefix)) & 0xFFFFFFFF, 0, 255)

    # -- changing ---------------------------------------------------------------------
    def _put(self, key: str, body: bytes, meta: dict[str, str], *, new: bool = False) -> str:
        """One PUT; with `new`, conditional (If-None-Match: *): AlreadyExists if the key is taken,
        decided by the store atomically and at no extra round trip."""
        md5 = hashlib.md5(body)
        extra = {"IfNoneMatch": "*"} if new else {}
        try:
            with _s3_errors(f"PUT {key}"):
                resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=meta,
                                              ContentMD5=base64.b64encode(md5.digest()).decode(), **extra)
        except ExecutorError as exc:
            cause = exc.__cause__
            if new and isinstance(cause, ClientError) and \
                    cause.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise AlreadyExists(key) from cause
            raise
        etag = _etag(resp.get("ETag"))
        if etag != md5.hexdigest():
            raise RetriesExhausted(f"PUT {key}: ETag {etag} does not match the content sent")
        return etag

    def _stat_new(self, kind: str, size: int, mode: int, uid: int, gid: int, meta: dict, etag: str | None,
                  target: bytes | None = None, rdev: int = 0) -> Stat:
        mtime = _ns_from_meta(meta["mtime"])
        return Stat(kind, size, mode & 0o7777, uid, gid, rdev, _ns_from_meta(meta["atime"]), mtime, mtime,
                    target=target, checksum=etag)

    def mkdir(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat:
        self.check_name(parent, name)
        meta = self._meta("dir", mode, uid, gid)
        self._put(self._dir_key(self._join(parent, name)), b"", meta)
        return self._stat_new("dir", 0, mode, uid, gid, meta, None)

    def create_file(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat:
        self.check_name(parent, name)
        meta = self._meta("file", mode, uid, gid)
        etag = self._put(self._key(self._join(parent, name)), b"", meta, new=True)
        return self._stat_new("file", 0, mode, uid, gid, meta, etag)

    def symlink(self, parent: bytes, name: bytes, target: bytes, uid: int, gid: int) -> Stat:
        self.check_name(parent, name)
        meta = self._meta("symlink", 0o777, uid, gid)
        etag = self._put(self._key(self._join(parent, name)), target, meta, new=True)
        return self._stat_new("symlink", len(target), 0o777, uid, gid, meta, etag, target=target)

    def mknod(self, parent: bytes, name: bytes, kind: str, mode: int, rdev: int, uid: int, gid: int) -> Stat:
        self.check_name(parent, name)
        meta = self._meta(kind, mode, uid, gid, rdev=rdev)
        etag = self._put(self._key(self._join(parent, name)), b"", meta, new=True)
        return self._stat_new(kind, 0, mode, uid, gid, meta, etag, rdev=rdev)

    def link(self, src: bytes, parent: bytes, name: bytes) -> Stat:
        raise NotPermitted("S3 has no hard links")

    def unlink(self, parent: bytes, name: bytes) -> None:
        key = self._key(self._join(parent, name))
        with _s3_errors(f"DELETE {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def rmdir(self, parent: bytes, name: bytes) -> None:
        dir_key = self._dir_key(self._join(parent, name))
        if self._any_under(dir_key, besides_marker=True):
            raise NotEmpty(dir_key)
        with _s3_errors(f"DELETE {dir_key}"):
            self.client.delete_object(Bucket=self.bucket, Key=dir_key)

    def rename(self, src_parent: bytes, src_name: bytes, dst_parent: bytes, dst_name: bytes,
               *, noreplace: bool = False, exchange: bool = False) -> None:
        """Server-side copy, then delete. A directory is every object under its prefix: all are
        copied first (in parallel), and the sources deleted only then (in batches of 1,000), so
        an interruption never loses an object: it leaves both trees, and running the same
        rename again finishes it (`finish_rename`)."""
        if exchange:
            raise InvalidArgument("S3 cannot exchange two names atomically")
        self.check_name(dst_parent, dst_name)
        src_rel, dst_rel = self._join(src_parent, src_name), self._join(dst_parent, dst_name)
        src_key, dst_key = self._key(src_rel), self._key(dst_rel)
        if noreplace and (self._head(dst_key) is not None or self._is_dir(dst_rel)):
            raise AlreadyExists(dst_key)
        head = self._head(src_key)
        if head is not None:
            self._copy(src_key, dst_key, head)
            with _s3_errors(f"DELETE {src_key}"):
                self.client.delete_object(Bucket=self.bucket, Key=src_key)
            return
        self.finish_rename(src_rel, dst_rel)

    def finish_rename(self, src_rel: bytes, dst_rel: bytes) -> int:
        """Move every object under directory `src_rel` to `dst_rel`; returns how many moved.
        Idempotent: objects already copied are copied again, already deleted ones are gone."""
        src_dir, dst_dir = self._dir_key(src_rel), self._dir_key(dst_rel)
        keys = []
        with _s3_errors(f"LIST {src_dir}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=src_dir):
                keys.extend((o["Key"], o["Size"]) for o in page.get("Contents", []))
        for dst_key in (dst_dir + k[len(src_dir):] for k, _ in keys):
            if len(dst_key.encode()) > MAX_KEY_BYTES:
                raise NameTooLong(f"S3 key {dst_key[:60]}... would be over {MAX_KEY_BYTES} bytes")
        copied: list[str] = []

        def copy(item: tuple[str, int]) -> None:
            dst_key = dst_dir + item[0][len(src_dir):]
            self._copy(item[0], dst_key, None, item[1])
            copied.append(dst_key)

        futures = [self.pool.submit(copy, item) for item in keys]
        failure = next((f.exception() for f in futures if f.exception() is not None), None)
        if failure is not None:
            # Nothing deleted yet: take the copies back so that the failed command changed nothing.
            try:
                self._delete_many(copied)
            except ExecutorError as exc:
                raise PartlyDone(f"rename {src_dir} -> {dst_dir}: {len(copied)} copies left: {exc}") from failure
            raise failure
        try:
            self._delete_many([k for k, _ in keys])
        except ExecutorError as exc:
            # Every object is at its new name; some old ones remain: only finishing is possible.
            raise PartlyDone(f"rename {src_dir} -> {dst_dir}: sources not all deleted: {exc}") from exc
        return len(keys)

    def _delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            with _s3_errors(f"DELETE {len(batch)} objects"):
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") not in _NOT_FOUND]
            if errors:
                raise RetriesExhausted(f"DELETE: {len(errors)} objects not deleted ({errors[0].get('Code')})")

    def _copy(self, src_key: str, dst_key: str, head: dict | None, size: int | None = None,
              meta: dict[str, str] | None = None) -> str:
        """Server-side copy keeping the metadata (or replacing it with `meta`); a multipart
        copy with parallel UploadPartCopy above `copy_threshold` (CopyObject stops at 5 GiB)."""
        if size is None:
            size = int(head["ContentLength"])
        source = {"Bucket": self.bucket, "Key": src_key}
        if size <= self.copy_threshold:
            extra = {"MetadataDirective": "REPLACE", "Metadata": meta} if meta is not None else {}
            with _s3_errors(f"COPY {src_key}"):
                resp = self.client.copy_object(Bucket=self.bucket, Key=dst_key, CopySource=source, **extra)
            return _etag(resp["CopyObjectResult"]["ETag"])
        if meta is None:
            head = head or self._head(src_key)
            meta = head.get("Metadata", {}) if head else {}
        part = max(self.part_size, -(-size // 10000))
        ranges = [(i + 1, start, min(start + part, size) - 1) for i, start in enumerate(range(0, size, part))]

        def one(upload_id: str, item: tuple[int, int, int]) -> dict:
            number, start, end = item
            with _s3_errors(f"COPY part {number} of {src_key}"):
                resp = self.client.upload_part_copy(Bucket=self.bucket, Key=dst_key, UploadId=upload_id,
                                                    PartNumber=number, CopySource=source,
                                                    CopySourceRange=f"bytes={start}-{end}")
            return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

        return self._multipart(dst_key, meta, ranges, one, expected=None)

    def _multipart(self, key: str, meta: dict[str, str], items: list, one, expected: str | None) -> str:
        with _s3_errors(f"CREATE MULTIPART {key}"):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta)["UploadId"]
        try:
            parts = list(self.pool.map(lambda item: one(upload_id, item), items))
            with _s3_errors(f"COMPLETE MULTIPART {key}"):
                resp = self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                             MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                pass  # an abandoned upload costs storage only; a lifecycle rule clears it
            raise
        etag = _etag(resp.get("ETag"))
        if expected is not None and etag != expected:
            raise RetriesExhausted(f"multipart upload of {key}: ETag {etag}, expected {expected}")
        return etag

    def set_attrs(self, rel: bytes, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None,
                  times_ns: tuple[int, int] | None = None) -> Stat:
        """Metadata is rewritten by copying the object onto itself (a marker for a directory);
        a size change rewrites the content."""
        rel = rel.strip(b"/")
        current = self.stat(rel)
        is_dir = current.kind == "dir"
        key = self._dir_key(rel) if is_dir else self._key(rel)
        new_mode = current.mode if mode is None else mode
        new_uid = current.uid if uid is None else uid
        new_gid = current.gid if gid is None else gid
        atime, mtime = times_ns if times_ns is not None else (current.atime_ns, current.mtime_ns)
        if size is not None and times_ns is None:
            atime = mtime = time.time_ns()
        meta = self._meta(current.kind, new_mode, new_uid, new_gid, mtime, atime, current.rdev)
        if not key:  # the bucket root has no object to hold its attributes
            return Stat("dir", 0, new_mode, new_uid, new_gid, 0, atime, mtime, time.time_ns())
        etag = None
        if is_dir:
            self._put(key, b"", meta)
        elif size is not None:
            etag = self._resize(key, current.size, size, meta)
            current = Stat(current.kind, size, 0, 0, 0, 0, 0, 0, 0)
        else:
            etag = self._copy(key, key, None, current.size, meta=meta)
        return Stat(current.kind, current.size, new_mode, new_uid, new_gid, current.rdev if not is_dir else 0,
                    atime, mtime, time.time_ns(), target=current.target, checksum=etag)

    def _resize(self, key: str, old_size: int, size: int, meta: dict[str, str]) -> str:
        staging_id = f"{os.getpid()}.resize-{threading.get_ident()}-{time.time_ns()}"
        fd = self.stage(staging_id)
        try:
            if size and old_size:
                self._download_into(fd, key, min(old_size, size))
            os.ftruncate(fd, size)
            return self._upload(fd, key, meta)
        finally:
            os.close(fd)
            self.discard(staging_id)

    # -- staging: a local spool file, uploaded when it lands ------------------------------
    def stage(self, staging_id: str, *, copy_of: bytes | None = None, copy_size: int | None = None,
              etag: str | None = None) -> int:
        """A new spool file opened read-write; with `copy_of`, standing for the object's current
        content: downloaded for a small object; for a large one (known `etag`), a sparse file
        whose parts are fetched only when read or changed (`prepare`), so that landing it uploads
        the changed parts and copies the others server-side."""
        try:
            fd = os.open(self.spool / staging_id, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_os_error(exc) from exc
        try:
            if copy_of is not None:
                key = self._key(copy_of)
                if copy_size is None or etag is None:
                    head = self._head(key)
                    if head is None:
                        raise NotFound(key)
                    copy_size, etag = head["ContentLength"], _etag(head["ETag"])
                if copy_size >= self.multipart_threshold:
                    os.ftruncate(fd, copy_size)
                    self._sparse[staging_id] = _Sparse(key, etag, copy_size, self._part_of(copy_size))
                else:
                    self._download_into(fd, key, copy_size)
        except BaseException:
            os.close(fd)
            self.discard(staging_id)
            raise
        return fd

    def _part_of(self, size: int) -> int:
        return max(self.part_size, -(-size // 10000))  # S3 allows 10,000 parts

    def prepare(self, staging_id: str, fd: int, offset: int, length: int) -> None:
        """Before bytes [offset, offset + length) of a sparse spool file are read or written:
        fetch the parts of the old object they fall in that are not there yet (once each)."""
        sp = self._sparse.get(staging_id)
        if sp is None:
            return
        last = min(offset + max(length, 1), sp.valid) - 1
        missing = [i for i in range(offset // sp.part, last // sp.part + 1) if i not in sp.present]
        if not missing:
            return

        def fetch(index: int) -> None:
            start = index * sp.part
            end = min(start + sp.part, sp.valid) - 1
            with _s3_errors(f"GET {sp.key}"):
                body = self.client.get_object(Bucket=self.bucket, Key=sp.key, Range=f"bytes={start}-{end}",
                                              IfMatch=f'"{sp.etag}"')["Body"].read()
            os.pwrite(fd, body, start)

        list(self.pool.map(fetch, missing))
        sp.present.update(missing)

    def prepare_truncate(self, staging_id: str, fd: int, size: int) -> None:
        """Before a sparse spool file is cut to `size`: keep the old bytes of the part it ends
        in; the old object's bytes beyond `size` are gone for good, even if the file grows again."""
        sp = self._sparse.get(staging_id)
        if sp is None or size >= sp.valid:
            return
        if size % sp.part:
            self.prepare(staging_id, fd, size - 1, 1)
        sp.valid = size

    def _download_into(self, fd: int, key: str, size: int) -> None:
        """Parallel ranged GETs of the first `size` bytes of `key`, written at their offsets."""
        def one(start: int) -> None:
            end = min(start + self.part_size, size) - 1
            with _s3_errors(f"GET {key}"):
                body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
                os.pwrite(fd, body.read(), start)

        list(self.pool.map(one, range(0, size, self.part_size)))

    def land(self, staging_id: str, parent: bytes, name: bytes, *, mode: int, uid: int, gid: int,
             times_ns: tuple[int, int] | None, durable: bool, noreplace: bool = False,
             fd: int | None = None) -> Stat:
        """Upload the spool file as the object at `parent/name` with the node's metadata; the
        ETag is verified before returning. Readers of the bucket see the old object or the new
        one, never a part (S3 PUTs and completed multipart uploads are atomic)."""
        self.check_name(parent, name)
        key = self._key(self._join(parent, name))
        own = fd is None
        if own:
            fd = os.open(self.spool / staging_id, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            atime, mtime = times_ns if times_ns is not None else (st.st_atime_ns, st.st_mtime_ns)
            meta = self._meta("file", mode, uid, gid, mtime, atime)
            sp = self._sparse.get(staging_id)
            if sp is not None and st.st_size >= self.multipart_threshold and -(-st.st_size // sp.part) <= 10000:
                etag = self._upload_changed_parts(fd, staging_id, sp, key, meta, st.st_size)
            else:
                self.prepare(staging_id, fd, 0, st.st_size)
                etag = self._upload(fd, key, meta, new=noreplace)
        finally:
            if own:
                os.close(fd)
        self.discard(staging_id)
        return Stat("file", st.st_size, mode & 0o7777, uid, gid, 0, atime, mtime, time.time_ns(), checksum=etag)

    def _upload(self, fd: int, key: str, meta: dict[str, str], *, new: bool = False) -> str:
        size = os.fstat(fd).st_size
        if size < self.multipart_threshold:
            return self._put(key, os.pread(fd, size, 0), meta, new=new)
        if new and self._head(key) is not None:  # a HEAD is noise beside a multipart upload
            raise AlreadyExists(key)
        return self._upload_parts(fd, key, meta, size, self._part_of(size))

    def _upload_changed_parts(self, fd: int, staging_id: str, sp: "_Sparse", key: str, meta: dict[str, str],
                              size: int) -> str:
        """A sparse spool file: parts that still hold the old object's bytes are copied
        server-side (UploadPartCopy, If-Match on its ETag), the others fetched where needed
        and uploaded."""
        copies = set()
        for i, start in enumerate(range(0, size, sp.part)):
            end = min(start + sp.part, size)
            if i not in sp.present and end <= sp.valid:
                copies.add(i + 1)
            else:
                self.prepare(staging_id, fd, start, end - start)
        etag = self._upload_parts(fd, key, meta, size, sp.part, sp, copies)
        self.parts_copied += len(copies)
        return etag

    def _upload_parts(self, fd: int, key: str, meta: dict[str, str], size: int, part: int,
                      source: "_Sparse | None" = None, copies: set[int] = frozenset()) -> str:
        """A multipart upload from the spool file, parts in parallel. Each uploaded part's ETag
        is checked against its MD5 before the upload is completed (a bad part aborts it, and the
        old object stays); the object's ETag, the MD5 of the parts' MD5s, after."""
        items = [(i + 1, start, min(part, size - start)) for i, start in enumerate(range(0, size, part))]
        digests: dict[int, bytes] = {}

        def one(upload_id: str, item: tuple[int, int, int]) -> dict:
            number, start, length = item
            if number in copies:
                with _s3_errors(f"COPY part {number} of {source.key}"):
                    resp = self.client.upload_part_copy(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": source.key},
                        CopySourceRange=f"bytes={start}-{start + length - 1}", CopySourceIfMatch=f'"{source.etag}"')
                etag = resp["CopyPartResult"]["ETag"]
                digests[number] = bytes.fromhex(_etag(etag))
                return {"PartNumber": number, "ETag": etag}
            body = os.pread(fd, length, start)
            md5 = hashlib.md5(body)
            digests[number] = md5.digest()
            with _s3_errors(f"PUT part {number} of {key}"):
                resp = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=body)
            if _etag(resp["ETag"]) != md5.hexdigest():
                raise RetriesExhausted(f"part {number} of {key}: ETag does not match the content sent")
            return {"PartNumber": number, "ETag": resp["ETag"]}

        upload = self._multipart(key, meta, items, one, expected=None)
        expected = hashlib.md5(b"".join(digests[n] for n, _, _ in items)).hexdigest() + f"-{len(items)}"
        if upload != expected:
            raise RetriesExhausted(f"multipart upload of {key}: ETag {upload}, expected {expected}")
        return upload

    def discard(self, staging_id: str) -> None:
        self._sparse.pop(staging_id, None)
        try:
            os.unlink(self.spool / staging_id)
        except FileNotFoundError:
            pass

    def staged(self) -> list[str]:
        return sorted(os.listdir(self.spool))

    def sync_dir(self, rel: bytes) -> None:
        """Nothing to do: a landed object is durable in S3 once the PUT returned."""

    def syncfs(self) -> None:
        """Nothing to do: see sync_dir."""


__all__ = ["S3Executor", "parse_root"]
