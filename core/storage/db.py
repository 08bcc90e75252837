"""Database access: connections, the transaction helper for non-journal statements, id batches.

Journal rows are written by one statement only (core.journal.records, sent by the commit
pipeline). `Database.transaction` runs the other short statements (an upload's attempt count,
a failed job's state): sent as one query string (one round trip for the whole transaction),
retried on serialization failures and deadlocks by exception class; an optimistic-version
conflict (SQLSTATE FS409) surfaces as `Conflict`.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import ClientCursor
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from core.errors import ConfigError
from core.observe import metrics

log = logging.getLogger(__name__)

Statement = tuple[str, Sequence[Any] | dict[str, Any] | None]

RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
MAX_ATTEMPTS = 5


class Conflict(Exception):
    """An optimistic version check failed: someone else changed the row first."""


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection for admin work; an unreachable server is a one-line ConfigError."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ConfigError(f"cannot connect to PostgreSQL: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


# Every Database still open when the process exits is closed first: a pool left to the
# interpreter's shutdown printed "Exception ignored in: ConnectionPool.__del__" after about one
# admin command in ten (issue 17).
_OPEN: "weakref.WeakSet[Database]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for db in list(_OPEN):
        try:
            db.close()
        except Exception:  # noqa: BLE001 - exiting anyway; one failure must not keep the rest open
            pass


class Database:
    """A connection pool for general work plus one dedicated connection for commands."""

    def __init__(self, url: str, *, pool_size: int = 4):
        self.url = url
        self._pool: ConnectionPool | None = None
        self._pool_size = pool_size
        self._pool_lock = threading.Lock()  # threads asking for the first time make ONE pool
        # Command connections, each used by one thread at a time (the pipeline's committer,
        # uploaders, the reconciler): short transactions with synchronous_commit off.
        self._idle_commands: list[psycopg.Connection] = []
        self._all_commands: list[psycopg.Connection] = []
        self._commands_lock = threading.Lock()
        _OPEN.add(self)

    # -- connections -------------------------------------------------------------------
    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    # check: a connection broken by a server restart is replaced at checkout instead of
                    # failing the first query after the restart (a round trip, on a path that is rare).
                    self._pool = ConnectionPool(
                        self.url, min_size=1, max_size=self._pool_size, open=True,
                        # timeout: how long a reader waits for a connection; while the server is away a
                        # request that needs one fails after this (PoolTimeout), it does not hang the mount.
                        kwargs={"autocommit": True}, timeout=5, check=ConnectionPool.check_connection,
                    )
        return self._pool

    @contextlib.contextmanager
    def command_connection(self) -> Iterator[psycopg.Connection]:
        """A command connection for one transaction; raises psycopg.OperationalError while
        the server is away (and then drops the connection, so the next one reconnects)."""
        with self._commands_lock:
            conn = self._idle_commands.pop() if self._idle_commands else None
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            # Commits stay atomic; a database crash may lose the last fraction of a second of
            # them. fsync on a file waits for the WAL (flush_wal), see docs/architecture.md.
            conn.execute("SET synchronous_commit = off")
            with self._commands_lock:
                self._all_commands = [c for c in self._all_commands if not c.closed] + [conn]
        try:
            yield conn
        except psycopg.OperationalError:
            try:
                conn.close()
            except psycopg.Error:
                pass
            raise
        finally:
            if not conn.closed:
                with self._commands_lock:
                    self._idle_commands.append(conn)

    def close(self) -> None:
        with self._commands_lock:
            for conn in self._all_commands:
                conn.close()
            self._all_commands, self._idle_commands = [], []
        if self._pool is not None:
            self._pool.close()

    # -- queries -----------------------------------------------------------------------
    def query(self, sql: str, params: Any = None) -> list[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(sql, params).fetchall()

    def query_dicts(self, sql: str, params: Any = None) -> list[dict]:
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(sql, params).fetchall()

    # -- the transaction helper --------------------------------------------------------
    def transaction(self, statements: Sequence[Statement] | Callable[[], Sequence[Statement]],
                    *, label: str = "command") -> list[list[tuple]]:
        """Run statements atomically on the command connection and return each one's rows.

        `statements` may be a callable, re-evaluated on every attempt. Retries on
        serialization failures and deadlocks; raises Conflict on an optimistic-version
        conflict and lets every other database error through.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            steps = statements() if callable(statements) else statements
            started = time.perf_counter()
            try:
                with self.command_connection() as conn:
                    return _run_as_one_query(conn, steps)
            except RETRYABLE:
                metrics.TXN_RESTARTS.labels(label).inc()
                if attempt == MAX_ATTEMPTS:
                    raise
                time.sleep(0.002 * 2 ** attempt)
            except psycopg.OperationalError:
                # The server went away (restart, outage): reconnect and retry a few times.
                # A retry of a command that did commit fails on its unique request id, and
                # is then treated like an outage: recovery finds the row and changes nothing.
                if attempt == MAX_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)
            except psycopg.errors.DatabaseError as exc:
                if getattr(exc, "sqlstate", None) == "FS409":
                    raise Conflict(_first_line(exc)) from exc
                raise
            finally:
                metrics.TXN_SECONDS.labels(label).observe(time.perf_counter() - started)
        raise AssertionError("unreachable")

    def flush_wal(self) -> None:
        """Wait until every commit made so far is durable (the fsync rule)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self.command_connection() as conn, conn.transaction():
                    conn.execute("SET LOCAL synchronous_commit = on")
                    # An xid forces a commit record, whose synchronous flush covers all earlier WAL.
                    conn.execute("SELECT pg_current_xact_id()")
                return
            except psycopg.OperationalError:
                if attempt == MAX_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)


def _run_as_one_query(conn: psycopg.Connection, steps: Sequence[Statement]) -> list[list[tuple]]:
    """All statements in one simple-protocol query: one round trip, one implicit transaction.

    PostgreSQL runs a multi-statement query string atomically (an error anywhere rolls back
    all of it), so no BEGIN/COMMIT is sent. Measured here: ~200 us per command transaction,
    against ~450 us for the same statements in pipeline mode.
    """
    if len(steps) == 1:  # the common case: one statement, prepared
        sql, params = steps[0]
        cur = conn.execute(sql, params)
        return [_rows(cur)]
    cur = ClientCursor(conn)
    cur.execute(";\n".join(cur.mogrify(sql, params) for sql, params in steps))
    results: list[list[tuple]] = []
    while True:
        results.append(_rows(cur))
        if not cur.nextset():
            return results


def _rows(cur: psycopg.Cursor) -> list[tuple]:
    """The current result's rows, [] for a statement that returns none. (Not `cur.description`:
    psycopg builds its Column objects at every access, measured 12 % of an unlink's time.)"""
    result = cur.pgresult
    return cur.fetchall() if result is not None and result.nfields else []


