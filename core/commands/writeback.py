"""Write-back uploads of S3 backends (docs/architecture.md D34).

`close` of a changed S3 file does not wait for S3. Its spool file is fsynced and moved to the
backend's `pending` directory (executors/s3_content.py `keep`), and ONE transaction records the
write command (args `upload: pending`, the node's new size and mtime, checksum NULL) and a row
in `filestore.uploads`. A bounded pool of threads in the mount then uploads it (PUT with
Content-MD5 or a verified multipart upload: the executor's `_upload`), retrying with backoff;
a second transaction journals an `upload` command (actor `writeback`) that sets the node's
checksum to the ETag and deletes the row. So the journal stays append-only, and its rollups do
not move twice (the completion carries no delta: the size was recorded at close).

While a row exists, every process waits for it (bounded, `FILESTORE_S3_WAIT_SECONDS`, then EIO)
before reading the node from S3 or changing it; this mount reads the spool file instead. A
crash leaves row and spool file: the next start of the same home uploads them (`resume`).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg

from core.errors import FsError
from core.faults import crash_point
from core.journal import records
from core.journal.pipeline import Batch, Pipeline
from core.model import Backend, Node, Principal, display_name
from core.storage import store
from core.storage.db import Conflict, Database
from core.storage.queue import RECONCILE, JobQueue
from core.view.namespace import Namespace
from executors.base import ExecutorError, Stat

log = logging.getLogger(__name__)

WRITEBACK = Principal.system("writeback")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def enabled() -> bool:
    return os.environ.get("FILESTORE_S3_WRITEBACK", "on").lower() not in ("off", "0", "no", "false")


def owner_of(home) -> str:
    """Who holds the spool files: this host's home (only it can upload or resume them)."""
    return f"{socket.gethostname()}:{home}"


@dataclass
class Upload:
    node_id: int
    backend: Backend
    pending_id: str
    rel: bytes
    size: int
    mtime_ns: int
    request_id: uuid.UUID
    owner: str = ""
    attempts: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    landed: Node | None = None  # the node as the upload command left it

    @property
    def row(self) -> records.Upload:
        """The uploads row, recorded in the write command's transaction."""
        return records.Upload(self.node_id, self.backend.id, self.pending_id, self.owner, self.rel, self.size,
                              self.mtime_ns, self.request_id)


