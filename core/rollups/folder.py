"""Folding rollup deltas in the background, and the directory sizes a mount serves from it.

The mount runs one folder thread (every sidecar may run one too: folders share the work);
commands poke it after they commit, it waits a moment so that a burst of commands folds as
one batch, and the new values go straight into the serving view and out to other
processes through the cache's invalidation channel.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import psycopg

from core.journal.pipeline import Pipeline
from core.journal.records import Change
from core.observe import metrics
from core.rollups import counters, totals
from core.storage.db import Database
from core.view.cache import InlineCache, Invalidation, RedisCache

log = logging.getLogger(__name__)

# After a poke: lets a burst of commands land in one fold. This mount serves its own changes
# exact at once (RollupView.apply_local), so the delay only shows to other processes; each
# fold costs the serving process a few round trips and GIL time (measured: 0.05 s made the
# folder ~17 % of the mount's samples during a create burst).
FOLD_DELAY = 0.25
COUNTER_INTERVAL = 1.0  # the counters trail the journal by about this much
FOLD_INTERVAL = 1.0  # without pokes: deltas written by other processes fold this often
RELOAD_SECONDS = 2.0  # a directory's served totals are read again after a local fold at most this often


class Served:
    """A directory's totals as this mount serves them, changed in place by each command."""

    __slots__ = ("size_bytes", "file_count", "dir_count", "state", "last_calculated_at")

    def __init__(self, size_bytes: int, file_count: int, dir_count: int, state: str,
                 last_calculated_at: float | None):
        self.size_bytes, self.file_count, self.dir_count = size_bytes, file_count, dir_count
        self.state, self.last_calculated_at = state, last_calculated_at

    @classmethod
    def of(cls, value: totals.Totals) -> "Served":
        return cls(value.size_bytes, value.file_count, value.dir_count, value.state, value.last_calculated_at)