class IdPool:
    """Ids taken from a database sequence in batches: node ids (inode numbers) or entry ids.

    A command takes its ids when it is answered, before anything is committed, so the pool
    refills itself in the background when it runs low: creates go on for a batch's worth while
    the database is away (the pipeline's backlog bound comes first)."""

    def __init__(self, db: Database, sequence: str = "filestore.node_ids", batch: int = 1024):
        self._db = db
        self._sequence = sequence
        self._batch = batch
        self._ids: list[int] = []
        self._lock = threading.Lock()
        self._refilling = False

    def take(self) -> int:
        with self._lock:
            if not self._ids:
                self._ids = self._fetch()
            if len(self._ids) < self._batch // 4 and not self._refilling:
                self._refilling = True
                threading.Thread(target=self._refill, name="id-refill", daemon=True).start()
            return self._ids.pop()

    def _fetch(self) -> list[int]:
        rows = self._db.query("SELECT nextval(%s) FROM generate_series(1, %s)", (self._sequence, self._batch))
        return [r[0] for r in reversed(rows)]

    def _refill(self) -> None:
        try:
            more = self._fetch()
        except psycopg.Error as exc:
            log.debug("id refill failed (retried at the next take): %s", exc)
            more = []
        with self._lock:
            self._ids = more + self._ids  # popped from the end: the ones already held go first
            self._refilling = False
