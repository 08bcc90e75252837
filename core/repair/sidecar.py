"""The sidecar's loops: watchers, the start audit, reconcile workers, and the workers of other
issues (event relay, rollup folder), each a thread with `run(stop: threading.Event)`.

`filestore sidecar` runs them in a process of its own (several may share one PostgreSQL: the
job queue hands each job to one of them). In inline mode the mount runs the same `Loops` as
daemon threads of its serving process (fsmount.mount), with two differences: its open intents
are read from memory, and what a job changes is shown in the mount at once (`on_applied`).

Stopping: `stop()` sets the event; a worker finishes the job in hand, gives back the jobs it
claimed but did not start, and returns; nothing is lost either way, since a job's lease
expires if its worker dies.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from core.journal.pipeline import Pipeline
from core.model import Backend
from core.observe import metrics
from core.repair.reconcile import Applied, Busy, Reconciler, job_key, job_payload
from core.repair.watchers import Watchers
from core.storage.db import Database
from core.storage.queue import RECONCILE, Job, JobQueue
from executors.base import Unavailable

log = logging.getLogger(__name__)

CLAIM_BATCH = 8
IDLE_POLL_MAX = 0.25  # seconds between polls of an empty queue (the latency bound adds this)
BUSY_RETRY = 0.5
UNAVAILABLE_RETRY = 5.0  # a job on a backend that is down is tried again after this
S3_AUDIT_SECONDS = float(os.environ.get("FILESTORE_S3_AUDIT_SECONDS", "60"))  # between list audits  # a path being changed by a mount is looked at again after this


@dataclass
class Context:
    """What every loop needs; other issues' workers are built from it (EXTRA_WORKERS)."""
    db: Database
    settings: Any
    queue: JobQueue
    backends: Callable[[], dict[int, Backend]]
    role: str  # "sidecar" or "mount"
    pipeline: Pipeline  # every journal row goes through it (core.journal.pipeline)
    stats: dict[str, int] = field(default_factory=lambda: {"jobs_done": 0, "jobs_failed": 0, "jobs_busy": 0})


# Factories of further workers, each called with the Context and returning an object with
# run(stop: threading.Event); the sidecar and inline mode start every one of them. (The rollup
# folder and the event relay are started by `serve` for the sidecar, and by the mount's own
# service for inline mode, so they are not listed here.)
EXTRA_WORKERS: list[Callable[[Context], Any]] = []