class SpoolReader:
    """Reads of content recorded but not uploaded yet, from its spool file (same mount)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class WriteBack:
    """Uploads in the background; an AfterCommit listener of the pipeline: an upload starts
    once the write command that recorded it is committed."""

    def __init__(self, db: Database, ns: Namespace, jobs: JobQueue, home, pipeline: Pipeline, *,
                 on: bool | None = None):
        self.db = db  # the serving thread's: waits and reads
        self.ns = ns
        self.pipeline = pipeline
        self.jobs = jobs
        self.on = enabled() if on is None else on
        self.owner = owner_of(home)
        self.workers = max(1, int(_env_float("FILESTORE_S3_UPLOADS", 16)))
        self.wait_seconds = _env_float("FILESTORE_S3_WAIT_SECONDS", 30)
        self.pending: dict[int, Upload] = {}
        self._lock = threading.Lock()
        self._db: Database | None = None  # the uploaders' own connection (never the serving thread's)
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._give_up = False
        self._kept: dict[tuple[int, str], Upload] = {}  # recorded, its write command not committed yet

    # -- deciding and recording (serving thread) ---------------------------------------
    @staticmethod
    def is_s3(backend: Backend) -> bool:
        return backend.executor.writes_back

    def applies(self, backend: Backend, staging_id: str) -> bool:
        """Is this close written back? S3, on, uploader running, and a whole spool file (a sparse
        one, standing for parts of a large object, is uploaded at close as before)."""
        return self.on and self._pool is not None and self.is_s3(backend) \
            and backend.executor.can_keep(staging_id)

    def keep(self, backend: Backend, node: Node, staging_id: str, fd: int, rel: bytes,
             request_id: uuid.UUID) -> tuple[Upload, Stat]:
        """Make the content safe on local disk and describe it: the Stat the write command
        records (checksum None until uploaded) and the Upload to queue once it committed."""
        pending_id = backend.executor.keep(staging_id, fd)
        st = os.fstat(fd)
        upload = Upload(node.id, backend, pending_id, rel, st.st_size, st.st_mtime_ns, request_id, self.owner)
        with self._lock:  # reads in this mount come from the spool file from now on
            self.pending[node.id] = upload
            self._kept[(node.id, pending_id)] = upload
        return upload, Stat("file", st.st_size, node.mode, node.uid, node.gid, 0, st.st_atime_ns,
                            st.st_mtime_ns, time.time_ns(), checksum=None)

    def after_commit(self, batch: Batch) -> None:
        """The write commands that recorded kept content are committed: upload it now."""
        for record in batch.records:
            for row in record.change.uploads_added:
                with self._lock:
                    upload = self._kept.pop((row.node_id, row.spool), None)
                if upload is not None and self._pool is not None:
                    self._pool.submit(self._work, upload)

    def enqueue(self, upload: Upload) -> None:
        with self._lock:
            self.pending[upload.node_id] = upload
        self._pool.submit(self._work, upload)

    # -- waiting (serving thread) --------------------------------------------------------
    def wait(self, node_id: int) -> bool:
        """Block until no upload of the node is pending anywhere; True if there was one.
        Past FILESTORE_S3_WAIT_SECONDS: EIO (S3 is failing; the upload goes on)."""
        upload = self.pending.get(node_id)
        if upload is not None:
            if not upload.done.wait(self.wait_seconds):
                raise FsError(errno.EIO, f"upload of {display_name(upload.rel)} still pending "
                                         f"({upload.attempts} failed attempts)")
            return True
        return self._poll("node_id = %s", node_id)

    def wait_backend(self, backend: Backend) -> None:
        """Before a directory rename or rmdir on S3 (which lists the objects under it): every
        pending upload of that backend lands first, this mount's and other mounts'."""
        if not self.is_s3(backend):
            return
        deadline = time.monotonic() + self.wait_seconds
        for upload in [u for u in list(self.pending.values()) if u.backend.id == backend.id]:
            if not upload.done.wait(max(0.0, deadline - time.monotonic())):
                raise FsError(errno.EIO, "uploads of this backend still pending")
        self._poll("backend_id = %s", backend.id, deadline=deadline)

    def _poll(self, where: str, value: int, *, deadline: float | None = None) -> bool:
        """Another process's upload (or one of ours not queued here): poll its row."""
        deadline = deadline or time.monotonic() + self.wait_seconds
        interval = 0.02
        waited = False
        while self.db.query(f"SELECT 1 FROM filestore.uploads WHERE {where} LIMIT 1", (value,)):
            waited = True
            if time.monotonic() > deadline:
                raise FsError(errno.EIO, "an upload of another mount is still pending")
            time.sleep(interval)
            interval = min(interval * 2, 0.5)
        return waited

    def reader(self, node_id: int) -> SpoolReader | None:
        """This mount's pending content of a node, read from its spool file (S3 holds the
        old object, or none, until the upload lands)."""
        upload = self.pending.get(node_id)
        if upload is None:
            return None
        fd = upload.backend.executor.open_pending(upload.pending_id)
        if fd is None:  # landed meanwhile
            self.wait(node_id)
            return None
        return SpoolReader(fd)

    def refresh(self, node_id: int) -> Node:
        """The node as committed (after another process's upload landed)."""
        fresh = store.load_node(self.db, node_id)
        if fresh is None:
            raise FsError(errno.ENOENT)
        with self.ns.lock:
            current = self.ns.nodes.get(node_id)
            if current is None or current.version <= fresh.version:
                self.ns.nodes[node_id] = fresh
                return fresh
            return current

    # -- uploading (uploader threads) ----------------------------------------------------
    def start(self) -> None:
        if not self.on or self._pool is not None:
            return
        self._db = Database(self.db.url, pool_size=2)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="upload")

    def _work(self, upload: Upload) -> None:
        while not self._give_up:
            draining = self._stopping.is_set()
            try:
                self._upload(upload)
                return
            except (ExecutorError, OSError, psycopg.Error, Conflict) as exc:
                upload.attempts += 1
                if upload.backend.executor.pending_stat(upload.pending_id) is None:
                    self._lost(upload, "spool file vanished before its upload")
                    return
                self._failed(upload, exc)
                if draining:
                    # An attempt made while unmounting failed: S3 is failing; this upload and
                    # those not started wait for the next start (rows and spool files stay).
                    self._give_up = True
                    return
                # Backoff; an unmount wakes it for one last attempt.
                self._stopping.wait(min(30.0, 0.25 * 2 ** min(upload.attempts, 7)))
            except Exception:
                log.exception("upload of %s failed unexpectedly; retried at the next start",
                              display_name(upload.rel))
                return

    def _upload(self, upload: Upload) -> None:
        db = self._db
        node = store.load_node(db, upload.node_id)
        if node is None:
            raise ExecutorError(f"node {upload.node_id} not found")
        st = upload.backend.executor.upload_pending(upload.pending_id, upload.rel, mode=node.mode,
                                                    uid=node.uid, gid=node.gid)
        crash_point("writeback:after_upload")
        for _ in range(4):
            node = store.load_node(db, upload.node_id)
            after = node.changed(checksum=st.checksum, version=node.version + 1)
            change = records.Change(uploads_landed=[(upload.node_id, upload.pending_id)])
            change.update(after, node.version)
            journal = records.Journal(
                "upload", "committed", WRITEBACK, uuid.uuid4(), upload.backend.id, node.id,
                display_name(upload.rel),
                {"bytes": st.size, "attempts": upload.attempts + 1, "write_request_id": str(upload.request_id)},
                result={"size": st.size, "checksum": st.checksum})
            # No deltas: the write command moved the totals at close; this changes none.
            try:
                self.pipeline.wait(self.pipeline.submit([records.Record(journal, change)], log_intent=False))
                break
            except psycopg.DatabaseError as exc:
                if not _conflict(exc):
                    raise
        else:
            raise ExecutorError(f"upload of node {upload.node_id}: conflicting changes kept winning")
        upload.backend.executor.drop_pending(upload.pending_id)
        self._landed(upload, after)

    def _landed(self, upload: Upload, after: Node) -> None:
        with self.ns.lock:  # this mount's view takes the ETag (reads use it with If-Match)
            current = self.ns.nodes.get(after.id)
            if current is not None and current.version < after.version:
                self.ns.nodes[after.id] = current.changed(checksum=after.checksum, version=after.version)
        upload.landed = after
        with self._lock:
            if self.pending.get(upload.node_id) is upload:
                del self.pending[upload.node_id]
        upload.done.set()

    def _failed(self, upload: Upload, exc: BaseException) -> None:
        log.warning("upload of %s failed (attempt %d), retried: %s", display_name(upload.rel), upload.attempts, exc)
        try:
            self._db.transaction([(
                "UPDATE filestore.uploads SET attempts = attempts + 1, last_error = %s, last_attempt_at = now()"
                " WHERE node_id = %s AND spool = %s", (str(exc)[:500], upload.node_id, upload.pending_id))],
                label="upload.failed")
        except (psycopg.Error, Conflict):
            pass  # the database is away too: the count is only for operators

    def _lost(self, upload: Upload, why: str) -> None:
        """Recorded content whose spool file is gone: never dropped silently. Logged as an
        error, journaled as drift (the backend does not hold what the node says), the node
        INCONSISTENT and a reconcile job queued, which adopts what S3 holds."""
        log.error("LOST UPLOAD: %s of backend %s (node %s, %d bytes, write %s): %s",
                  display_name(upload.rel), upload.backend.name, upload.node_id, upload.size,
                  upload.request_id, why)
        db = self._db or self.db
        node = store.load_node(db, upload.node_id)
        change = records.Change(uploads_landed=[(upload.node_id, upload.pending_id)])
        if node is not None and node.state == "ACTIVE":
            change.update(node.changed(state="INCONSISTENT", version=node.version + 1), node.version)
        journal = records.Journal("drift", "committed", WRITEBACK, uuid.uuid4(), upload.backend.id,
                                  upload.node_id, display_name(upload.rel),
                                  {"observed": None, "reason": why, "write_request_id": str(upload.request_id)})
        self.pipeline.wait(self.pipeline.submit([records.Record(journal, change)], log_intent=False))
        from core.repair.reconcile import job_key, job_payload  # here: reconcile imports recovery, which is heavy
        self.jobs.enqueue(RECONCILE, job_key(upload.backend.id, upload.rel),
                          job_payload(upload.backend.id, upload.rel, source="writeback"))
        with self._lock:
            if self.pending.get(upload.node_id) is upload:
                del self.pending[upload.node_id]
        upload.done.set()

    # -- start and stop -------------------------------------------------------------------
    def resume(self, backends: dict[int, Backend]) -> int:
        """At start, before serving: queue this home's uploads left by a crash (or an unmount
        with S3 failing); report those whose spool file is gone; delete kept spool files whose
        write command never committed. Returns how many were queued."""
        rows = self.db.query_dicts("SELECT * FROM filestore.uploads WHERE owner = %s ORDER BY created_at",
                                   (self.owner,))
        queued = 0
        recorded: dict[int, set[str]] = {}
        for row in rows:
            backend = backends.get(row["backend_id"])
            if backend is None or not self.is_s3(backend):
                log.warning("pending upload of %s: backend %s unavailable; kept", row["node_id"], row["backend_id"])
                continue
            recorded.setdefault(backend.id, set()).add(row["spool"])
            upload = Upload(row["node_id"], backend, row["spool"], bytes(row["path"]), row["size"], row["mtime_ns"],
                            row["request_id"], self.owner, attempts=row["attempts"])
            st = backend.executor.pending_stat(row["spool"])
            if st is None or st.st_size != row["size"]:
                self._lost(upload, "spool file missing at start" if st is None else
                           f"spool file has {st.st_size} bytes, {row['size']} recorded")
                continue
            if self.on:
                self.start()
                self.enqueue(upload)
                queued += 1
            else:
                log.warning("pending upload of %s kept: write-back is off (FILESTORE_S3_WRITEBACK)",
                            display_name(upload.rel))
        for backend in backends.values():
            if not self.is_s3(backend):
                continue
            for pending_id in backend.executor.pending_ids():
                if pending_id not in recorded.get(backend.id, set()):
                    log.warning("removing kept spool file %s of %s: its write command never committed",
                                pending_id, backend.name)
                    backend.executor.drop_pending(pending_id)
        if queued:
            log.info("write-back: %d uploads left pending are uploaded again", queued)
        return queued

    def drain(self, timeout: float | None = None) -> int:
        """At unmount: wait for the pending uploads; with S3 failing (an upload fails while
        draining) stop there: rows and spool files stay for the next start. Returns how many
        are left."""
        if self._pool is None:
            return 0
        left = len(self.pending)
        if left:
            log.info("unmount: waiting for %d pending uploads", left)
        timeout = _env_float("FILESTORE_S3_DRAIN_SECONDS", 600) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stopping.set()
        while self.pending and not self._give_up and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pending:
            self._give_up = True
        self._pool.shutdown(wait=not self.pending, cancel_futures=True)
        self._pool = None
        remaining = len(self.pending)
        if remaining:
            log.warning("unmount: %d uploads still pending (S3 failing); uploaded at the next start", remaining)
        elif left:
            log.info("unmount: all %d pending uploads landed", left)
        if self._db is not None:
            self._db.close()
            self._db = None
        return remaining


def _conflict(exc: BaseException) -> bool:
    """Another command changed the node between our read and our record (SQLSTATE FS409)."""
    return getattr(exc, "sqlstate", None) == "FS409"
