"""The event relay: committed journal rows -> events on Redis (pub/sub channel + capped stream).

One loop, in the sidecar (or in the mount's process in inline mode):

    lead?  (session advisory lock: one active relay per destination, the others stand by)
    -> rows after the (txid, id) cursor whose transactions have all ended (core.events.outbox.final_rows)
    -> events, numbered seq+1.. -> one MULTI/EXEC: XADD <seq>-0 to the stream, PUBLISH each
    -> only then: the position row moves (compare-and-set on seq)

A Redis outage makes `publish` raise and the position stays: the batch is read again later,
so events are delayed, never lost. If Redis accepted a batch but the relay died before moving
the position, the next run re-derives the same events with the same seq and drops those the
stream already holds (its top entry id), so the stream never holds an event twice.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Protocol

import psycopg

from core.config import Settings
from core.events import outbox as events
from core.events.settings import EventSettings
from core.events.settings import load as load_event_settings
from core.observe import metrics
from core.storage.db import Database

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.01
_LOCK_CLASS = 0x52454C59  # "RELY": advisory lock space of relays, keyed by hashtext(position key)


class Publisher(Protocol):
    def publish(self, batch: list[dict]) -> None: ...  # raises when the destination did not take it
    def close(self) -> None: ...


class RedisPublisher:
    def __init__(self, url: str, channel: str, stream: str, maxlen: int):
        import redis  # only needed when REDIS_URL names a server

        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.channel, self.stream, self.maxlen = channel, stream, maxlen

    def _stream_top(self) -> int:
        last = self.redis.xrevrange(self.stream, count=1)
        return int(last[0][0].split(b"-")[0]) if last else 0

    def publish(self, batch: list[dict]) -> None:
        top = self._stream_top()
        fresh = [e for e in batch if e["seq"] > top]  # the rest was accepted before a crash
        if not fresh:
            return
        pipe = self.redis.pipeline(transaction=True)
        for event in fresh:
            data = events.dumps(event)
            pipe.xadd(self.stream, {"event": data}, id=f"{event['seq']}-0", maxlen=self.maxlen,
                      approximate=True)
            pipe.publish(self.channel, data)
        pipe.execute()

    def close(self) -> None:
        self.redis.close()


class InlineBus:
    """REDIS_URL=inline: events stay in this process (a bounded backlog and subscriber queues)."""

    _buses: dict[str, "InlineBus"] = {}
    _guard = threading.Lock()

    def __init__(self, maxlen: int):
        self.backlog: collections.deque[dict] = collections.deque(maxlen=maxlen)
        self._subscribers: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()

    @classmethod
    def for_channel(cls, channel: str, maxlen: int = 1_000) -> "InlineBus":
        with cls._guard:
            return cls._buses.setdefault(channel, cls(maxlen))

    @property
    def idle(self) -> bool:
        """Nobody in this process listens: the relay may move its position without building events."""
        return not self._subscribers

    def subscribe(self) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.SimpleQueue) -> None:
        with self._lock:
            self._subscribers.remove(q)

    def publish(self, batch: list[dict]) -> None:
        with self._lock:
            self.backlog.extend(batch)
            for q in self._subscribers:
                for event in batch:
                    q.put(event)

    def close(self) -> None:
        pass


def publisher_for(conf: EventSettings) -> Publisher:
    if conf.inline:
        return InlineBus.for_channel(conf.channel)
    return RedisPublisher(conf.redis_url, conf.channel, conf.stream, conf.stream_maxlen)


class Relay:
    """`run(stop)` loops until `stop` is set; `run_once()` publishes one batch, returns its size."""

    def __init__(self, settings_or_db: Settings | Database | str, publisher: Publisher | None = None, *,
                 conf: EventSettings | None = None, settings: Settings | None = None):
        from core import config, service

        if isinstance(settings_or_db, Settings):
            settings = settings_or_db
            db = service.open_database(settings)  # starts the embedded server, applies the schema
            self.url = db.url
            db.close()
        else:
            settings = settings or config.load()
            self.url = settings_or_db.url if isinstance(settings_or_db, Database) else settings_or_db
        self.conf = conf or load_event_settings(settings)
        self.publisher = publisher or publisher_for(self.conf)
        self.key = self.conf.position_key
        self._conn: psycopg.Connection | None = None
        self._leading = False
        self._wake = threading.Event()
        self._full_batch = False  # the last batch hit the row limit: more is waiting
        self.published = 0
        self.cpu_seconds = 0.0  # this relay's own CPU time in run(): its cost to a mount it runs in
        self.reads = 0
        self.coalesce_seconds = COALESCE_SECONDS
        self._known: tuple[str, int, int] | None = None  # the position as this leader last wrote it

    # -- leadership and the position --------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            self._leading = False
            self._conn.execute("INSERT INTO filestore.relay_positions (stream) VALUES (%s) ON CONFLICT DO NOTHING",
                               (self.key,))
        return self._conn

    def _lead(self, conn: psycopg.Connection) -> bool:
        """Hold the session lock of this destination: several relays, one publishing at a time.

        A session lock, not a row lock in a transaction: it holds no transaction open (which
        would hold back every snapshot's xmin, and so every relay) while Redis is slow or away.
        """
        if not self._leading:
            self._leading = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                                         (_LOCK_CLASS, self.key)).fetchone()[0]
        return self._leading

    def _position(self, conn: psycopg.Connection) -> tuple[str, int, int]:
        return conn.execute("SELECT last_txid::text, last_journal_id, seq FROM filestore.relay_positions"
                            " WHERE stream = %s", (self.key,)).fetchone()

    # -- the loop ---------------------------------------------------------------------
    def run_once(self) -> int:
        """Publish the next batch of final journal rows; the number of events published."""
        conn = self._connection()
        if not self._lead(conn):
            return 0
        # While leading, the position is only moved by this relay: read it once, not per batch.
        if self._known is None:
            self._known = self._position(conn)
        txid, journal_id, seq = self._known
        self.reads += 1
        if getattr(self.publisher, "idle", False):
            # Inline mode with no subscriber in the process: events would be built to be dropped
            # (measured: ~50 us of the mount's CPU per event). Count them and move on; the
            # numbering stays what it would have been.
            rows = events.final_row_counts(conn, (txid, journal_id), limit=self.conf.batch_rows)
            batch = [None] * sum(row["events"] for row in rows)
        else:
            rows = events.final_rows(conn, (txid, journal_id), limit=self.conf.batch_rows)
            batch = []
            for row in rows:
                for event in events.derive(row):
                    event["seq"] = seq + len(batch) + 1
                    batch.append(event)
        self._full_batch = len(rows) == self.conf.batch_rows
        if not rows:
            return 0
        seq += len(batch)
        started = time.perf_counter()
        if batch[0] is not None:
            self.publisher.publish(batch)  # raises on an outage: the position stays, nothing is lost
        last = rows[-1]
        moved = conn.execute(
            "UPDATE filestore.relay_positions SET last_txid = %s::xid8, last_journal_id = %s, seq = %s,"
            " updated_at = now() WHERE stream = %s AND seq = %s",
            (last["txid"], last["id"], seq, self.key, seq - len(batch))).rowcount
        if moved != 1:  # only if someone moved it without the lock (an operator reset): re-read
            log.warning("relay position of %s moved under us; re-reading it", self.key)
            self._known = None
            return 0
        self._known = (last["txid"], last["id"], seq)
        metrics.RELAY_EVENTS.labels(self.key).inc(len(batch))
        metrics.RELAY_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.RELAY_LAG_SECONDS.set(max(0.0, time.time() - last["completed_at"].timestamp()))
        self.published += len(batch)
        return len(batch)

    def wake(self) -> None:
        """A command committed in this process: look now instead of at the next poll."""
        self._wake.set()

    def after_commit(self, batch) -> None:
        """AfterCommit (core.journal.pipeline): this process's groups wake the relay."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        backoff = self.conf.poll_seconds
        failing = False
        while not stop.is_set():
            cpu = time.thread_time()
            try:
                published = self.run_once()
            except psycopg.Error as exc:
                published = 0
                self._drop_connection()
                failing = self._failed("database", exc, failing)
            except Exception as exc:  # the destination (Redis) refused or is away
                published = 0
                failing = self._failed("publish", exc, failing)
            else:
                if failing:
                    log.info("relay %s publishing again", self.key)
                failing = False
                backoff = self.conf.poll_seconds
            self.cpu_seconds += time.thread_time() - cpu
            if published and self._full_batch:
                continue  # catching up: no sleep
            if self._wake.wait(backoff) and not failing:
                # Woken by a commit in this process: let the commits of the next few ms join the
                # batch, so a burst of commands costs the mount one relay query per COALESCE, not one each.
                stop.wait(self.coalesce_seconds)
            self._wake.clear()
            if failing:
                backoff = min(backoff * 2, 2.0)
        log.info("relay %s stopped: %d events published in %d reads, %.3f s of CPU", self.key, self.published,
                 self.reads, self.cpu_seconds)
        self.close()

    def _failed(self, what: str, exc: Exception, already: bool) -> bool:
        metrics.RELAY_FAILURES.labels(what).inc()
        if not already:
            log.warning("relay %s: %s failed, will retry: %s", self.key, what, str(exc).splitlines()[0] if str(exc) else exc)
        return True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None
        self._leading = False
        self._known = None

    def lag(self) -> dict:
        """Journal rows not yet published and the relay's position (for status and /metrics)."""
        conn = self._connection()
        txid, journal_id, seq = self._position(conn)
        pending = conn.execute("SELECT count(*) FROM filestore.journal_entries WHERE (txid, id) > (%s::xid8, %s)",
                               (txid, journal_id)).fetchone()[0]
        return {"stream": self.key, "last_journal_id": journal_id, "seq": seq, "pending_rows": pending}

    def close(self) -> None:
        self._drop_connection()
        self.publisher.close()


def start_thread(relay: Relay) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="filestore-relay", daemon=True)
    thread.start()
    return thread, stop
