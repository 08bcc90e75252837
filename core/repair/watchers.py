"""Watchers: watchdog observers on local backend roots, turning file system events into jobs.

An event is not drift yet: it only says "look at this path". It becomes a reconcile job,
coalesced per path, that runs after a short debounce and decides by comparing the disk with
the committed node (core.repair.reconcile), which is what keeps the mount's own writes from ever
being reported. Events are collected for FLUSH_SECONDS and written as one statement, so a
burst of writes costs one INSERT, not one per event. The executor's staging area is ignored:
a staged file is the mount's work in progress; its landing rename shows up as a creation.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from core.journal.recovery import stat_or_none
from core.model import Backend
from core.observe import metrics
from core.repair.reconcile import job_key, job_payload
from core.storage.queue import RECONCILE, JobQueue
from executors.base import Stat
from executors.local import STAGING_NAME

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1
DEBOUNCE_SECONDS = 0.3
_IGNORED = {"opened", "closed_no_write", "closed"}
# Asked of inotify itself, so that opens and closes (every read through the mount makes two)
# never reach Python: a change is always also a create, modify, attrib, move or delete.
_WANTED = [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileAttribEvent,
           DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent, DirAttribEvent]


class _Backlog(FileSystemEventHandler):
    """Turns one backend's events into (key, payload) pairs waiting for the next flush."""

    def __init__(self, backend: Backend, sink: "Watchers"):
        self.backend = backend
        self.root = os.fsencode(backend.root).rstrip(b"/")
        self.sink = sink

    def _rel(self, path: str | bytes) -> bytes | None:
        raw = os.fsencode(path)
        if raw == self.root:
            return b""
        if not raw.startswith(self.root + b"/"):
            return None
        rel = raw[len(self.root) + 1:]
        if STAGING_NAME in rel.split(b"/"):  # ours, or that of a backend nested in this one
            return None
        return rel

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED:
            return
        metrics.WATCH_EVENTS.labels(self.backend.name).inc()
        src = self._rel(event.src_path)
        extra: dict[str, Any] = {"source": "watcher"}
        if event.is_directory and event.event_type in ("created", "moved"):
            extra["deep"] = True  # its contents arrived with it
        if event.event_type == "moved":
            dest = self._rel(event.dest_path)
            if dest is None:  # moved into the staging area or out of the tree: gone from src
                if src is not None:
                    self.sink.add(self.backend.id, src, extra)
                return
            if src is not None:
                extra["from"] = src.hex()
            self.sink.add(self.backend.id, dest, extra)
            return
        if src is not None:
            self.sink.add(self.backend.id, src, extra)


class Watchers:
    """One observer for every local backend, feeding filestore_reconcile_queue."""

    def __init__(self, queue: JobQueue, backends: list[Backend],
                 known: Callable[[Backend, bytes, Stat], bool] | None = None):
        self.queue = queue
        self.backends = [b for b in backends if b.kind == "local"]
        # Inline: the mount's own view of a path. Most events a mount's watcher sees are its
        # own writes, already committed and in its namespace by the time of the flush: those
        # are dropped here instead of costing a queued job each (claimed, looked at, finished).
        self.known = known
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._observer = Observer()

    def add(self, backend_id: int, rel: bytes, extra: dict[str, Any]) -> None:
        key = job_key(backend_id, rel)
        with self._lock:
            payload = self._pending.setdefault(key, job_payload(backend_id, rel))
            payload.update(extra)

    def start(self) -> None:
        """Watch from now on (synchronous: events after this call are seen)."""
        for backend in self.backends:
            self._observer.schedule(_Backlog(backend, self), backend.root, recursive=True, event_filter=_WANTED)
        self._observer.start()
        log.info("watching %d local backend(s)", len(self.backends))

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(FLUSH_SECONDS):
                self.flush()
        finally:
            self._observer.stop()
            self._observer.join(10)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if self.known is not None:
            pending = {key: payload for key, payload in pending.items() if not self._known(payload)}
        if not pending:
            return
        try:
            self.queue.enqueue_many(RECONCILE, list(pending.items()), delay=DEBOUNCE_SECONDS)
        except Exception as exc:  # the database is away: keep the events and try again
            log.warning("could not queue %d watched change(s): %s", len(pending), exc)
            with self._lock:
                for key, payload in pending.items():
                    self._pending.setdefault(key, {}).update(payload)

    def _known(self, payload: dict[str, Any]) -> bool:
        """Does the disk show what the mount already holds, a removal included? (A move or a
        directory arriving with content is always looked at.)"""
        if payload.get("deep") or payload.get("from"):
            return False
        backend = next((b for b in self.backends if b.id == payload["backend"]), None)
        if backend is None:
            return False
        rel = bytes.fromhex(payload["path"])
        return self.known(backend, rel, stat_or_none(backend, rel))
