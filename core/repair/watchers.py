"""Watchers: inotify on local backend roots (core.repair.tree_watch), turning changes into jobs.

An event is not drift yet: it only says "look at this path". It becomes a reconcile job,
coalesced per path, that runs after a short debounce and decides by comparing the disk with
the committed node (core.repair.reconcile), which is what keeps the mount's own writes from ever
being reported. One thread reads every backend's queued events each FLUSH_SECONDS, in one
read(2) per backend, and writes the paths as one statement, so a burst of writes costs one
INSERT, not one per event. The executor's staging area is not watched at all: a staged file is
the mount's work in progress; its landing rename shows up as a creation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core.journal.recovery import stat_or_none
from core.model import Backend
from core.observe import metrics
from core.repair.reconcile import job_key, job_payload
from core.repair.tree_watch import AUDIT, TreeWatch
from core.storage.queue import RECONCILE, JobQueue
from executors.base import NotFound

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1
DEBOUNCE_SECONDS = 0.3
RECHECK_SECONDS = 0.2  # inline: how long a path that differs from the mount's view is looked at again
# A read this large means the kernel's queue (fs.inotify.max_queued_events, 16,384 by default)
# fills faster than one read per FLUSH_SECONDS empties it: read again at once.
BUSY_EVENTS = 2048


class Watchers:
    """The watches of every local backend, feeding filestore_reconcile_queue."""

    def __init__(self, queue: JobQueue, backends: list[Backend],
                 known: Callable[..., bool] | None = None):
        self.queue = queue
        self.backends = [b for b in backends if b.kind == "local"]
        # Inline: the mount's own view of a path. Most events a mount's watcher sees are its
        # own writes, already committed and in its namespace by the time of the flush: those
        # are dropped here instead of costing a queued job each (claimed, looked at, finished).
        # Called as known(backend, rel, stat) or, for a directory to look at deep, with the
        # directory's listing on the disk as a fourth argument (name -> Stat).
        self.known = known
        self._pending: dict[str, dict[str, Any]] = {}
        self._waiting: dict[str, tuple[dict[str, Any], float]] = {}  # key -> (payload, first looked at)
        self._lock = threading.Lock()
        self._trees: list[tuple[Backend, TreeWatch]] = []
        self._rewatch: dict[int, Backend] = {}  # asked by rewatch(), done by the loop's thread

    def add(self, backend_id: int, rel: bytes, extra: dict[str, Any]) -> None:
        key = job_key(backend_id, rel)
        with self._lock:
            payload = self._pending.setdefault(key, job_payload(backend_id, rel))
            payload.update(extra)

    def start(self) -> None:
        """Watch from now on (synchronous: changes after this call are seen). Raises OSError
        when a root cannot be watched, or a tree has more directories than the watch limit."""
        try:
            for backend in self.backends:
                self._trees.append((backend, TreeWatch(backend.root)))
        except BaseException:
            self.close()
            raise
        log.info("watching %d local backend(s), %d directories", len(self._trees),
                 sum(tree.watched for _, tree in self._trees))

    def rewatch(self, backend: Backend) -> None:
        """Watch this backend's tree afresh (from the loop's thread, at its next round): it is
        back after an outage (its root may be another directory now: a disk mounted again,
        whose old watches see nothing), or it was opened after the watchers started. What
        changed while it was not watched is the audit's to find (core.storage.availability):
        one is queued once the new watches are in place."""
        if backend.kind == "local":
            with self._lock:
                self._rewatch[backend.id] = backend

    def _watch_again(self) -> None:
        with self._lock:
            todo, self._rewatch = self._rewatch, {}
        for backend_id, backend in todo.items():
            for i, (known, tree) in enumerate(self._trees):
                if known.id == backend_id:
                    tree.close()
                    del self._trees[i]
                    break
            self.backends = [b for b in self.backends if b.id != backend_id] + [backend]
            try:
                self._trees.append((backend, TreeWatch(backend.root)))
            except OSError as exc:  # away again already: its next return asks again
                log.error("cannot watch backend %s again (%s): drift is found by audits only", backend.name, exc)
            else:
                log.info("watching backend %s again", backend.name)
                # Compared whole once watched: a change made before the watch was in place (the
                # audit queued when it came back may have run already) is found by this one.
                self.add(backend.id, b"", dict(AUDIT))

    def run(self, stop: threading.Event) -> None:
        busy = False
        try:
            while not stop.wait(0 if busy else FLUSH_SECONDS):
                if self._rewatch:
                    self._watch_again()
                busy = self.read()
                self.flush()
        finally:
            try:
                self.read()
                self.flush(final=True)
            finally:
                self.close()

    def read(self) -> bool:
        """Take every backend's queued events into the pending jobs; True if a queue was busy."""
        busy = False
        for backend, tree in self._trees:
            count, changes = tree.read()
            if not count:
                continue
            metrics.WATCH_EVENTS.labels(backend.name).inc(count)
            busy = busy or count >= BUSY_EVENTS
            for rel, extra in changes.items():
                self.add(backend.id, rel, {"source": "watcher", **extra})
        return busy

    def close(self) -> None:
        for _, tree in self._trees:
            tree.close()
        self._trees = []

    def flush(self, *, final: bool = False) -> None:
        """Queue the pending paths, less those the mount already holds (inline). A path that
        differs from the mount's view is looked at again at the next flushes for RECHECK_SECONDS
        before it costs a job: most are the mount's own change caught between the disk and its
        namespace (a file being created while its directory is compared); the job's debounce is
        shortened by as much, so a real drift is not seen later."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if self.known is None:
            self._enqueue(pending, DEBOUNCE_SECONDS)
            return
        now = time.monotonic()
        for key, payload in pending.items():
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting[0].update(payload)
            else:
                self._waiting[key] = (payload, now)
        at_once, rechecked = {}, {}
        for key, (payload, since) in list(self._waiting.items()):
            if self._known_safely(payload):
                del self._waiting[key]
            elif final or payload.get("from") or payload.get("source") == "audit":
                del self._waiting[key]
                at_once[key] = payload
            elif now - since >= RECHECK_SECONDS:
                del self._waiting[key]
                rechecked[key] = payload
        self._enqueue(at_once, DEBOUNCE_SECONDS)
        self._enqueue(rechecked, DEBOUNCE_SECONDS - RECHECK_SECONDS)

    def _enqueue(self, due: dict[str, dict[str, Any]], delay: float) -> None:
        if not due:
            return
        try:
            self.queue.enqueue_many(RECONCILE, list(due.items()), delay=delay)
        except Exception as exc:  # the database is away: keep the events and try again
            log.warning("could not queue %d watched change(s): %s", len(due), exc)
            with self._lock:
                for key, payload in due.items():
                    self._pending.setdefault(key, {}).update(payload)

    def _known_safely(self, payload: dict[str, Any]) -> bool:
        try:
            return self._known(payload)
        except Exception as exc:  # e.g. EACCES from the disk: let the job look
            log.debug("%s: %s", payload, exc)
            return False

    def _known(self, payload: dict[str, Any]) -> bool:
        """Does the disk show what the mount already holds, a removal included? A directory to
        look at deep is compared with its listing (the mount's own mkdir: it was watched up to one
        read later, and what happened in it meanwhile must not be missed); a move or an audit is
        always looked at."""
        if payload.get("from") or payload.get("source") == "audit":
            return False
        backend = next((b for b in self.backends if b.id == payload["backend"]), None)
        if backend is None:
            return False
        rel = bytes.fromhex(payload["path"])
        st = stat_or_none(backend, rel)
        if not payload.get("deep"):
            return self.known(backend, rel, st)
        if st is None or st.kind != "dir":
            return False
        try:
            listing = dict(backend.executor.listdir(rel))
        except (NotFound, OSError):
            return False
        return self.known(backend, rel, st, listing)