class Loops:
    def __init__(self, ctx: Context, *, in_flight=None, on_applied: Callable[[Applied], None] | None = None,
                 known=None, workers: int = 2, watch: bool = True, audit: bool = True):
        self.ctx = ctx
        self.reconciler = Reconciler(ctx.db, ctx.backends, ctx.queue, ctx.pipeline, in_flight=in_flight,
                                     on_applied=on_applied, known=known)
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self._watch = watch
        self._audit = audit
        self._leased: set[Job] = set()
        self._leased_lock = threading.Lock()
        self.watchers: Watchers | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._audit:
            self.audit()
        if self._watch:
            watchers = Watchers(self.ctx.queue, list(self.ctx.backends().values()), known=self.reconciler.known)
            try:
                watchers.start()
            except OSError as exc:  # e.g. ENOSPC: more directories than fs.inotify.max_user_watches
                log.error("cannot watch the backends (%s): drift is found by the start audit only", exc)
            else:
                self.watchers = watchers
                self._spawn("watchers", watchers.run)
        for i in range(self._workers):
            self._spawn(f"reconcile-{i}", self._work)
        if self._audit:  # (also with no S3 backend yet: one may be opened later)
            self._spawn("s3-audits", self._audit_s3)
        self._spawn("leases", self._keep_leases)
        for factory in EXTRA_WORKERS:
            worker = factory(self.ctx)
            self._spawn(type(worker).__name__.lower(), worker.run)

    def _spawn(self, name: str, target: Callable[[threading.Event], None]) -> None:
        def guarded() -> None:
            try:
                target(self.stop_event)
            except Exception:
                log.exception("loop %s died", name)
        thread = threading.Thread(target=guarded, name=f"filestore-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def alive(self) -> dict[str, bool]:
        return {t.name: t.is_alive() for t in self._threads}

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def back(self, backend: Backend) -> None:
        """A backend is back after an outage, or was opened late (core.storage.availability):
        its tree is watched afresh, then audited whole for what changed while it was away."""
        if self.watchers is not None:
            self.watchers.rewatch(backend)
        self.ctx.queue.enqueue(RECONCILE, job_key(backend.id, b""),
                               job_payload(backend.id, b"", source="audit", deep=True))

    def audit(self, kinds: tuple[str, ...] = ("local", "s3")) -> None:
        """A full comparison of backends with the database, as jobs: one per directory (an S3
        prefix is listed page by page by its executor)."""
        for backend in self.ctx.backends().values():
            if backend.kind in kinds:
                self.ctx.queue.enqueue(RECONCILE, job_key(backend.id, b""),
                                       job_payload(backend.id, b"", source="audit", deep=True))

    def _audit_s3(self, stop: threading.Event) -> None:
        """S3 has no change notifications: its prefixes are audited on a schedule."""
        while not stop.wait(S3_AUDIT_SECONDS):
            try:
                self.audit(kinds=("s3",))
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("S3 audit not queued: %s", exc)

    # -- reconcile workers -------------------------------------------------------------
    def _work(self, stop: threading.Event) -> None:
        idle = 0.02
        while not stop.is_set():
            try:
                jobs = self.ctx.queue.claim(RECONCILE, CLAIM_BATCH)
            except Exception as exc:
                log.warning("cannot claim jobs: %s", exc)
                stop.wait(1.0)
                continue
            if not jobs:
                stop.wait(idle)
                idle = min(idle * 2, IDLE_POLL_MAX)
                continue
            idle = 0.02
            with self._leased_lock:
                self._leased.update(jobs)
            done: list[Job] = []
            for i, job in enumerate(jobs):
                if stop.is_set():
                    for rest in jobs[i:]:
                        self._settle(rest, lambda j: self.ctx.queue.release(j))
                    break
                if self._run_one(job):
                    done.append(job)
            self._settle_done(done)

    def _settle_done(self, done: list[Job]) -> None:
        with self._leased_lock:
            self._leased.difference_update(done)
        try:
            self.ctx.queue.finish_many(done)
        except Exception as exc:  # their leases expire and they run again: nothing is lost
            log.warning("could not finish %d job(s): %s", len(done), exc)

    def _run_one(self, job: Job) -> bool:
        """Run one job; True if it succeeded (the caller finishes it with its batch)."""
        started = time.perf_counter()
        try:
            self.reconciler.run(job.payload)
        except Busy as exc:
            log.debug("later: %s", exc)
            self.ctx.stats["jobs_busy"] += 1
            metrics.JOBS.labels(job.queue, "busy").inc()
            self._settle(job, lambda j: self.ctx.queue.release(j, delay=BUSY_RETRY))
        except Unavailable as exc:
            # The backend is down, not the path wrong: the job waits without using an attempt
            # (it would be parked as failed after an outage of a few minutes), and the audit
            # queued when the backend is back compares everything anyway.
            log.debug("backend unavailable, later: %s", exc)
            self.ctx.stats["jobs_busy"] += 1
            metrics.JOBS.labels(job.queue, "busy").inc()
            self._settle(job, lambda j: self.ctx.queue.release(j, delay=UNAVAILABLE_RETRY))
        except Exception as exc:
            self.ctx.stats["jobs_failed"] += 1
            log.warning("reconcile job %s failed (attempt %d): %s", job.key, job.attempts, exc)
            parked, reason = [], f"{type(exc).__name__}: {exc}"
            self._settle(job, lambda j: parked.append(self.ctx.queue.fail(j, reason)))
            metrics.JOBS.labels(job.queue, "parked" if any(parked) else "failed").inc()
        else:
            self.ctx.stats["jobs_done"] += 1
            metrics.JOBS.labels(job.queue, "done").inc()
            return True
        finally:
            metrics.JOB_SECONDS.labels(job.queue).observe(time.perf_counter() - started)
        return False

    def _settle(self, job: Job, how: Callable[[Job], Any]) -> None:
        with self._leased_lock:
            self._leased.discard(job)
        try:
            how(job)
        except Exception as exc:  # the lease expires and the job runs again: nothing is lost
            log.warning("could not settle job %s: %s", job.key, exc)

    def _keep_leases(self, stop: threading.Event) -> None:
        while not stop.wait(self.ctx.queue.lease_seconds / 3):
            with self._leased_lock:
                jobs = list(self._leased)
            for job in jobs:
                try:
                    self.ctx.queue.extend(job)
                except Exception as exc:
                    log.warning("could not extend the lease of %s: %s", job.key, exc)


def open_backends(db: Database, *, skip_under: str | None = None,
                  missing: dict[str, str] | None = None, opened: dict[int, Backend] | None = None) -> dict[int, Backend]:
    """Backends with executors, for a process that is not a mount. `skip_under`: a mountpoint
    whose contents a serving process must never touch (it would call itself). Those that cannot
    be opened are named in `missing` (name -> why); those in `opened` are not opened again."""
    from core.storage import backends as backend_registry
    from core.storage import store
    out = {}
    for backend in store.load_backends(db):
        if opened and backend.id in opened:
            continue
        if skip_under and os.path.realpath(backend.root).startswith(os.path.realpath(skip_under) + "/"):
            log.warning("backend %s lies inside the mount %s: not watched", backend.name, skip_under)
            continue
        try:
            backend.executor = backend_registry.make_executor(backend)
        except Exception as exc:
            if missing is not None:
                missing[backend.name] = str(exc)
            log.error("backend %s unavailable: %s", backend.name, exc)
            continue
        if missing is not None:
            missing.pop(backend.name, None)
        out[backend.id] = backend
    return out


class LateBackends:
    """A sidecar's backends (`current`: replaced whole, never changed in place, as other threads
    iterate it), with those it could not open at start tried again by its monitor (an S3
    endpoint or a local root not there yet): each one that opens joins, is watched and audited
    whole (`on_opened`: Loops.back), as in a mount (core.service)."""

    def __init__(self, db: Database):
        self.db = db
        self.missing: dict[str, str] = {}
        self.current: dict[int, Backend] = open_backends(db, missing=self.missing)
        self.on_opened: Callable[[Backend], None] | None = None

    def open(self) -> None:
        try:
            fresh = open_backends(self.db, missing=self.missing, opened=self.current)
        except psycopg.Error as exc:
            log.warning("backends not reloaded: %s", exc)
            return
        if fresh:
            self.current = {**self.current, **fresh}
        for backend in fresh.values():
            log.warning("backend %s opened late: watched and audited now", backend.name)
            if self.on_opened is not None:
                self.on_opened(backend)


def serve(settings, *, http_port: int | None = None, workers: int = 2, ready: Callable[[int | None], None] | None = None) -> None:
    """`filestore sidecar`: run the loops until SIGTERM or SIGINT, then stop cleanly. Blocks."""
    import signal

    from core.observe import health, registry
    from core.repair.inflight import HomeIntents
    from core.service import database_url, open_database
    from core.storage.queue import JobQueue

    db = open_database(settings)
    url = database_url(settings)
    backends = LateBackends(db)
    from core.events import loops as eventloops
    from core.rollups import folder
    from core.storage import availability
    from core.view.cache import Announcements, open_cache
    cache = open_cache(settings.redis_url)
    queue = JobQueue(db)
    rollup_folder = folder.RollupFolder(db, cache, queue)
    # Running mounts drop what they hold of a reconciled change (with a Redis: D23).
    pipeline = Pipeline(db, listeners=[Announcements(cache), rollup_folder], name="sidecar-committer")
    ctx = Context(db, settings, queue, lambda: backends.current, "sidecar", pipeline)
    loops = Loops(ctx, in_flight=HomeIntents(db, settings.home), workers=workers)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    loops.start()
    # The other issues' loops: rollup folding (every sidecar may fold: they split batches) and
    # the event relay with the consumers switched on (one relay publishes at a time).
    backends.on_opened = loops.back
    monitor = availability.BackendMonitor(lambda: list(backends.current.values()), on_back=loops.back,
                                          missing=lambda: backends.missing, on_opened=backends.open)
    for name, worker in [("rollup-folder", rollup_folder),
                         ("rollup-jobs", folder.RecalculationJobs(db, ctx.queue)),
                         ("backend-monitor", monitor),
                         *eventloops.loops_for(ctx)]:
        loops._spawn(name, worker.run)
    server = None
    if http_port is not None:  # after the loops: /health answering means the watchers are on
        server = health.HealthServer(http_port, database_url=url, redis_url=settings.redis_url,
                                     backends=lambda: _all_backends(url, backends.current), alive=loops.alive,
                                     queue_stats=ctx.queue.stats)
    reg = registry.Registration(db, "sidecar", str(settings.home), info=lambda: {
        "backends": sorted(b.name for b in backends.current.values()), "http_port": server.port if server else None,
        "workers": workers, **ctx.stats})
    log.info("sidecar running: %d backend(s), %d worker(s)", len(backends.current), workers)
    if ready is not None:
        ready(server.port if server else None)
    try:
        while not stopping.wait(0.5):
            pass
        log.info("signal received: stopping")
    finally:
        loops.stop()
        pipeline.close()
        cache.close()
        reg.close()
        if server is not None:
            server.close()
        for backend in backends.current.values():
            backend.executor.close()
        db.close()


def _all_backends(url: str, opened: dict[int, Backend]) -> list[Backend]:
    """Every registered backend for /ready, also those that could not be opened at start; the
    ones opened when the database cannot be asked (its own check says why). A connection of its
    own with a short timeout: the pool would wait 30 s for a server that is down."""
    import psycopg
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute("SELECT id, name, kind, root, read_only, root_node_id, options"
                                " FROM filestore.backend_mounts WHERE state = 'active' ORDER BY name").fetchall()
    except psycopg.Error:
        return list(opened.values())
    # the ones opened here are checked with their executors' probes (an S3 endpoint answering)
    return [opened.get(row[0]) or Backend(*row) for row in rows]