class RollupView:
    """Directory totals for serving `stat`, exact as this mount has answered.

    A value is loaded as the database has it (the row plus pending deltas, one query for a
    directory and its siblings) plus this mount's deltas answered and not committed yet (the
    in-flight totals); from then on each answered command adds its deltas at once. After a
    group commits, its deltas move from in-flight to the database (`after_commit`), which
    leaves the values as they are. A load and a commit never interleave (the pipeline's commit
    lock), so nothing is counted twice or missed. Values are dropped when a fold (here or in
    another process) announces new ones. So a mount's own changes show at once, and a
    directory's size does not change again when they are committed or folded (tar checks that
    a directory did not change)."""

    def __init__(self, db: Database, cache: InlineCache | RedisCache,
                 parent_of: Callable[[int], tuple[int, bytes] | None], pipeline: Pipeline):
        self.db = db
        self.cache = cache
        self.parent_of = parent_of
        self.pipeline = pipeline
        self._values: dict[int, Served] = {}
        self._in_flight: dict[int, list[int]] = {}  # directory -> [bytes, files, dirs] answered, not committed
        # Directories with deltas of this process not folded yet: the shared cache holds folded
        # values only, which lack them (a fold deletes the keys it changes and clears this).
        self._unfolded: set[int] = set()
        self._reloaded: dict[int, float] = {}  # directory -> when a fold here last dropped it
        cache.subscribe(self.forget)

    def get(self, backend_id: int, dir_id: int) -> Served | None:
        found = self._values.get(dir_id)
        if found is not None:
            return found
        shared = self.cache.get(backend_id, dir_id) if dir_id not in self._unfolded else None
        if shared is not None:
            found = self._values[dir_id] = Served.of(totals.Totals(**shared))
            return found
        found = self._load(dir_id)
        if found is not None and found.state == "exact":  # nothing pending: what every process agrees on
            self.cache.put(backend_id, dir_id, {k: getattr(found, k) for k in Served.__slots__})
        return found

    def _load(self, dir_id: int) -> Served | None:
        # `ls -l` asks for every subdirectory in turn: load the directory's siblings at once.
        try:
            parent = self.parent_of(dir_id)  # may ask the database too (a backend root's, always)
            with self.pipeline.commit_lock, self.db.pool.connection() as conn:
                loaded = totals.children_totals(conn, parent[0]) if parent else {}
                if dir_id not in loaded:
                    loaded.update(totals.totals(conn, [dir_id]))
                loaded = {d: self._with_in_flight(d, v) for d, v in loaded.items()}
        except psycopg.Error as exc:  # the database is away: a plain directory size meanwhile
            log.debug("rollups of %s not loaded: %s", dir_id, exc)
            return None
        for node_id, values in loaded.items():
            self._values.setdefault(node_id, Served.of(values))
        return self._values.get(dir_id)

    def exact(self, dir_id: int) -> totals.Totals:
        """Exact now, read again: the database's totals and this mount's answered deltas."""
        with self.pipeline.commit_lock, self.db.pool.connection() as conn:
            return self._with_in_flight(dir_id, totals.totals(conn, [dir_id])[dir_id])

    def _with_in_flight(self, dir_id: int, value: totals.Totals) -> totals.Totals:
        delta = self._in_flight.get(dir_id)
        if not delta:
            return value
        return replace(value, size_bytes=value.size_bytes + delta[0], file_count=value.file_count + delta[1],
                       dir_count=value.dir_count + delta[2], state="pending")

    # -- this mount's commands ---------------------------------------------------------------
    def answering(self, changes: list[Change]) -> set[int]:
        """A command's deltas, before it is submitted: served at once and in flight until its
        group commits. A moved directory's totals are taken as this view has them (the commit
        computes the same in SQL). Returns the directories changed."""
        touched: set[int] = set()
        for change in changes:
            for node in change.new_nodes:  # a new directory is empty: nothing to load, ever
                if node.is_dir:
                    self._values.setdefault(node.id, Served(0, 0, 0, "exact", time.time()))
            for dir_id, delta in change.rollup.items():
                self._add(dir_id, delta, change.view_moves, record=False)
                touched.add(dir_id)
            for moved_dir, old_chain, new_chain in change.moves:
                moved = self._values.get(moved_dir) or self._load(moved_dir)
                amount = [moved.size_bytes, moved.file_count, moved.dir_count + 1] if moved else [0, 0, 1]
                for dir_id in old_chain:
                    self._add(dir_id, [-v for v in amount], change.view_moves, record=True)
                for dir_id in new_chain:
                    self._add(dir_id, amount, change.view_moves, record=True)
                touched.update(old_chain, new_chain)
        return touched

    def _add(self, dir_id: int, delta, view_moves: dict[int, list[int]], *, record: bool) -> None:
        self._unfolded.add(dir_id)
        acc = self._in_flight.setdefault(dir_id, [0, 0, 0])
        for i in range(3):
            acc[i] += delta[i]
        if record:
            moved = view_moves.setdefault(dir_id, [0, 0, 0])
            for i in range(3):
                moved[i] += delta[i]
        held = self._values.get(dir_id)
        if held is not None:
            held.size_bytes += delta[0]
            held.file_count += delta[1]
            held.dir_count += delta[2]
            held.state = "pending"

    def after_commit(self, batch) -> None:
        """AfterCommit: the group's deltas are in the database now, no longer in flight. (Runs
        under the commit lock, so no load sees them twice.)"""
        for record in batch.records:
            change = record.change
            for source in (change.rollup, change.view_moves):
                for dir_id, delta in source.items():
                    acc = self._in_flight.get(dir_id)
                    if acc is None:
                        continue
                    for i in range(3):
                        acc[i] -= delta[i]
                    if not any(acc):
                        del self._in_flight[dir_id]

    def forget(self, change: Invalidation) -> None:
        """New rollup values somewhere: read them again on next use. A fold in this process
        moves pending deltas into rows and leaves every exact total as it was, except for the
        deltas other processes wrote (the CLI, in inline mode); such directories are read again
        at most every RELOAD_SECONDS, so that folding under a stream of this mount's own
        commands does not make `stat` query the database after every fold."""
        if change.everything:
            self._values.clear()
            self._unfolded = set(self._in_flight)
        now = time.monotonic()
        for dir_id in change.rollups:
            if change.folded and not change.remote:
                if now - self._reloaded.get(dir_id, 0.0) < RELOAD_SECONDS:
                    continue
                self._reloaded[dir_id] = now
                if len(self._reloaded) > 100_000:
                    self._reloaded.clear()
            self._values.pop(dir_id, None)
            if dir_id not in self._in_flight:
                self._unfolded.discard(dir_id)


