"""Object deletions of S3 backends, sent in batches behind the journal (docs/architecture.md
D49).

An `unlink` (or an `rmdir`) on an S3 backend does not send its DELETE before it is answered. Its
command records, in the same record as its journal row, a row in `filestore.uploads` whose spool
column says `delete:file` (or `delete:dir`: the directory's marker object) and whose path is the
backend-relative key: the write-back queue (D34) is the durable queue of deletions too, so the
command's answer line in the intent log carries it, a SIGKILL after the answer loses nothing
(recovery commits the record, `resume` sends it), and no schema changes. Once the command is
committed, one sender thread collects every deletion queued and sends them as `DeleteObjects`
calls of up to 1,000 keys, then deletes their rows (one statement).

Order: a key with a deletion queued is never written before the deletion is sent (or its
sender gave up): a command that puts content at a key (create, mkdir, symlink, a rename onto
it: WriteBack.clear with `keys`) or an upload about to be sent to it (WriteBack._send) waits for
it (`flush`), and a command that lists a prefix (a directory rename, an rmdir whose emptiness the
mount cannot vouch for) waits for the deletions under it. A deletion's row is deleted only after
S3 answered, and the key is released only after that: a deletion re-sent after a crash can never
meet a newer object at its key. An `rmdir` whose directory the mount knows to be empty (its
listing in the namespace) queues the deletion of the marker and lists nothing.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg

from core.errors import FsError
from core.faults import crash_point
from core.journal import records
from core.journal.pipeline import Batch
from core.model import Backend, display_name
from core.storage.db import Conflict, Database
from executors.base import ExecutorError

log = logging.getLogger(__name__)

FILE, DIR = "delete:file", "delete:dir"  # filestore.uploads.spool of a queued deletion
BATCH = 1000  # keys per DeleteObjects, S3's limit
GATHER_SECONDS = 0.02  # after the first deletion committed, so that an rm -r fills a batch
UNCOMMITTED_CHECK_SECONDS = 30.0  # a deletion whose command never committed (refused): looked up


def deletes_of(files) -> "Deletes | None":
    """The mount's queue of deletions, from its FileTable (None in a process without write-back)."""
    return getattr(getattr(files, "writeback", None), "deletes", None)


def is_deletion(spool: str) -> bool:
    return spool in (FILE, DIR)


@dataclass
class Deletion:
    node_id: int
    backend: Backend
    rel: bytes
    is_dir: bool
    committed: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    sending: bool = False


