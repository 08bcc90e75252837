"""Write-back uploads of S3 backends (docs/architecture.md D34).

`close` of a changed S3 file does not wait for S3. Its spool file is fsynced and moved to the
backend's `pending` directory (executors/s3_content.py `keep`), and ONE transaction records the
write command (args `upload: pending`, the node's new size and mtime, checksum NULL) and a row
in `filestore.uploads`. A bounded pool of threads in the mount then uploads it (PUT with
Content-MD5 or a verified multipart upload: the executor's `_upload`), retrying with backoff;
a second transaction journals an `upload` command (actor `writeback`) that sets the node's
checksum to the ETag and deletes the row. So the journal stays append-only, and its rollups do
not move twice (the completion carries no delta: the size was recorded at close).

Names and attributes change without waiting for an upload (docs/architecture.md D39). The
object's key is not fixed when the content is recorded: a send goes to the node's name in this
mount's namespace when it starts, with its attributes then. `unlink` (or a rename over it) of a
file whose upload is pending cancels the upload (its row goes in that command's transaction); a
rename retargets it (the send that starts next goes to the new key); `chmod`, `chown` and
`utimes` are recorded only, and the landing applies them. A send already under way when its
file is renamed or removed is stopped at its next part (a multipart upload), or lands and is
deleted; then it is sent again to the new key, or dropped. Such a *stale* send is the one thing
others wait for: a command that puts live content at its key (a new object, a rename onto it),
and an rmdir or directory rename of a directory it is under (a listing would see its object),
wait until it has finished, bounded by `FILESTORE_S3_WAIT_SECONDS`, then EIO. One lock
(`guard`) orders the serving thread's commands on S3 backends and the landings: a landing is
journaled after every command answered before it, under the name the file has then.

Content changes (open for writing, truncate, fsync) of a pending file, and other mounts'
reads and commands, still wait for its upload (bounded, `FILESTORE_S3_WAIT_SECONDS`, then
EIO); this mount reads the spool file instead. A crash leaves row and spool file: the next
start of the same home uploads them (`resume`), to the key of the node's name then.

A committed upload is not sent at once while the mount keeps closing files (D55): the
`upload-hold` thread hands it to the pool after `FILESTORE_S3_WRITEBACK_IDLE_MS` without a kept
close, or `FILESTORE_S3_WRITEBACK_HOLD_SECONDS` after its own close, or as soon as somebody waits
for it (`wait`: fsync, a change of its content; `drain`: the unmount releases them all).
"""
from __future__ import annotations

