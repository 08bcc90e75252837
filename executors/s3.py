"""The S3 executor: a bucket prefix as a directory tree, on boto3.

Layout in the bucket (what s3fs and rclone read and write):
- a file is an object `<prefix><path>`; a directory is a marker object `<prefix><path>/`
  (written by mkdir, so empty directories survive) or only implied by the keys under it;
- mode, owner and times are object metadata `x-amz-meta-mode` (decimal st_mode with the type
  bits, as s3fs writes it; an octal value with a leading 0, as rclone writes it, is read too),
  `-uid`, `-gid`, `-mtime` and `-atime` (seconds, with a fraction for nanoseconds);
- a symlink is an object whose body is the target and whose mode has S_IFLNK (s3fs); a FIFO,
  socket or device is an empty object with its type bits in mode and `x-amz-meta-rdev`.

Writes (executors/s3_content.py): content is spooled to a local file under FILESTORE_HOME (the
staging area of this executor, never the bucket) and uploaded when it lands: one PUT with
Content-MD5, or a multipart upload with parts sent in parallel above `multipart_threshold`;
ETags are checked against the MD5s computed locally before `land` returns, so a write command
never commits content S3 does not hold. Reads: executors/s3cache.py.

Retries: botocore's own retry handler (`standard` mode: exponential backoff with jitter on
throttling, 5xx and connection errors, bounded by `max_attempts`); what still fails raises
RetriesExhausted, which the command reports as EIO.

Names S3 cannot hold are refused before anything is uploaded: a component that is not UTF-8
answers EILSEQ (IllegalName), a key over 1,024 bytes ENAMETOOLONG. There are no hard links
(EPERM) and no atomic RENAME_EXCHANGE (EINVAL, what Linux filesystems without it answer).
"""
from __future__ import annotations

import os
import stat as stat_mod
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError

from .base import (
    TYPE_BITS,
    AlreadyExists,
    ExecutorError,
    IllegalName,
    InvalidArgument,
    NameTooLong,
    NotEmpty,
    NotFound,
    NotPermitted,
    PartlyDone,
    RetriesExhausted,
    Stat,
    Unavailable,
    Unsupported,
    kind_of,
    validate_name,
)
from .s3_common import (
    _NOT_FOUND,
    MAX_COPY_OBJECT,
    MAX_KEY_BYTES,
    GiB,
    MiB,
    Statvfs,
    _etag,
    _mode_from_meta,
    _ns_from_meta,
    _ns_to_meta,
    _s3_errors,
    now_ns,
    parse_root,
)
from .s3_content import ContentTransfers, _Sparse
from .s3cache import ChunkCache, Reader

LIST_PAGE = 1000  # keys and common prefixes a LIST request of listdir_pages (S3's own maximum)