class Deletes:
    """The queue of deletions of this mount; an AfterCommit listener of the pipeline."""

    def __init__(self, db: Database, owner: str, wait_seconds: float):
        self.db = db
        self.owner = owner
        self.wait_seconds = wait_seconds
        self._cond = threading.Condition(threading.Lock())
        self._queued: dict[tuple[int, bytes], list[Deletion]] = {}
        self._urgent = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._give_up = False
        self._db: Database | None = None
        self.batches_sent = 0  # DeleteObjects calls (for tests and the bench)

    # -- recording (serving thread) ----------------------------------------------------------
    def applies(self, backend: Backend) -> bool:
        return self._thread is not None and not self._stopping and getattr(backend.executor, "writes_back", False)

    def queue(self, backend: Backend, node_id: int, rel: bytes, *, is_dir: bool,
              request_id: uuid.UUID) -> records.Upload:
        """The deletion of `rel`'s object, sent once the removing command is committed: returns the
        row its command records."""
        deletion = Deletion(node_id, backend, rel, is_dir)
        with self._cond:
            self._queued.setdefault((backend.id, rel), []).append(deletion)
        return records.Upload(node_id, backend.id, DIR if is_dir else FILE, self.owner, rel, 0, 0, request_id)

    def after_commit(self, batch: Batch) -> None:
        committed = [(row.backend_id, row.path, row.node_id) for record in batch.records
                     for row in record.change.uploads_added if is_deletion(row.spool)]
        if not committed:
            return
        with self._cond:
            for backend_id, rel, node_id in committed:
                for d in self._queued.get((backend_id, rel), ()):
                    if d.node_id == node_id:
                        d.committed = True
            self._cond.notify_all()

    # -- waiting (serving thread, upload threads) -------------------------------------------------
    def pending(self, backend: Backend, keys: tuple[bytes, ...] = (), under: tuple[bytes, ...] = ()) -> bool:
        prefixes = tuple(u + b"/" if u else b"" for u in under)
        with self._cond:
            return any(k[0] == backend.id and (k[1] in keys or (prefixes and k[1].startswith(prefixes)))
                       for k in self._queued)

    def flush(self, backend: Backend, *, keys: tuple[bytes, ...] = (), under: tuple[bytes, ...] = ()) -> None:
        """Until no deletion is queued at `keys` or below the directories `under` (sent now, not
        after the gathering delay). Past FILESTORE_S3_WAIT_SECONDS: EIO."""
        if not (keys or under) or not self._queued:
            return
        prefixes = tuple(u + b"/" if u else b"" for u in under)

        def busy() -> bool:
            return any(k[0] == backend.id and (k[1] in keys or (prefixes and k[1].startswith(prefixes)))
                       for k in self._queued)
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            while busy():
                if self._thread is None:
                    raise FsError(errno.EIO, "object deletions still queued (the sender is stopped)")
                left = deadline - time.monotonic()
                if left <= 0:
                    what = keys[0] if keys else under[0]
                    raise FsError(errno.EIO, f"deletion of objects at {display_name(what)} still queued "
                                             "(FILESTORE_S3_WAIT_SECONDS)")
                self._urgent = True
                self._cond.notify_all()
                self._cond.wait(min(left, 0.2))

    # -- sending (the sender thread) --------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._db = Database(self.db.url, pool_size=1)
        self._stopping = self._give_up = False
        self._thread = threading.Thread(target=self._run, name="s3-delete", daemon=True)
        self._thread.start()

    def resume(self, backends: dict[int, Backend]) -> int:
        """At start, before serving: the deletions a crash (or an unmount with S3 failing) left
        queued are queued again, committed."""
        rows = self.db.query_dicts("SELECT node_id, backend_id, spool, path FROM filestore.uploads"
                                   " WHERE owner = %s AND spool IN (%s, %s)", (self.owner, FILE, DIR))
        queued = 0
        with self._cond:
            for row in rows:
                backend = backends.get(row["backend_id"])
                if backend is None or not getattr(backend.executor, "writes_back", False):
                    log.warning("queued deletion of %s: backend %s unavailable; kept",
                                display_name(bytes(row["path"])), row["backend_id"])
                    continue
                rel = bytes(row["path"])
                self._queued.setdefault((backend.id, rel), []).append(
                    Deletion(row["node_id"], backend, rel, row["spool"] == DIR, committed=True))
                queued += 1
            self._cond.notify_all()
        if queued:
            log.info("%d object deletions left queued are sent again", queued)
        return queued

    def _take(self) -> list[Deletion]:
        """Under the lock: every committed deletion not being sent, once there are some; [] to stop."""
        while True:
            if self._give_up:
                return []
            ready = [d for ds in self._queued.values() for d in ds if d.committed and not d.sending]
            if ready:
                if not self._urgent and not self._stopping and len(ready) < BATCH:
                    self._cond.wait(GATHER_SECONDS)  # let a burst (rm -r) fill the batch
                    ready = [d for ds in self._queued.values() for d in ds if d.committed and not d.sending]
                self._urgent = False
                for d in ready:
                    d.sending = True
                return ready
            if self._stopping and (not self._queued or time.monotonic() > self._stopping_deadline):
                return []
            self._check_uncommitted()
            self._cond.wait(0.1 if self._stopping else 1.0 if self._queued else 5.0)

    _stopping_deadline = 0.0

    def _check_uncommitted(self) -> None:
        """Deletions whose command was never committed as such (refused, adopted): looked up in the
        database after a while; a row there is sent, none is dropped."""
        now = time.monotonic()
        old = [d for ds in self._queued.values() for d in ds
               if not d.committed and now - d.queued_at > UNCOMMITTED_CHECK_SECONDS]
        if not old:
            return
        try:
            found = {r[0] for r in self._db.query(
                "SELECT node_id FROM filestore.uploads WHERE node_id = ANY(%s) AND spool IN (%s, %s)",
                ([d.node_id for d in old], FILE, DIR))}
        except (psycopg.Error, Conflict):
            return
        for d in old:
            if d.node_id in found:
                d.committed = True
            elif now - d.queued_at > 4 * UNCOMMITTED_CHECK_SECONDS:
                self._release([d])

    def _release(self, done: list[Deletion]) -> None:
        for d in done:
            key = (d.backend.id, d.rel)
            left = [x for x in self._queued.get(key, ()) if x is not d]
            if left:
                self._queued[key] = left
            else:
                self._queued.pop(key, None)

    def _run(self) -> None:
        attempts = 0
        while True:
            with self._cond:
                ready = self._take()
            if not ready:
                return
            try:
                self._send(ready)
                attempts = 0
            except (ExecutorError, OSError, psycopg.Error, Conflict) as exc:
                attempts += 1
                log.warning("deleting %d objects failed (attempt %d), retried: %s", len(ready), attempts, exc)
                with self._cond:
                    for d in ready:
                        d.sending = False
                    if self._stopping:
                        # S3 failing while unmounting: the rows stay for the next start
                        self._give_up = True
                        self._cond.notify_all()
                        return
                    # backoff (flushes waiting do not cut it short; an unmount does)
                    until = time.monotonic() + min(30.0, 0.25 * 2 ** min(attempts, 7))
                    while not self._stopping and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
            except Exception:
                log.exception("deleting %d objects failed unexpectedly; sent again at the next start", len(ready))
                with self._cond:
                    self._give_up = True
                    self._cond.notify_all()
                return

    def _send(self, ready: list[Deletion]) -> None:
        by_backend: dict[int, list[Deletion]] = {}
        for d in ready:
            by_backend.setdefault(d.backend.id, []).append(d)
        for group in by_backend.values():
            for start in range(0, len(group), BATCH):
                batch = group[start:start + BATCH]
                crash_point("deletes:before_send")
                batch[0].backend.executor.delete_paths([(d.rel, d.is_dir) for d in batch])
                self.batches_sent += 1
                # Rows go only once S3 answered; keys are released only once the rows are gone.
                self._db.transaction([(
                    "DELETE FROM filestore.uploads WHERE node_id = ANY(%s) AND spool IN (%s, %s)",
                    ([d.node_id for d in batch], FILE, DIR))], label="deletes.sent")
                with self._cond:
                    self._release(batch)
                    self._cond.notify_all()

    # -- stop -------------------------------------------------------------------------------
    def drain(self, timeout: float = 600.0) -> int:
        """At unmount: send what is queued (and committed); with S3 failing stop there: the rows
        stay for the next start. Returns how many are left."""
        if self._thread is None:
            return 0
        with self._cond:
            self._stopping = True
            self._stopping_deadline = time.monotonic() + 5.0  # commits still under way
            self._urgent = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            left = sum(len(ds) for ds in self._queued.values())
            self._give_up = True
            self._cond.notify_all()
        self._thread = None
        if left:
            log.warning("unmount: %d object deletions still queued; sent at the next start", left)
        if self._db is not None:
            self._db.close()
            self._db = None
        return left