import contextlib
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
from executors.base import ExecutorError, Stat, Superseded

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
    cancelled: bool = False  # its file was removed (unlink, replaced): never lands; its row is gone
    sending: bytes | None = None  # the key (backend-relative path) a send is under way to
    kept_at: float = field(default_factory=time.monotonic)
    urgent: bool = False  # someone waits for it (fsync, a write to it, the unmount): not held back

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
        # 4, not 16: upload threads run botocore under the GIL beside the serving thread, and 16
        # of them halved the rate of closes on a loopback endpoint for no faster landing (D50).
        self.workers = max(1, int(_env_float("FILESTORE_S3_UPLOADS", 4)))
        self.wait_seconds = _env_float("FILESTORE_S3_WAIT_SECONDS", 30)
        self.pending: dict[int, Upload] = {}
        self._lock = threading.Lock()
        # Orders the serving thread's commands on S3 backends and the landings (module docstring).
        self.guard = threading.RLock()
        # Sends under way, by (backend, key): a live send, or a stale one (its file renamed or
        # removed meanwhile) that others writing that key, or listing a directory above it, wait for.
        self._sending: dict[tuple[int, bytes], Upload] = {}
        self._sends = threading.Condition(threading.Lock())
        self._db: Database | None = None  # the uploaders' own connection (never the serving thread's)
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._give_up = False
        self._kept: dict[tuple[int, str], Upload] = {}  # recorded, its write command not committed yet
        self.deletes = None  # core.commands.deletes.Deletes (set by core.service): keys with a deletion queued
        # Uploads held back while closes keep coming (D55): released once no close was kept for
        # `hold_idle` seconds, or `hold_max` after their own close, or when someone waits for one.
        self.hold_idle = _env_float("FILESTORE_S3_WRITEBACK_IDLE_MS", 100) / 1000
        self.hold_max = _env_float("FILESTORE_S3_WRITEBACK_HOLD_SECONDS", 5)
        self._held: list[Upload] = []
        self._hold = threading.Condition(threading.Lock())
        self._releaser: threading.Thread | None = None
        self._last_kept = 0.0  # monotonic time of the last close kept (serving thread)

    # -- deciding and recording (serving thread) ---------------------------------------
    @staticmethod
    def is_s3(backend: Backend) -> bool:
        return backend.executor.writes_back

    @property
    def running(self) -> bool:
        """The uploader pool is started (after `start`, until `drain`)."""
        return self._pool is not None

    def applies(self, backend: Backend, staging_id: str) -> bool:
        """Is this close written back? S3, on, uploader running, and a whole spool file (a sparse
        one, standing for parts of a large object, is uploaded at close as before)."""
        return self.on and self._pool is not None and self.is_s3(backend) \
            and backend.executor.can_keep(staging_id)

    def keep(self, backend: Backend, node: Node, staging_id: str, fd: int, rel: bytes,
             request_id: uuid.UUID) -> tuple[Upload, Stat]:
        """Make the content safe on local disk and describe it: the Stat the write command
        records (checksum None until uploaded) and the Upload to queue once it committed."""
        # Not fsynced here: the committer makes the group's kept files durable at once before
        # it records them (`before_commit`); close waits for neither (D48).
        pending_id = backend.executor.keep(staging_id, fd, sync=False)
        st = os.fstat(fd)
        return self._kept_as(backend, node, pending_id, rel, request_id, st.st_size, st.st_atime_ns, st.st_mtime_ns)

    def keep_empty(self, backend: Backend, node: Node, rel: bytes, request_id: uuid.UUID) -> tuple[Upload, Stat]:
        """`keep` for a new file closed empty: its content needs no spool file (D58)."""
        pending_id = backend.executor.keep_empty(f"{os.getpid()}.{request_id}")
        return self._kept_as(backend, node, pending_id, rel, request_id, 0, node.atime_ns, node.mtime_ns)

    def _kept_as(self, backend: Backend, node: Node, pending_id: str, rel: bytes, request_id: uuid.UUID,
                 size: int, atime_ns: int, mtime_ns: int) -> tuple[Upload, Stat]:
        upload = Upload(node.id, backend, pending_id, rel, size, mtime_ns, request_id, self.owner)
        self._last_kept = upload.kept_at
        with self._lock:  # reads in this mount come from the spool file from now on
            self.pending[node.id] = upload
            self._kept[(node.id, pending_id)] = upload
        return upload, Stat("file", size, node.mode, node.uid, node.gid, 0, atime_ns, mtime_ns, time.time_ns(),
                            checksum=None)

    def before_commit(self, group: list) -> None:
        """The committer is about to record these entries: the spool files their upload rows
        name are made durable first, in one batch per backend (a row is never durable without
        its spool file: a power loss would otherwise leave a LOST UPLOAD)."""
        by_backend: dict[int, tuple[Backend, list[str]]] = {}
        with self._lock:
            for entry in group:
                for record in entry.records:
                    for row in record.change.uploads_added:
                        upload = self._kept.get((row.node_id, row.spool))
                        if upload is not None:
                            by_backend.setdefault(upload.backend.id, (upload.backend, []))[1].append(row.spool)
        for backend, pending_ids in by_backend.values():
            backend.executor.sync_pending(pending_ids)

    def after_commit(self, batch: Batch) -> None:
        """The write commands that recorded kept content are committed: upload it now."""
        for record in batch.records:
            for row in record.change.uploads_added:
                with self._lock:
                    upload = self._kept.pop((row.node_id, row.spool), None)
                if upload is None:
                    continue
                if self._pool is not None:
                    self._hold_back(upload)
                elif upload.cancelled:  # unlinked before its write committed, after the drain
                    self._dropped(upload)

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
            self._hurry(upload)
            if not upload.done.wait(self.wait_seconds):
                raise FsError(errno.EIO, f"upload of {display_name(upload.rel)} still pending "
                                         f"({upload.attempts} failed attempts)")
            return True
        return self._poll("node_id = %s", node_id)

    # -- names and attributes of pending files (serving thread, holding `guard`) ----------
    def pending_upload(self, node_id: int) -> Upload | None:
        """This mount's upload of the node, recorded and not landed, if any."""
        upload = self.pending.get(node_id)
        return upload if upload is not None and not upload.cancelled else None

    def cancel(self, node_id: int) -> Upload | None:
        """The node's last name goes (unlink, replaced by a rename): its pending upload never
        lands. Returns it (its row is deleted by the removing command's transaction); a send
        under way stops at its next part or is deleted once it lands (`_send`)."""
        upload = self.pending_upload(node_id)
        if upload is not None:
            upload.cancelled = True
            with self._lock:
                if self.pending.get(node_id) is upload:
                    del self.pending[node_id]
            self._wake_senders()
        return upload

    def moved(self) -> None:
        """A rename on an S3 backend was answered: sends under way look at their key again."""
        self._wake_senders()

    def _wake_senders(self) -> None:
        with self._sends:
            self._sends.notify_all()

    def spool_fd(self, node_id: int) -> int | None:
        """A descriptor onto this mount's pending content of the node (None if there is none)."""
        upload = self.pending_upload(node_id)
        if upload is None:
            return None
        return upload.backend.executor.open_pending(upload.pending_id)

    # -- what still waits: stale sends (serving thread, NOT holding `guard`) ---------------
    def _stale(self, upload: Upload, key: bytes) -> bool:
        if upload.cancelled:
            return True
        try:
            return self.ns.path_of(upload.node_id)[1] != key
        except FsError:
            return True

    def wait_key_free(self, backend: Backend, rel: bytes) -> None:
        """Before live content goes to the key `rel` (a new object, a rename onto it): a stale
        send to that key finishes first (its cleanup would delete what we put)."""
        self._wait_sends(backend, lambda key: key == rel, f"an upload still being sent to {display_name(rel)}")

    def wait_stale_under(self, backend: Backend, rel: bytes) -> None:
        """Before an rmdir or a directory rename at `rel` (which list the objects under it):
        stale sends under it finish first. Live ones (files still in it) need not: the rename
        moves what they land, and they are sent again to the new key."""
        prefix = rel + b"/" if rel else b""
        self._wait_sends(backend, lambda key: key.startswith(prefix),
                         f"uploads still being sent under {display_name(rel) or '/'}", stale_only=True)

    def _busy(self, backend: Backend, matches, stale_only: bool) -> bool:
        with self._sends:
            busy = [(k, u) for k, u in self._sending.items() if k[0] == backend.id and matches(k[1])]
        return any(self._stale(u, k[1]) for k, u in busy) if stale_only else bool(busy)

    def _wait_sends(self, backend: Backend, matches, what: str, *, stale_only: bool = False) -> None:
        if not self.is_s3(backend):
            return
        deadline = time.monotonic() + self.wait_seconds
        while self._busy(backend, matches, stale_only):
            left = deadline - time.monotonic()
            if left <= 0:
                raise FsError(errno.EIO, f"{what} (FILESTORE_S3_WAIT_SECONDS)")
            with self._sends:
                self._sends.wait(min(left, 0.2))

    @contextlib.contextmanager
    def clear(self, backend: Backend, *, keys: tuple[bytes, ...] = (), under: tuple[bytes, ...] = ()):
        """Hold `guard` (for a command on a backend that writes back) once no send is under way
        to `keys` (the command puts live content there) and no stale send under the
        directories `under` (it lists them); waits for them first, not holding it."""
        if not self.is_s3(backend):
            yield
            return
        prefixes = tuple(u + b"/" if u else b"" for u in under)
        if keys and self.deletes is not None:
            self.deletes.flush(backend, keys=keys)  # a queued deletion of the key is sent first

        def at_key(key: bytes) -> bool:
            return key in keys

        def below(key: bytes) -> bool:
            return key.startswith(prefixes)
        while True:
            for rel in keys:
                self.wait_key_free(backend, rel)
            for rel in under:
                self.wait_stale_under(backend, rel)
            with self.guard:
                if not (keys and self._busy(backend, at_key, False)) and \
                        not (under and self._busy(backend, below, True)):
                    yield
                    return

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
        if self.hold_max > 0:
            self._releaser = threading.Thread(target=self._release, name="upload-hold", daemon=True)
            self._releaser.start()

    def _hold_back(self, upload: Upload) -> None:
        """Queue a committed upload: held while this mount keeps closing files (D55), so that a
        burst of small files is answered without uploads taking the CPU and the GIL from it."""
        with self._hold:
            if self._releaser is None or upload.urgent or upload.cancelled:
                self._pool.submit(self._work, upload)
                return
            self._held.append(upload)
            if len(self._held) == 1:  # otherwise the releaser already wakes when the oldest is due
                self._hold.notify()

    def _hurry(self, upload: Upload) -> None:
        with self._hold:
            upload.urgent = True
            self._hold.notify()

    def _release(self) -> None:
        """The releaser thread: hands held uploads to the pool, oldest first, once closes pause
        for `hold_idle`, each at the latest `hold_max` after its close, an urgent one at once,
        all of them when the unmount begins (then it stops: uploads go to the pool directly)."""
        with self._hold:
            while True:
                now = time.monotonic()
                stopping = self._stopping.is_set()
                quiet = now - self._last_kept >= self.hold_idle
                held, self._held = self._held, []
                for upload in held:
                    if stopping or quiet or upload.urgent or upload.cancelled or now - upload.kept_at >= self.hold_max:
                        self._pool.submit(self._work, upload)
                    else:
                        self._held.append(upload)
                if stopping:
                    self._releaser = None
                    return
                if not self._held:
                    self._hold.wait()
                else:
                    due_at = min(self._last_kept + self.hold_idle, self._held[0].kept_at + self.hold_max)
                    self._hold.wait(max(0.001, due_at - now))

    def _work(self, upload: Upload) -> None:
        while not self._give_up:
            draining = self._stopping.is_set()
            try:
                if self._send(upload):
                    return
                continue  # renamed while it was being sent: sent again to the new key
            except (ExecutorError, OSError, psycopg.Error, Conflict, FsError) as exc:
                if upload.cancelled:
                    self._dropped(upload)
                    return
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

    def _send(self, upload: Upload) -> bool:
        """One send to the key of the file's name now; True once landed (or dropped), False if
        the file was renamed meanwhile (send again)."""
        executor = upload.backend.executor
        while True:
            with self.guard:  # the key is claimed under it: commands holding it see every send
                if upload.cancelled:
                    self._dropped(upload)
                    return True
                node = self.ns.node(upload.node_id)
                _, rel = self.ns.path_of(upload.node_id)
                sent = (node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns)
                key = (upload.backend.id, rel)
                with self._sends:
                    if key not in self._sending:
                        self._sending[key] = upload
                        upload.sending = rel
                        break
            with self._sends:  # one send at a time to a key: a stale one to it finishes first
                while key in self._sending:
                    self._sends.wait(0.5)
        try:
            if self.deletes is not None:
                self.deletes.flush(upload.backend, keys=(rel,))  # a queued deletion of the key goes first
            try:
                st = executor.upload_pending(upload.pending_id, rel, mode=node.mode, uid=node.uid, gid=node.gid,
                                             times_ns=(node.atime_ns, node.mtime_ns),
                                             stop=lambda: self._stale(upload, rel))
            except Superseded:
                st = None
            except ExecutorError:
                if not self._stale(upload, rel):
                    raise  # retried with backoff
                st = None  # moved or removed meanwhile: what failed matters no more
            crash_point("writeback:after_upload")
            with self.guard:
                if st is None or self._stale(upload, rel):
                    # Renamed or removed while being sent: what it left at the old key goes (the
                    # command that moved it left the key to this send).
                    executor.unlink(*_split(rel))
                    if upload.cancelled:
                        self._dropped(upload)
                        return True
                    return False
                request = self._land(upload, rel, st, sent)
        finally:
            with self._sends:
                del self._sending[key]
                upload.sending = None
                self._sends.notify_all()
        self.pipeline.wait(request)
        upload.backend.executor.drop_pending(upload.pending_id)
        upload.done.set()
        return True

    def _land(self, upload: Upload, rel: bytes, st: Stat, sent: tuple) -> object:
        """Landed at the key of the file's name (under `guard`): attributes changed while it was
        being sent are applied to the object, and the `upload` command is submitted after
        every command answered before it, against the node as this mount has it."""
        node = self.ns.node(upload.node_id)
        executor = upload.backend.executor
        if (node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns) != sent:
            st = executor.set_attrs(rel, mode=node.mode, uid=node.uid, gid=node.gid,
                                    times_ns=(node.atime_ns, node.mtime_ns))
        after = node.changed(checksum=st.checksum, version=node.version + 1)
        change = records.Change(uploads_landed=[(upload.node_id, upload.pending_id)])
        change.update(after, node.version)
        journal = records.Journal(
            "upload", "committed", WRITEBACK, uuid.uuid4(), upload.backend.id, node.id, display_name(rel),
            {"bytes": st.size, "attempts": upload.attempts + 1, "write_request_id": str(upload.request_id)},
            result={"size": st.size, "checksum": st.checksum})
        # No deltas: the write command moved the totals at close; this changes none.
        request = self.pipeline.submit([records.Record(journal, change)], log_intent=False)
        self.ns.put(after)  # this mount's view takes the ETag (reads use it with If-Match)
        upload.landed = after
        with self._lock:
            if self.pending.get(upload.node_id) is upload:
                del self.pending[upload.node_id]
        return request

    def _dropped(self, upload: Upload) -> None:
        """A cancelled upload: its spool file goes; nothing is journaled (the command that
        removed the file deleted the row and says so)."""
        upload.backend.executor.drop_pending(upload.pending_id)
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
        rows = self.db.query_dicts("SELECT * FROM filestore.uploads WHERE owner = %s AND spool NOT LIKE 'delete:%%'"
                                   " ORDER BY created_at", (self.owner,))  # deletions: core.commands.deletes
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
            # Rows replayed from the intent log after a crash were recorded without
            # `before_commit`: their spool files are made durable now (page cache survived).
            backend.executor.sync_pending(sorted(recorded.get(backend.id, ())))
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
        # The write commands answered and not committed yet hand their uploads over at commit
        # (`after_commit`): committed first, so that the pool still takes them (one unlinked
        # meanwhile is not in `pending`, and would otherwise keep its spool file until the
        # next start). With PostgreSQL away, the next start's resume sorts them out.
        with self._lock:
            handing_over = bool(self._kept)
        if handing_over:
            try:
                self.pipeline.sync(timeout=min(timeout, 60.0))
            except (TimeoutError, FsError) as exc:
                log.warning("unmount: write commands not committed before the uploads drain: %s", exc)
        self._stopping.set()
        releaser = self._releaser
        with self._hold:  # held uploads go to the pool now
            self._hold.notify()
        if releaser is not None:
            releaser.join()
        while (self.pending or self._sending) and not self._give_up and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pending:
            self._give_up = True
        # Nothing pending: what is still queued is uploads cancelled before they started (their
        # file unlinked or replaced), each of which drops its spool file when it runs: let them
        # run. Cancelled with the queue, their spool files stayed until the next start's resume.
        self._pool.shutdown(wait=not self.pending, cancel_futures=bool(self.pending))
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


def _split(rel: bytes) -> tuple[bytes, bytes]:
    parent, _, name = rel.rpartition(b"/")
    return parent, name
