"""Content of S3 objects on its way in: the local spool file (staging), uploads (one PUT, or a
multipart upload with parts in parallel, verified by ETag) and server-side copies.

A spool file for a new file, or a whole rewrite, is written locally and uploaded whole when it
lands. A spool file standing for an existing large object is sparse: the parts of the old
object that a read or a write touches are fetched first (`prepare`), and landing it uploads
those parts and copies the untouched ones server-side (UploadPartCopy), so an append to a big
object sends its tail, not the object.
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat as stat_mod
import threading
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from .base import (AlreadyExists, ExecutorError, FileTooLarge, NotFound, RetriesExhausted, Stat, Superseded,
                   from_os_error)
from .s3_common import _etag, _s3_errors, now_ns

MAX_OBJECT = 5 << 40  # S3's largest object: 5 TiB

# Multipart uploads carry a CRC32 per part (a composite checksum the server checks part by
# part). Without one, S3 now computes a full-object CRC64NVME at completion, and moto's server
# does that in Python: 1.1-1.4 s of a 256 MiB upload's 2.8 s, measured (boto3's `upload_file`
# sends CRC32 parts, and completed in 0.65 s).
PART_CHECKSUM = "CRC32"
_EMPTY = ".empty"  # the suffix of a pending id that stands for empty content, with no file (keep_empty)


def _part(number: int, result: dict) -> dict:
    """A CompleteMultipartUpload entry from an UploadPart(Copy) result (with its checksum)."""
    part = {"PartNumber": number, "ETag": result["ETag"]}
    if result.get("ChecksumCRC32"):
        part["ChecksumCRC32"] = result["ChecksumCRC32"]
    return part


@dataclass
class _Sparse:
    """A spool file standing for object `key` at `etag`, its parts fetched on demand."""
    key: str
    etag: str
    valid: int  # the old object's bytes below this offset still count (cut by truncation)
    part: int
    present: set[int] = field(default_factory=set)  # parts fetched (or written) into the spool


class ContentTransfers:
    """The spool, upload and copy half of S3Executor (it provides client, pool, bucket, spool,
    part_size, multipart_threshold, copy_threshold, _key, _join, _head, _meta, check_name)."""

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
            return _part(number, resp["CopyPartResult"])

        return self._multipart(dst_key, meta, ranges, one, expected=None)

    def _multipart(self, key: str, meta: dict[str, str], items: list, one, expected: str | None,
                   stop=None) -> str:
        with _s3_errors(f"CREATE MULTIPART {key}"):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta,
                                                            ChecksumAlgorithm=PART_CHECKSUM)["UploadId"]

        def part(item):
            if stop is not None and stop():
                raise Superseded(f"upload of {key} stopped")
            return one(upload_id, item)
        try:
            parts = list(self.pool.map(part, items))
            if stop is not None and stop():  # the last moment it can still be left incomplete
                raise Superseded(f"upload of {key} stopped")
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

    def _resize(self, key: str, etag: str | None, old_size: int, size: int, meta: dict[str, str]) -> str:
        """truncate(2) of an object: what stays of a large one is copied server-side."""
        staging_id = f"{os.getpid()}.resize-{threading.get_ident()}-{now_ns()}"
        fd = self.stage(staging_id)
        try:
            if etag and min(old_size, size) >= self.multipart_threshold:
                os.ftruncate(fd, old_size)
                sp = self._sparse[staging_id] = _Sparse(key, etag, old_size, self._part_of(old_size))
                self.prepare_truncate(staging_id, fd, size)
                os.ftruncate(fd, size)
                return self._upload_changed_parts(fd, staging_id, sp, key, meta, size)
            if size and old_size:
                self._download_into(fd, key, min(old_size, size))
            os.ftruncate(fd, size)
            return self._upload(fd, key, meta)
        finally:
            os.close(fd)
            self.discard(staging_id)

    # -- staging: a local spool file, uploaded when it lands ------------------------------
    def stage(self, staging_id: str, *, copy_of: bytes | None = None, copy_size: int | None = None,
              etag: str | None = None, copy_fd: int | None = None, whole: bool = False) -> int:
        """A new spool file opened read-write; with `copy_of`, standing for the object's current
        content: downloaded for a small object (or with `whole`, any object: it is about to
        go); for a large one (known `etag`), a sparse file whose parts are fetched only when
        read or changed (`prepare`), so that landing it uploads the changed parts and copies
        the others server-side. With `copy_fd`, a copy of that local file (its holes kept)."""
        try:
            fd = os.open(self.spool / staging_id, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_os_error(exc) from exc
        try:
            if copy_fd is not None:
                _copy_local(copy_fd, fd)
            elif copy_of is not None:
                key = self._key(copy_of)
                if copy_size is None or etag is None:
                    head = self._head(key)
                    if head is None:
                        raise NotFound(key)
                    copy_size, etag = head["ContentLength"], _etag(head["ETag"])
                if copy_size >= self.multipart_threshold and not whole:
                    os.ftruncate(fd, copy_size)
                    self._sparse[staging_id] = _Sparse(key, etag, copy_size, self._part_of(copy_size))
                else:
                    self._download_into(fd, key, copy_size)
                    os.ftruncate(fd, copy_size)
        except OSError as exc:
            os.close(fd)
            self.discard(staging_id)
            raise from_os_error(exc) from exc
        except BaseException:
            os.close(fd)
            self.discard(staging_id)
            raise
        return fd

    def check_size(self, size: int) -> None:
        if size > MAX_OBJECT:
            raise FileTooLarge(f"{size} bytes: S3 objects hold at most {MAX_OBJECT}")

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
        return Stat("file", st.st_size, mode & 0o7777, uid, gid, 0, atime, mtime, now_ns(), checksum=etag)

    def _upload(self, fd: int, key: str, meta: dict[str, str], *, new: bool = False, stop=None) -> str:
        size = os.fstat(fd).st_size
        self.check_size(size)
        if size < self.multipart_threshold:
            return self._put(key, os.pread(fd, size, 0), meta, new=new)
        if new and self._head(key) is not None:  # a HEAD is noise beside a multipart upload
            raise AlreadyExists(key)
        return self._upload_parts(fd, key, meta, size, self._part_of(size), stop=stop)

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
                      source: "_Sparse | None" = None, copies: set[int] = frozenset(), stop=None) -> str:
        """A multipart upload from the spool file, parts in parallel. Each part is verified
        before the upload is completed (a bad part aborts it, and the old object stays): by its
        CRC32, which the store checks and answers with; a store that answers none has the part's
        ETag compared with its MD5 here, and the object's ETag with the MD5 of the parts' MD5s."""
        items = [(i + 1, start, min(part, size - start)) for i, start in enumerate(range(0, size, part))]
        digests: dict[int, bytes] = {}  # parts the store answered no checksum for

        def one(upload_id: str, item: tuple[int, int, int]) -> dict:
            number, start, length = item
            if number in copies:
                with _s3_errors(f"COPY part {number} of {source.key}"):
                    resp = self.client.upload_part_copy(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": source.key},
                        CopySourceRange=f"bytes={start}-{start + length - 1}", CopySourceIfMatch=f'"{source.etag}"')
                digests[number] = bytes.fromhex(_etag(resp["CopyPartResult"]["ETag"]))
                return _part(number, resp["CopyPartResult"])
            body = os.pread(fd, length, start)
            with _s3_errors(f"PUT part {number} of {key}"):
                resp = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=body, ChecksumAlgorithm=PART_CHECKSUM)
            if not resp.get("ChecksumCRC32"):
                # Not a checksum-aware store: its ETag, the MD5 of what it received, is checked
                # here (computing it for every part cost ~15 % of a large upload on 2 cores).
                md5 = hashlib.md5(body)
                digests[number] = md5.digest()
                if _etag(resp["ETag"]) != md5.hexdigest():
                    raise RetriesExhausted(f"part {number} of {key}: ETag does not match the content sent")
            return _part(number, resp)

        upload = self._multipart(key, meta, items, one, expected=None, stop=stop)
        if len(digests) == len(items):
            expected = hashlib.md5(b"".join(digests[n] for n, _, _ in items)).hexdigest() + f"-{len(items)}"
            if upload != expected:
                raise RetriesExhausted(f"multipart upload of {key}: ETag {upload}, expected {expected}")
        return upload

    # -- write-back: spool files kept until their upload lands (core.commands.writeback) ----------
    def can_keep(self, staging_id: str) -> bool:
        """Can this spool file be uploaded later, on its own? Not a sparse one: it stands for
        parts of the current object (copied server-side when it lands), which another change
        could replace meanwhile; and its list of fetched parts lives in memory only."""
        return staging_id not in self._sparse

    @property
    def pending_dir(self):
        return self.spool.with_name("pending")

    def keep(self, staging_id: str, fd: int, *, sync: bool = True) -> str:
        """Move a spool file out of the staging area, which recovery empties, into `pending`;
        returns its pending id (its name there). With `sync`, safe on local disk first (fsync
        of the file and of the directory); without, the caller makes it durable later, many
        at once (`sync_pending`: write-back does it before the journal records the upload)."""
        pending = self.pending_dir
        try:
            if not self._pending_made:
                pending.mkdir(parents=True, exist_ok=True)
                self._pending_made = True
            if sync:
                os.fsync(fd)
            try:
                os.rename(self.spool / staging_id, pending / staging_id)
            except FileNotFoundError:  # `pending` removed behind our back: made again
                pending.mkdir(parents=True, exist_ok=True)
                os.rename(self.spool / staging_id, pending / staging_id)
            if sync:
                self._fsync_dir(pending)  # the rename too: a crash must not bring back the staging name
        except OSError as exc:
            raise from_os_error(exc) from exc
        return staging_id

    _pending_made = False

    def keep_empty(self, staging_id: str) -> str:
        """The pending id of an empty file's content (D58): a name only, with no file behind it;
        its upload row alone makes it durable. `touch` and `open(O_CREAT)`+`close` of new files
        cost a spool file's create, rename, fsync and unlink on the local disk before."""
        return staging_id + _EMPTY

    @staticmethod
    def _fsync_dir(path) -> None:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def sync_pending(self, pending_ids: list[str]) -> None:
        """Make kept files durable, in one batch: their content (fsyncs in parallel, which the
        filesystem's journal commits together) and their names (one fsync of `pending`). A
        file already gone (uploaded, or dropped) needs nothing."""
        pending = self.pending_dir
        pending_ids = [p for p in pending_ids if not p.endswith(_EMPTY)]
        if not pending_ids or not pending.is_dir():
            return

        def one(pending_id: str) -> None:
            try:
                fd = os.open(pending / pending_id, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            if len(pending_ids) == 1:
                one(pending_ids[0])
            else:
                list(self._sync_pool.map(one, pending_ids))
            self._fsync_dir(pending)
        except OSError as exc:
            raise from_os_error(exc) from exc

    def pending_ids(self) -> list[str]:
        try:
            return sorted(os.listdir(self.pending_dir))
        except FileNotFoundError:
            return []

    def pending_stat(self, pending_id: str) -> os.stat_result | None:
        if pending_id.endswith(_EMPTY):
            return os.stat_result((stat_mod.S_IFREG | 0o600, 0, 0, 1, os.getuid(), os.getgid(), 0, 0, 0, 0))
        try:
            return os.stat(self.pending_dir / pending_id)
        except FileNotFoundError:
            return None

    def open_pending(self, pending_id: str) -> int | None:
        """A descriptor onto a pending spool file (reads of content not uploaded yet), or None
        once it is gone (uploaded); for empty content, an empty file in memory."""
        if pending_id.endswith(_EMPTY):
            return os.memfd_create("filestore-empty", os.MFD_CLOEXEC)
        try:
            return os.open(self.pending_dir / pending_id, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def upload_pending(self, pending_id: str, rel: bytes, *, mode: int, uid: int, gid: int,
                       times_ns: tuple[int, int] | None = None, stop=None) -> Stat:
        """Upload a kept spool file as the object at `rel` (PUT with Content-MD5, or a verified
        multipart upload, which `stop()` answering True between parts abandons: Superseded).
        The file stays until `drop_pending`: the journal records the upload first, so a crash
        in between uploads it again instead of losing track of it."""
        key = self._key(rel)
        try:
            fd = self.open_pending(pending_id)
        except OSError as exc:
            raise from_os_error(exc) from exc
        if fd is None:
            raise NotFound(f"pending spool file {pending_id}")
        try:
            st = os.fstat(fd)
            atime, mtime = times_ns if times_ns is not None else (st.st_atime_ns, st.st_mtime_ns)
            meta = self._meta("file", mode, uid, gid, mtime, atime)
            etag = self._upload(fd, key, meta, stop=stop)
        finally:
            os.close(fd)
        return Stat("file", st.st_size, mode & 0o7777, uid, gid, 0, atime, mtime, now_ns(), checksum=etag)

    def drop_pending(self, pending_id: str) -> None:
        if pending_id.endswith(_EMPTY):
            return
        try:
            os.unlink(self.pending_dir / pending_id)
        except FileNotFoundError:
            pass

    def discard(self, staging_id: str) -> None:
        self._sparse.pop(staging_id, None)
        try:
            os.unlink(self.spool / staging_id)
        except FileNotFoundError:
            pass

    def staged(self) -> list[str]:
        return sorted(os.listdir(self.spool))



def _copy_local(src: int, dst: int) -> None:
    """Copy a local file's data, region by region (SEEK_DATA/SEEK_HOLE): its holes stay holes,
    so a sparse 10 GiB spool file costs what it holds."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            break
        end = os.lseek(src, start, os.SEEK_HOLE)
        while start < end:
            copied = os.copy_file_range(src, dst, end - start, start, start)
            if copied == 0:
                break
            start += copied
        offset = end
    os.ftruncate(dst, size)