class RollupFolder:
    """The folding loop: `run(stop)` until the event is set; `poke()` after a commit."""

    def __init__(self, db: Database, cache: InlineCache | RedisCache, queue=None):
        self.db = db
        self.cache = cache
        self.queue = queue  # where directories found without a row are sent for a recount
        self._wake = threading.Event()
        self._counted_at = 0.0

    def poke(self) -> None:
        self._wake.set()

    def after_commit(self, batch) -> None:
        """AfterCommit (core.journal.pipeline): a group that wrote deltas wakes the folder."""
        if batch.replayed or any(r.change.rollup or r.change.moves for r in batch.records):
            self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._wake.wait(FOLD_INTERVAL):
                self._wake.clear()
                stop.wait(FOLD_DELAY)
            try:
                self.fold_now()
            except psycopg.Error as exc:  # the database is away: deltas wait in it, nothing is lost
                log.warning("rollup fold failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
                stop.wait(FOLD_INTERVAL)
        try:
            self.fold_now()  # what this process wrote is folded before it stops
        except psycopg.Error:
            pass

    def fold_now(self) -> int:
        with self.db.pool.connection() as conn:
            changed = totals.fold_all(conn)
            if time.monotonic() - self._counted_at >= COUNTER_INTERVAL:  # the lag and the counters: each second
                pending, lag = totals.oldest_pending_age(conn)
                metrics.ROLLUP_PENDING.set(pending)
                metrics.ROLLUP_LAG.set(lag)
                counters.fold(conn)
                self._counted_at = time.monotonic()
        stale = [dir_id for dir_id, _, created in changed if created]
        if stale and self.queue is not None:
            enqueue_recalculation(self.queue, stale, "no rollup row")
        changed = [(dir_id, backend_id) for dir_id, backend_id, _ in changed]
        if changed:
            metrics.ROLLUP_FOLDED.inc(len(changed))
            self.cache.invalidate({(backend_id, dir_id) for dir_id, backend_id in changed})
        return len(changed)


def start(worker) -> tuple[threading.Thread, threading.Event]:
    """Run a worker's `run(stop)` in a daemon thread; returns the thread and its stop event."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=type(worker).__name__, daemon=True)
    thread.start()
    return thread, stop


def wait_folded(db: Database, timeout: float = 10.0) -> bool:
    """For tools and tests: true once no delta is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.pool.connection() as conn:
            if totals.oldest_pending_age(conn)[0] == 0:
                return True
        time.sleep(0.05)
    return False


class RecalculationJobs:
    """Runs `filestore_rollup_queue` jobs: recount a subtree set-based (totals.recalculate),
    which journals `totals.recalculate` (its completion event) and marks the rows exact.
    Jobs come from `filestore rollups repair --queue` and from folds that met a directory
    without a row (a tree whose rollups were never built). Every sidecar runs one, and an
    inline mount too; the queue's lease runs each job once at a time."""

    IDLE = 0.5

    def __init__(self, db: Database, queue):
        self.db = db
        self.queue = queue

    def run(self, stop: threading.Event) -> None:
        from core.storage.queue import ROLLUP
        while not stop.is_set():
            try:
                jobs = self.queue.claim(ROLLUP, 1)
            except Exception as exc:
                log.warning("cannot claim rollup jobs: %s", exc)
                stop.wait(1.0)
                continue
            if not jobs:
                stop.wait(self.IDLE)
                continue
            job = jobs[0]
            try:
                totals.recalculate(self.db, int(job.payload["node_id"]), reason=job.payload.get("reason", "job"))
            except Exception as exc:  # retried with backoff by the queue, parked after its attempts
                log.warning("rollup recalculation of node %s failed: %s", job.payload.get("node_id"), exc)
                self.queue.fail(job, str(exc))
                continue
            self.queue.finish(job)


def enqueue_recalculation(queue, node_ids, reason: str) -> None:
    from core.storage.queue import ROLLUP
    queue.enqueue_many(ROLLUP, [(f"recalculate:{n}", {"node_id": n, "reason": reason}) for n in node_ids])
