"""The commit pipeline: every journal row is recorded here, in order, by group commit.

docs/design.md section 4 (docs/architecture.md D36). A mount's command is answered once it is
carried out on the backend and appended to the intent log as a complete, replayable record;
`submit` queues it, and one committer thread records everything queued since its last commit,
in order, in ONE statement (`records.statement`, one transaction). Then, and only then, the
after-commit effects run, each behind one typed interface (`AfterCommit`): cache
announcements, the event relay's wake-up, the rollup folder's poke, write-back uploads, the
rollup view's in-flight totals. Every journal writer goes through here: the mount's commands
and refusals, crash replays and recovery, the reconciler, write-back landings, overlap
mirrors; the few set-based transactions (a rollup recalculation, an import) send the same
statement on their own connection and hand their records to `after_own_commit`.

Bounds, all settings: a group waits at most FILESTORE_COMMIT_DELAY_MS for company; the
backlog holds at most FILESTORE_COMMIT_BACKLOG commands and FILESTORE_COMMIT_BACKLOG_SECONDS
of age, past which `room()` is false and callers wait (`wait_for_room`, then EIO after
FILESTORE_COMMIT_WAIT_SECONDS). While PostgreSQL is away the committer retries with backoff,
answered commands stay queued in order, and they commit when it is back.

A group that fails as a whole (a conflict with another mount, a constraint) is committed
again entry by entry; an entry that fails alone is resolved by the `Adopter`: its journal rows
are kept (principal, request id) and the backend's state is adopted for its paths, journaled.
Nothing is dropped.

Waiting: `wait(ticket)` until a submitted entry committed (the reconciler, write-back landings);
`sync()` until everything submitted so far is committed with the WAL flushed (fsync, O_SYNC,
fsyncdir, unmount). Both may be called from any thread but the committer's.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import errors as pg_errors

from core.errors import FsError
from core.journal.records import Record, statement
from core.observe import metrics
from core.storage.db import RETRYABLE, Database, _first_line

log = logging.getLogger(__name__)

ATIME_SECONDS = 1.0  # relatime updates of reads wait this long for a group to ride with

# An adoption refused in its turn (the other mount changed those nodes again meanwhile) is
# built again from the database this many times before the loser is journaled alone.
ADOPT_ATTEMPTS = 4


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


@dataclass
class Settings:
    delay: float = 0.002  # seconds a group waits for company after its first entry
    max_group: int = 500  # entries in one statement
    backlog: int = 20_000  # entries queued before callers wait
    backlog_seconds: float = 30.0  # age of the oldest queued entry before callers wait
    wait_seconds: float = 60.0  # how long a caller waits for room before EIO
    sync_commits: bool = False  # every group waits for its WAL flush (else only sync() does)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(delay=_setting("FILESTORE_COMMIT_DELAY_MS", 2.0) / 1000,
                   backlog=int(_setting("FILESTORE_COMMIT_BACKLOG", 20_000)),
                   backlog_seconds=_setting("FILESTORE_COMMIT_BACKLOG_SECONDS", 30.0),
                   wait_seconds=_setting("FILESTORE_COMMIT_WAIT_SECONDS", 60.0),
                   sync_commits=os.environ.get("FILESTORE_COMMIT_SYNC", "off").lower() in ("on", "1", "yes", "true"))


@dataclass(eq=False)
class Entry:
    """Records that commit together (a new file's create and its first write), in order."""
    records: list[Record]
    payloads: list[str]
    backend_id: int | None = None  # for adoption: the backend and paths the command changed
    paths: tuple[bytes, ...] = ()
    logged: bool = False  # its payloads are in the intent log (replayed after a crash)
    seq: int = 0
    queued_at: float = 0.0
    finished: bool = False  # committed, or resolved without its records (waiters look at it)
    error: BaseException | None = None  # set when a waited entry could not be recorded
    replayed: bool = False  # from the intent log at start: its records are not parsed
    _touched: set[int] | None = None

    @property
    def request_ids(self) -> list[uuid.UUID]:
        return [r.request_id for r in self.records]

    def touched(self) -> set[int]:
        """Nodes and directories its records change (computed once: at submit and at commit)."""
        if self._touched is None:
            out: set[int] = set()
            if not self.replayed:
                for r in self.records:
                    out |= r.change.nodes_touched() | r.change.dirs_touched()
            self._touched = out
        return self._touched


@dataclass
class Batch:
    """What one commit recorded, handed to every AfterCommit listener."""
    entries: list[Entry]
    sync: bool = False

    @property
    def records(self) -> Iterable[Record]:
        for entry in self.entries:
            yield from entry.records

    @property
    def replayed(self) -> bool:
        return any(e.replayed for e in self.entries)

    def touched(self) -> tuple[set[int], set[int], set[tuple[int, bytes]]]:
        """Nodes, directories and names (directory, name) removed or added that the group changed."""
        nodes: set[int] = set()
        dirs: set[int] = set()
        names: set[tuple[int, bytes]] = set()
        for entry in self.entries:
            if entry.replayed:  # only its payloads are known
                for payload in entry.payloads:
                    _touched_by(json.loads(payload), nodes, dirs, names)
                continue
            for record in entry.records:
                change = record.change
                nodes |= change.nodes_touched()
                dirs |= change.dirs_touched()
                names |= change.names_changed()
        return nodes, dirs, names

    def removed(self) -> set[tuple[int, bytes, int]]:
        """Names the group removed, with the node each named: (directory, name, node)."""
        out: set[tuple[int, bytes, int]] = set()
        for entry in self.entries:
            if entry.replayed:
                for payload in entry.payloads:
                    out.update((u["parent_id"], bytes.fromhex(u["name"]), u["node_id"])
                               for u in json.loads(payload).get("ul", ()))
                continue
            for record in entry.records:
                out.update(record.change.unlinks)
        return out


def _touched_by(payload: dict, nodes: set, dirs: set, names: set) -> None:
    nodes.update(n["id"] for n in payload.get("n", ()))
    nodes.update(u["node"]["id"] for u in payload.get("u", ()))
    dirs.update(link["parent_id"] for link in payload.get("l", ()))
    dirs.update(t["id"] for t in payload.get("t", ()))
    for entry in (*payload.get("ul", ()), *payload.get("l", ())):
        dirs.add(entry["parent_id"])
        names.add((entry["parent_id"], bytes.fromhex(entry["name"])))


class AfterCommit(Protocol):
    """An effect of committed records: runs on the committer thread, must be quick and must
    never wait for the serving thread (post work to it instead)."""

    def after_commit(self, batch: Batch) -> None: ...


class BeforeCommit(Protocol):
    """Run by the committer before it sends a group: what the group's records refer to outside
    the database is made durable first (write-back's spool files, D48)."""

    def before_commit(self, group: list["Entry"]) -> None: ...


class Adopter(Protocol):
    """Resolves an entry that cannot be recorded as it is (a conflict, a constraint): the
    records to commit in its place, keeping its journal rows and adopting the backend's state."""

    def adopt(self, entry: Entry, error: BaseException) -> list[Record]: ...

    def journal_only(self, entry: Entry, error: BaseException, **result) -> list[Record]:
        """The entry's journal rows alone, with why they were refused (the adoption failing too)."""

    def compare_later(self, entry: Entry) -> None:
        """Have the entry's paths compared with the disk later (the reconciler)."""


class IntentSink(Protocol):
    def answered(self, request_ids: Sequence[uuid.UUID], payloads: Sequence[str]) -> None: ...

    def resolved(self, request_ids: Iterable[uuid.UUID]) -> None: ...


class Pipeline:
    def __init__(self, db: Database, *, intents: IntentSink | None = None, settings: Settings | None = None,
                 listeners: Sequence[AfterCommit] = (), adopter: Adopter | None = None, name: str = "committer"):
        self.db = db
        self.intents = intents
        self.settings = settings or Settings.from_env()
        self.listeners: list[AfterCommit] = list(listeners)
        self.before: list[BeforeCommit] = []
        self.adopter = adopter
        # Held by the committer from sending a group until its listeners ran: a reader that
        # must see the database and the in-flight changes as one (core.rollups.folder.RollupView)
        # takes it too.
        self.commit_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: collections.deque[Entry] = collections.deque()
        self._atimes: dict[int, int] = {}
        self._atimes_since = 0.0
        self._next_seq = 1
        self._committed_seq = 0
        self._durable_seq = 0
        self._sync_wanted = 0
        self._holding: collections.Counter[int] = collections.Counter()
        self._stopping = False
        self._give_up_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # == submitting =======================================================================
    def submit(self, records: list[Record], *, backend_id: int | None = None, paths: tuple[bytes, ...] = (),
               log_intent: bool = True) -> Entry:
        """Queue records to commit together, after everything submitted before. With
        `log_intent`, their payloads go to the intent log first (a crash replays them)."""
        payloads = [r.payload() for r in records]
        entry = Entry(records, payloads, backend_id, paths, logged=log_intent and self.intents is not None)
        if entry.logged:
            self.intents.answered(entry.request_ids, payloads)
        self._enqueue(entry)
        return entry

    def replay(self, request_ids: list[uuid.UUID], payloads: list[str], backend_id: int | None,
               paths: tuple[bytes, ...]) -> Entry:
        """A command answered before a crash and never committed: recorded now as itself."""
        from core.journal.records import Journal  # a placeholder journal for request ids only
        from core.model import Principal
        records = [Record(Journal("replay", "committed", Principal.system("replay"), rid, backend_id, None,
                                  None, {})) for rid in request_ids]
        entry = Entry(records, payloads, backend_id, paths, logged=True, replayed=True)
        self._enqueue(entry)
        return entry

    def _enqueue(self, entry: Entry) -> None:
        touched = entry.touched()
        with self._cond:
            entry.seq = self._next_seq
            self._next_seq += 1
            entry.queued_at = time.monotonic()
            self._queue.append(entry)
            self._holding.update(touched)
            self._cond.notify()

    def record_atime(self, node_id: int, atime_ns: int) -> None:
        """A read's relatime update: no command, no journal row; sent with the next group, or
        within ATIME_SECONDS when no command comes (a reader alone wakes nobody)."""
        with self._cond:
            if not self._atimes:
                self._atimes_since = time.monotonic()
            if atime_ns > self._atimes.get(node_id, 0):
                self._atimes[node_id] = atime_ns

    # == back-pressure ===================================================================
    def room(self) -> bool:
        """Is the backlog under its bounds? (Read without the lock: a stale answer only makes
        one caller wait a moment, or pass a moment early.)"""
        queue = self._queue
        try:
            oldest = queue[0].queued_at if queue else None
        except IndexError:  # emptied meanwhile by the committer
            return True
        return oldest is None or (len(queue) < self.settings.backlog and
                                  time.monotonic() - oldest < self.settings.backlog_seconds)

    def wait_for_room(self, timeout: float | None = None) -> None:
        """Block until the backlog is under its bounds; EIO after FILESTORE_COMMIT_WAIT_SECONDS."""
        if self.room():
            return
        deadline = time.monotonic() + (self.settings.wait_seconds if timeout is None else timeout)
        metrics.COMMIT_WAITS.inc()
        with self._cond:
            while not self.room():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FsError(5, f"the journal backlog is full ({len(self._queue)} commands, oldest "
                                     f"{time.monotonic() - self._queue[0].queued_at:.0f} s): is PostgreSQL away?")
                self._cond.wait(min(left, 0.5))

    def holds(self, node_id: int) -> bool:
        """Does an answered command not committed yet touch this node or directory? (Such a
        node must not be dropped from a view and reloaded: the database does not have it yet.)"""
        return self._holding.get(node_id, 0) > 0

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def in_flight_key(self, key: str) -> Record | None:
        """An answered command with this idempotency key that is not committed yet."""
        with self._cond:
            for entry in self._queue:
                for record in entry.records:
                    if record.journal.idempotency_key == key:
                        return record
        return None

    # == waiting ==========================================================================
    def wait(self, entry: Entry, timeout: float | None = None) -> None:
        """Until the entry is committed (or resolved); raises what kept it from the journal."""
        with self._cond:
            if not self._cond.wait_for(lambda: entry.finished, timeout):
                raise TimeoutError("commit still pending")
        if entry.error is not None:
            raise entry.error

    def sync(self, timeout: float | None = None) -> None:
        """Until everything submitted so far is committed and its WAL flushed (durable)."""
        with self._cond:
            target = self._next_seq - 1
            if target <= self._durable_seq:
                return
            self._sync_wanted = max(self._sync_wanted, target)
            self._cond.notify_all()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._durable_seq < target:
                if not self._thread.is_alive():
                    raise FsError(5, "the journal could not be committed (PostgreSQL away)")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("journal not durable yet")
                self._cond.wait(1.0 if left is None else min(left, 1.0))

    def after_own_commit(self, records: list[Record]) -> None:
        """Records committed by a transaction of their own (a recalculation, an import): the
        same after-commit effects as a group's."""
        entry = Entry(records, [], replayed=False, finished=True)
        self._notify(Batch([entry]))

    # == stopping =========================================================================
    def close(self, timeout: float = 60.0) -> int:
        """Commit what is queued (durably), then stop. With PostgreSQL away past `timeout`, stop
        anyway: the entries stay in the intent log and the next start commits them. Returns how
        many were left."""
        with self._cond:
            self._stopping = True
            self._give_up_at = time.monotonic() + timeout
            self._sync_wanted = max(self._sync_wanted, self._next_seq - 1)
            self._cond.notify_all()
        self._thread.join(timeout + 5)
        left = len(self._queue)
        if left:
            log.warning("stopping with %d commands not committed (PostgreSQL away): the next start commits them",
                        left)
        return left

    # == the committer ====================================================================
    def _loop(self) -> None:
        while True:
            try:
                if not self._commit_next():
                    return
            except Exception:  # a bug must not stop the journal: log it and go on
                log.exception("the committer failed; retrying")
                time.sleep(1.0)

    def _commit_next(self) -> bool:
        """Commit the next group; False once stopped."""
        with self._cond:
            while not self._queue and self._sync_wanted <= self._durable_seq and not self._stopping:
                if self._atimes:
                    left = self._atimes_since + ATIME_SECONDS - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait(ATIME_SECONDS)
            if self._stopping and not self._queue and not self._atimes and self._sync_wanted <= self._durable_seq:
                return False
            urgent = self._sync_wanted > self._durable_seq or self._stopping
        if not urgent and self.settings.delay and len(self._queue) < self.settings.max_group:
            time.sleep(self.settings.delay)  # a burst joins the group
        with self._cond:
            group = [self._queue[i] for i in range(min(len(self._queue), self.settings.max_group))]
            atimes, self._atimes = list(self._atimes.items()), {}
            last = group[-1].seq if group else self._committed_seq
            sync = self.settings.sync_commits or self._sync_wanted > self._durable_seq
        if not self._commit(group, atimes, sync):
            return False  # stopping with PostgreSQL away: what is left stays in the intent log
        with self._cond:
            for entry in group:
                self._queue.popleft()
                self._holding.subtract(entry.touched())
            self._holding = +self._holding  # drop the zero counts
            self._committed_seq = last
            if sync:
                self._durable_seq = last
            metrics.COMMIT_BACKLOG.set(len(self._queue))
            self._cond.notify_all()
        return True

    def _commit(self, group: list[Entry], atimes: list[tuple[int, int]], sync: bool) -> bool:
        """Record a group (durably with `sync`); False if stopping with the database away."""
        started = time.perf_counter()
        for hook in self.before:
            hook.before_commit(group)  # raising: the group stays queued, tried again (_loop)
        attempt = 0
        pending = group
        while True:
            try:
                with self.commit_lock:
                    self._send([p for e in pending for p in e.payloads], atimes, sync)
                    self._finished(pending, sync)
                break
            except psycopg.Error as exc:
                error, kind = exc, failure(exc)
            if kind == "retry":
                metrics.TXN_RESTARTS.labels("group").inc()
                time.sleep(0.002)
            elif kind == "outage":
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("journal commit of %d commands waits for PostgreSQL: %s", len(pending),
                                _first_line(error))
                if self._stopping and self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    return False
                time.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)))
                pending = self._not_yet_recorded(pending)
            else:
                # One entry spoils the group: record them one by one, resolving what fails.
                log.info("group of %d commands refused (%s): recorded one by one", len(pending), _first_line(error))
                with self.commit_lock:
                    if atimes:
                        self._best_effort_atimes(atimes)
                        atimes = []
                    for entry in pending:
                        if not entry.finished:
                            self._commit_alone(entry)
                    if sync:
                        self._send([], [], True)  # the WAL flush the group would have waited for
                break
        metrics.COMMIT_GROUP_SIZE.observe(len(group))
        metrics.TXN_SECONDS.labels("group").observe(time.perf_counter() - started)
        return True

    def _send(self, payloads: list[str], atimes: list[tuple[int, int]], sync: bool) -> list[tuple]:
        with self.db.command_connection() as conn:
            return conn.execute(*statement(payloads, atimes, sync=sync)).fetchall()

    def _finished(self, group: list[Entry], sync: bool) -> None:
        """Under the commit lock, once the group is in the database: intents, listeners, waiters."""
        if self.intents is not None:
            self.intents.resolved(rid for e in group if e.logged for rid in e.request_ids)
        now = time.monotonic()
        for entry in group:
            metrics.COMMIT_DELAY.observe(now - entry.queued_at)
        if group:
            self._notify(Batch(group, sync))
        for entry in group:
            entry.finished = True
        if any(not e.logged for e in group):  # someone may wait for it (core code waits on logged ones never)
            with self._cond:
                self._cond.notify_all()

    def _notify(self, batch: Batch) -> None:
        for listener in self.listeners:
            try:
                listener.after_commit(batch)
            except Exception:  # one effect's failure must not stop the others, nor the journal
                log.exception("after-commit effect %s failed", type(listener).__name__)

    def _commit_alone(self, entry: Entry) -> None:
        try:
            self._send(entry.payloads, [], False)
            self._finished([entry], False)
            return
        except psycopg.Error as exc:
            if failure(exc) != "refused":
                raise  # the outer loop waits for the database, then retries the group
            if _already_recorded(exc):
                self._finished([entry], False)
                return
            error = exc
        if self.adopter is None or not entry.logged:
            # A waited entry (reconciler, write-back landing) is given back to its caller.
            entry.error = error
            log.info("commit of %s refused: %s", [r.journal.command for r in entry.records], _first_line(error))
            self._finished_without(entry)
            return
        replacement = None
        for _ in range(ADOPT_ATTEMPTS):
            try:
                replacement = self.adopter.adopt(entry, error)
                self._send([r.payload() for r in replacement], [], False)
                break
            except psycopg.Error as exc:
                if failure(exc) != "refused":
                    raise
                # The adoption lost a race too (another mount changed those nodes again since
                # it read them): read the database again and adopt anew.
                replacement, why = None, exc
            except Exception as exc:  # noqa: BLE001 - never drop an answered command
                replacement, why = None, exc
                break
        if replacement is None:
            # Never drop an answered command: its journal rows alone, and its paths compared
            # by the reconciler (which adopts the disk once the names hold still).
            log.warning("could not adopt %s after %s (%s): journaled alone, its paths queued for a comparison",
                        entry.request_ids, _first_line(error), _first_line(why))
            try:
                replacement = self.adopter.journal_only(entry, error, reconcile=_first_line(why))
                self._send([r.payload() for r in replacement], [], False)
                self.adopter.compare_later(entry)
            except psycopg.Error as exc:
                if failure(exc) != "refused":
                    raise
                log.error("could not journal %s after %s: %s", entry.request_ids, _first_line(error), exc)
                self._finished_without(entry)
                return
        log.warning("%s conflicted (%s); the backend's state was adopted and journaled",
                    [r.journal.command for r in entry.records], _first_line(error))
        adopted = Entry(replacement, [], entry.backend_id, entry.paths, logged=entry.logged, seq=entry.seq,
                        queued_at=entry.queued_at)
        self._finished([adopted], False)
        self._finished_without(entry)  # its intents were resolved by the replacement's commit

    def _finished_without(self, entry: Entry) -> None:
        if self.intents is not None and entry.logged:
            self.intents.resolved(entry.request_ids)
        entry.finished = True
        with self._cond:
            self._cond.notify_all()

    def _best_effort_atimes(self, atimes: list[tuple[int, int]]) -> None:
        try:
            self._send([], atimes, False)
        except psycopg.Error as exc:
            if failure(exc) != "refused":
                raise
            log.warning("atime updates dropped: %s", _first_line(exc))

    def _not_yet_recorded(self, group: list[Entry]) -> list[Entry]:
        """After a lost connection the group may have committed: entries whose journal rows
        exist are finished (exactly once), the rest go again."""
        ids = [rid for e in group for rid in e.request_ids]
        try:  # a command connection: fails fast while the server is away (the pool would wait)
            with self.db.command_connection() as conn:
                found = {row[0] for row in conn.execute(
                    "SELECT request_id FROM filestore.journal_entries WHERE request_id = ANY(%s)", (ids,))}
        except psycopg.Error:
            return group
        done = [e for e in group if e.request_ids and all(rid in found for rid in e.request_ids)]
        if done:
            with self.commit_lock:
                self._finished(done, False)
        return [e for e in group if e not in done]


def failure(exc: psycopg.Error) -> str:
    """What a failed commit means, by exception class and SQLSTATE (never by message text):
    "retry" (a serialization failure or deadlock), "refused" (the commands themselves: a
    version conflict FS409, a constraint), or "outage" (the server or the connection is away)."""
    if getattr(exc, "sqlstate", None) == "FS409":  # raised by filestore.record_one
        return "refused"
    if isinstance(exc, RETRYABLE):
        return "retry"
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) or getattr(exc, "sqlstate", None) is None:
        return "outage"
    return "refused"


def _already_recorded(exc: BaseException) -> bool:
    """A unique violation on the journal's request id: this entry committed before (a retry
    after a connection lost at commit)."""
    return isinstance(exc, pg_errors.UniqueViolation) and \
        "journal_entries_request_id" in (getattr(exc.diag, "constraint_name", "") or "")