class S3Executor(ContentTransfers):
    """The Executor (and WriteBackStore) of an S3 prefix (executors.base)."""

    kind = "s3"
    in_place = False  # no descriptor onto an object: changes to a file go through a spool copy
    owns_files = True  # owner and mode are object metadata, whoever the daemon runs as
    stamps_ctime = False  # metadata holds mode, owner, atime and mtime: rewriting the same values is a no-op
    moves_objects_one_by_one = True  # a directory rename copies and deletes object by object
    writes_back = True  # content kept in a local pending file at close, uploaded after

    def __init__(self, root: str, *, spool_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 1 * GiB, endpoint_url: str | None = None, region: str | None = None,
                 read_only: bool = False, part_size: int = 8 * MiB, multipart_threshold: int = 32 * MiB,
                 copy_threshold: int = MAX_COPY_OBJECT, chunk_size: int = 8 * MiB, readahead: int = 4,
                 workers: int = 10, max_attempts: int = 5, connect_timeout: float = 5, read_timeout: float = 30,
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
        # An endpoint that cannot be reached fails every request at once for a moment (or until
        # a probe reaches it again): without this each operation ran all its retries (seconds,
        # under the mount's core lock, so every backend waited) until the monitor's next probe
        # marked it down. Past the moment a request tries again (a process without a monitor,
        # such as the CLI, is not stuck).
        self._unreachable: tuple[str, float] | None = None
        self.client.meta.events.register("response-received.s3", self._note_unreachable)
        self.client.meta.events.register("before-send.s3", self._fail_fast)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="s3")
        self._reader_pool = ThreadPoolExecutor(max(readahead, 1) * 2, thread_name_prefix="s3-read")
        self._sync_pool = ThreadPoolExecutor(8, thread_name_prefix="s3-sync")  # sync_pending's fsyncs
        self.spool = Path(spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.cache = ChunkCache(Path(cache_dir), cache_bytes) if cache_dir is not None else None
        self._sparse: dict[str, _Sparse] = {}
        self.parts_copied = 0  # parts landed by server-side copy instead of upload (for tests)
        self._probe_client = None  # made at the first probe
        with _s3_errors(f"bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)

    def probe(self) -> None:
        """One HEAD of the bucket, no retries, short timeouts: is the endpoint answering?
        (core.storage.availability asks every few seconds.) No answer, or an answer that the
        bucket is gone or not ours, is Unavailable; a 5xx is an endpoint answering that fails
        for now, which the operations' own retries ride out (one 503 must not take it down)."""
        if self._probe_client is None:
            self._probe_client = boto3.session.Session().client(
                "s3", endpoint_url=self.client.meta.endpoint_url, region_name=self.client.meta.region_name,
                config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=3))
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
            self._unreachable = None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500:
                return  # the endpoint answers, failing for now (SlowDown...): operations retry
            raise Unavailable(f"bucket {self.bucket}: {exc}") from exc  # gone, or access revoked
        except Exception as exc:  # no answer: connection refused, timed out, reset
            raise Unavailable(f"bucket {self.bucket}: {exc}") from exc

    UNREACHABLE_SECONDS = 2.0  # the monitor's probe interval (core.storage.availability)

    def _note_unreachable(self, exception=None, **_) -> None:
        if isinstance(exception, (EndpointConnectionError, ConnectTimeoutError)):
            self._unreachable = (str(exception), time.monotonic())

    def _fail_fast(self, **_) -> None:
        unreachable = self._unreachable
        if unreachable is not None and time.monotonic() - unreachable[1] < self.UNREACHABLE_SECONDS:
            raise Unavailable(f"bucket {self.bucket}: {unreachable[0]}")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._reader_pool.shutdown(wait=False, cancel_futures=True)
        self._sync_pool.shutdown(wait=True)

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
        now = now_ns()
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
        fallback = int(modified.timestamp() * 1e9) if modified is not None else now_ns()
        mtime = _ns_from_meta(meta.get("mtime")) or fallback
        size = int(head.get("ContentLength", head.get("Size", 0)) or 0)
        target = self._get_body(key) if kind == "symlink" else None
        return Stat(kind=kind, size=0 if kind in ("dir",) else (len(target) if target is not None else size),
                    mode=mode, uid=int(meta.get("uid", self.default_uid)),
                    gid=int(meta.get("gid", self.default_gid)), rdev=int(meta.get("rdev", 0)),
                    atime_ns=_ns_from_meta(meta.get("atime")) or mtime, mtime_ns=mtime, ctime_ns=mtime,
                    target=target, checksum=None if is_dir else _etag(head.get("ETag")))

    def _implied_dir(self) -> Stat:
        now = now_ns()
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
        return [item for page in self.listdir_pages(rel) for item in page]

    def listdir_pages(self, rel: bytes, skip=None,
                      page_size: int = LIST_PAGE) -> Iterator[list[tuple[bytes, Stat]]]:
        """The entries of a directory a LIST page at a time (a LIST with a delimiter, `page_size`
        keys and common prefixes a request), each page with a HEAD per entry, in parallel, for
        the metadata that listings do not carry; names `skip` returns are left out before their
        HEAD (executors.base.Executor.listdir_pages). Keys that cannot be names (an empty
        component, '.' or '..') are skipped.

        A key `x` beside keys under `x/` is the directory `x` (the directory wins). S3 lists in
        UTF-8 binary order, keys and common prefixes merged: `x/` comes after `x` and after every
        name that is `x` followed by a byte below '/' (`x-1`, `x.txt`), possibly pages later. So a
        file `x` is held back until the listing has passed `x/` (an entry sorting after `x/` was
        seen, or the listing ended) and then emitted, unless `x/` was seen meanwhile. Each entry
        listed passes the `x/` of every name before it that is not a prefix of it, so what is held
        is a chain of names each a prefix of the next (`x`, `x-1`, `x-1.txt`): a handful of names,
        however many entries the directory holds."""
        dir_key = self._dir_key(rel)
        held: list[str] = []  # file names whose `name/` the listing has not passed yet
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(f"LIST {dir_key}"):
            pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=dir_key, Delimiter="/",
                                            PaginationConfig={"PageSize": page_size}))
        while True:
            with _s3_errors(f"LIST {dir_key}"):
                page = next(pages, None)
            if page is None:
                break
            listed = []  # (key relative to dir_key, is_dir): one sorted sequence, as S3 lists it
            for obj in page.get("Contents", []):
                name = obj["Key"][len(dir_key):]
                if name and name not in (".", ".."):
                    listed.append((name, False))
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(dir_key):-1]
                if name and name not in (".", "..") and "/" not in name:
                    listed.append((name + "/", True))
            listed.sort()
            ready: list[tuple[str, bool]] = []
            for name, is_dir in listed:
                if held and any(x + "/" < name for x in held):  # past their `x/`, not seen: files
                    ready += [(x, False) for x in held if x + "/" < name]
                    held = [x for x in held if x + "/" >= name]
                if is_dir:
                    name = name[:-1]
                    if name in held:  # a key `x` beside keys under `x/`: the directory wins
                        held.remove(name)
                    ready.append((name, True))
                else:
                    held.append(name)
            if ready:
                yield self._head_page(dir_key, ready, skip)
        if held:
            yield self._head_page(dir_key, [(name, False) for name in held], skip)

    def _head_page(self, dir_key: str, items: list[tuple[str, bool]], skip) -> list[tuple[bytes, Stat]]:
        if skip is not None:
            leave = skip([name.encode() for name, _ in items])
            items = [item for item in items if item[0].encode() not in leave]

        def one(item: tuple[str, bool]) -> tuple[bytes, Stat] | None:
            name, is_dir = item
            key = dir_key + name + ("/" if is_dir else "")
            head = self._head(key)
            if head is None:
                return (name.encode(), self._implied_dir()) if is_dir else None
            return name.encode(), self._stat_of(head, is_dir=is_dir, key=key)

        return [r for r in self.pool.map(one, items) if r is not None]

    def count_tree(self, stop) -> int | None:
        """Every name below the prefix, from a LIST without a delimiter (1,000 keys a request,
        no HEAD): the objects plus the directories their keys imply (executors.base.Executor.count_tree).
        Keys `listdir` skips (an empty component, '.' or '..') are skipped here too."""
        files, dirs = 0, set()
        with _s3_errors(f"LIST {self.prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                if stop.is_set():
                    return None
                for obj in page.get("Contents", []):
                    parts = obj["Key"][len(self.prefix):].split("/")
                    marker = parts[-1] == ""  # a directory's own object
                    if marker:
                        parts.pop()
                    valid = next((i for i, p in enumerate(parts) if p in ("", ".", "..")), len(parts))
                    for depth in range(1, min(valid, len(parts) if marker else len(parts) - 1) + 1):
                        dirs.add("/".join(parts[:depth]))
                    if not marker and valid == len(parts):
                        files += 1
        return files + len(dirs)

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

        def fetch(start: int, end: int) -> Iterator[bytes]:
            """The range's bytes as they arrive, a chunk at a time (the last one maybe shorter)."""
            with _s3_errors(f"GET {key}"):
                body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}",
                                              IfMatch=f'"{etag}"')["Body"]
            try:
                for offset in range(start, end + 1, self.chunk_size):
                    with _s3_errors(f"GET {key}"):
                        piece = body.read(min(self.chunk_size, end + 1 - offset))
                    if len(piece) != min(self.chunk_size, end + 1 - offset):
                        raise RetriesExhausted(f"GET {key}: the range ended early")
                    yield piece
            finally:
                body.close()

        cache = self.cache if cache_key else None
        return Reader(fetch, size, cache, cache_key or "", self._reader_pool, self.chunk_size, self.readahead)

    def statfs(self) -> Statvfs:
        """S3 has no capacity: a large, constant free space, as s3fs and rclone report."""
        blocks = 1 << 40  # 4 PiB in 4 KiB blocks
        return Statvfs(4096, 4096, blocks, blocks, blocks, 1 << 32, 1 << 32, 1 << 32,
                       hash(("s3", self.bucket, self.prefix)) & 0xFFFFFFFF, 0, 255)

    # -- changing ---------------------------------------------------------------------
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

    def delete_paths(self, rels: list[tuple[bytes, bool]]) -> None:
        """Delete the objects of these paths, (path, is a directory: its marker object), with
        DeleteObjects calls of up to 1,000 keys; keys already gone are fine (core.commands.deletes)."""
        self._delete_many([self._dir_key(rel) if is_dir else self._key(rel) for rel, is_dir in rels])

    def _delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            with _s3_errors(f"DELETE {len(batch)} objects"):
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") not in _NOT_FOUND]
            if errors:
                raise RetriesExhausted(f"DELETE: {len(errors)} objects not deleted ({errors[0].get('Code')})")

    def set_attrs(self, rel: bytes, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None,
                  times_ns: tuple[int, int] | None = None, known: Stat | None = None) -> Stat:
        """Metadata is rewritten by copying the object onto itself; a directory's marker is put
        again (from `known` when the caller knows it is a directory: the marker holds nothing
        else, so there is no HEAD first); a size change rewrites the content."""
        if size is not None:
            self.check_size(size)
        rel = rel.strip(b"/")
        current = known if known is not None and known.kind == "dir" else self.stat(rel)
        is_dir = current.kind == "dir"
        key = self._dir_key(rel) if is_dir else self._key(rel)
        new_mode = current.mode if mode is None else mode
        new_uid = current.uid if uid is None else uid
        new_gid = current.gid if gid is None else gid
        atime, mtime = times_ns if times_ns is not None else (current.atime_ns, current.mtime_ns)
        if size is not None and times_ns is None:
            atime = mtime = now_ns()
        meta = self._meta(current.kind, new_mode, new_uid, new_gid, mtime, atime, current.rdev)
        if not key:  # the bucket root has no object to hold its attributes
            return Stat("dir", 0, new_mode, new_uid, new_gid, 0, atime, mtime, now_ns())
        etag = None
        if is_dir:
            self._put(key, b"", meta)
        elif size is not None:
            etag = self._resize(key, current.checksum, current.size, size, meta)
            current = Stat(current.kind, size, 0, 0, 0, 0, 0, 0, 0)
        else:
            etag = self._copy(key, key, None, current.size, meta=meta)
        return Stat(current.kind, current.size, new_mode, new_uid, new_gid, current.rdev if not is_dir else 0,
                    atime, mtime, now_ns(), target=current.target, checksum=etag)

    def stat_node(self, rel: bytes) -> Stat:
        return self.stat(rel)  # objects are never followed: a symlink is an object of its own

    def set_xattr(self, rel: bytes, name: bytes, value: bytes) -> Stat:
        raise Unsupported("S3 objects keep no extended attributes: the database holds them")

    def remove_xattr(self, rel: bytes, name: bytes) -> Stat:
        raise Unsupported("S3 objects keep no extended attributes: the database holds them")

    def xattrs(self, rel: bytes) -> dict[bytes, bytes]:
        return {}

    def sync_dir(self, rel: bytes) -> None:
        """Nothing to do: a landed object is durable in S3 once the PUT returned."""

    def syncfs(self) -> None:
        """Nothing to do: see sync_dir."""


__all__ = ["S3Executor", "parse_root"]

