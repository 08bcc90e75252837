"""One backend down, the mount stays up (issue 15): each backend is probed every few seconds.

A backend that does not answer (a local root renamed away, removed or unmounted; an S3 endpoint
gone) has its executor swapped for a `Down` one, which fails every operation at once with
`Unavailable` (EIO to the caller) instead of a timeout after retries, or an operation on a
directory that is not the backend any more: reads and commands on that backend answer EIO while
every other backend keeps serving, and `/ready` names it. When the probe answers again the real
executor is put back (a local root mounted again is reopened by its probe) and an audit of the
backend is queued, so what changed meanwhile is reconciled: it comes back without a remount.
A backend that could not be opened when the process started is retried the same way and joins
the mount once it opens (`on_opened`).

Swapping the executor costs the command path nothing: commands read `backend.executor` when
they run; open files keep the executor (and descriptors) they opened with.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable

from core.model import Backend
from executors.base import Unavailable

log = logging.getLogger(__name__)

PROBE_SECONDS = float(os.environ.get("FILESTORE_BACKEND_PROBE_SECONDS", "2"))
_CAPABILITIES = ("kind", "in_place", "owns_files", "moves_objects_one_by_one", "writes_back", "root")
# What a write-back executor keeps on this machine's disk, not the backend's: the spool of
# uploads not landed yet. It stays readable while the backend is down (an uploader can tell a
# spool file gone from a backend away, and waits instead of dropping the upload).
_LOCAL_SIDE = ("pending_ids", "pending_stat", "open_pending", "drop_pending")


class Down:
    """The executor of a backend that is not there: every operation raises Unavailable (EIO).
    Capabilities are the real executor's, so code that reads them behaves as before."""

    def __init__(self, real, reason: str):
        self.real = real
        self.reason = reason
        for name in _CAPABILITIES:
            if hasattr(real, name):
                setattr(self, name, getattr(real, name))

    def __getattr__(self, name: str):
        attr = getattr(self.real, name)
        if not callable(attr) or name in _LOCAL_SIDE:
            return attr

        def unavailable(*args, **kwargs):
            raise Unavailable(self.reason)
        return unavailable

    def probe(self) -> None:
        self.real.probe()

    def staged(self) -> list[str]:
        return []  # nothing to clean up now; the next start does it

    def syncfs(self) -> None:
        pass  # nothing reachable to sync

    def close(self) -> None:
        self.real.close()


def is_down(backend: Backend) -> str | None:
    """Why the backend is down, or None."""
    executor = backend.executor
    return executor.reason if isinstance(executor, Down) else None


def mark_down(backend: Backend, exc: Unavailable) -> None:
    """Its operations answer EIO from now on (a Down executor), until the monitor finds it back."""
    executor = backend.executor
    if not isinstance(executor, Down):
        backend.executor = Down(executor, str(exc))
        log.error("backend %s is unavailable: %s (its operations answer EIO until it is back)",
                  backend.name, exc, extra={"backend": backend.name})
    elif executor.reason != str(exc):
        executor.reason = str(exc)


def check_local(backend: Backend) -> str | None:
    """A local backend probed now (a stat of its root: /ready asks between two rounds of the
    monitor), marked down if it is: what /ready says is what its operations do. Why it is
    down, or None. Coming back is left to the monitor, which also audits it."""
    executor = backend.executor
    if backend.kind == "local" and executor is not None and not isinstance(executor, Down):
        try:
            executor.probe()
        except Unavailable as exc:
            mark_down(backend, exc)
    return is_down(backend)


class BackendMonitor:
    """The probing loop (`run(stop)`), for a mount: swaps executors as backends go and come."""

    def __init__(self, backends: Callable[[], Iterable[Backend]], *, interval: float = PROBE_SECONDS,
                 on_back: Callable[[Backend], None] | None = None,
                 missing: Callable[[], dict[str, str]] | None = None,
                 on_opened: Callable[[], None] | None = None):
        self.backends = backends
        self.interval = interval
        self.on_back = on_back
        self.missing = missing  # backends that could not be opened at all: name -> why
        self.on_opened = on_opened  # called (once per round) when one of them may open now

    def run(self, stop: threading.Event) -> None:
        while True:
            self.check()
            if stop.wait(self.interval):
                return

    def check(self) -> None:
        for backend in list(self.backends()):
            executor = backend.executor
            if executor is None:
                continue
            try:
                executor.probe()
            except Unavailable as exc:
                mark_down(backend, exc)
                continue
            except Exception as exc:  # a probe must never stop the loop
                log.warning("probing backend %s: %s", backend.name, exc)
                continue
            if isinstance(executor, Down):
                backend.executor = executor.real
                log.warning("backend %s is back", backend.name, extra={"backend": backend.name})
                if self.on_back is not None:
                    self.on_back(backend)
        if self.missing is not None and self.on_opened is not None and self.missing():
            self.on_opened()
