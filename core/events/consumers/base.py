"""A small consumer library: read events, skip what was applied, apply, checkpoint, repeat.

A consumer keeps its checkpoint where its data lives and stores both in one transaction, so
after a crash, a Redis restart or a re-delivery every event is applied exactly once in effect:
an event whose cursor (txid, journal id, index) is not after the checkpoint is a duplicate.

Sources: the Redis stream (resumes at the stream entry after the checkpoint's seq), or, in
inline mode, the journal itself through the relay's own derivation (core.events.outbox).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from core.events import outbox as events
from core.storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    txid: int = 0
    journal_id: int = 0
    index: int = -1
    seq: int | None = None  # the relay's number of the last event applied, when it came through Redis

    @property
    def cursor(self) -> tuple[int, int, int]:
        return self.txid, self.journal_id, self.index

    @classmethod
    def after(cls, event: dict) -> "Checkpoint":
        return cls(int(event["txid"]), event["journal_id"], event["index"], event.get("seq"))


class Source(Protocol):
    def read(self, after: Checkpoint, count: int, wait: float) -> list[dict]: ...
    def close(self) -> None: ...


class JournalSource:
    """Events derived from the committed journal, in the relay's order (inline mode, `events tail`)."""

    def __init__(self, db: Database):
        self.db = db

    def read(self, after: Checkpoint, count: int, wait: float = 0.0, min_journal_id: int | None = None) -> list[dict]:
        # From the checkpoint's own row again (its id - 1 sorts just before it): part of it may be left.
        rows = events.final_rows(self.db, (str(after.txid), max(after.journal_id - 1, 0)), limit=count,
                                 min_journal_id=min_journal_id)
        out = [e for row in rows for e in events.derive(row)]
        if not out and wait:
            threading.Event().wait(wait)
        return out

    def close(self) -> None:
        pass


class RedisStreamSource:
    def __init__(self, url: str, stream: str):
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
        self.stream = stream

    def read(self, after: Checkpoint, count: int, wait: float = 1.0) -> list[dict]:
        start = f"{after.seq}-0" if after.seq else "0-0"
        reply = self.redis.xread({self.stream: start}, count=count, block=int(wait * 1000) or None)
        return [json.loads(fields[b"event"]) for _, entries in reply for _, fields in entries]

    def close(self) -> None:
        self.redis.close()


def source_for(conf, db: Database) -> Source:
    if conf.inline:
        return JournalSource(db)
    return RedisStreamSource(conf.redis_url, conf.stream)


class Applier(Protocol):
    name: str
    def load_checkpoint(self) -> Checkpoint: ...
    def apply(self, batch: list[dict], checkpoint: Checkpoint) -> None: ...  # data + checkpoint, atomically
    def close(self) -> None: ...


def fresh(batch: list[dict], checkpoint: Checkpoint) -> list[dict]:
    """The events of a batch not applied yet (the dedupe), in order."""
    out, last = [], checkpoint.cursor
    for event in batch:
        position = events.cursor(event)
        if position > last:
            out.append(event)
            last = position
    return out


class Consumer:
    """`run(stop)`: the loop the sidecar (or the inline mount) runs for one applier."""

    def __init__(self, applier: Applier, source: Source, batch: int = 500, wait: float = 0.2,
                 backfill: JournalSource | None = None):
        self.applier, self.source, self.batch, self.wait = applier, source, batch, wait
        self.backfill = backfill  # where to re-derive events the stream no longer has
        self.checkpoint = applier.load_checkpoint()
        self.applied = 0

    def step(self) -> int:
        """Read once and apply what is new; the number of events applied."""
        todo = fresh(self.source.read(self.checkpoint, self.batch, self.wait), self.checkpoint)
        if not todo:
            return 0
        if self.checkpoint.seq and todo[0].get("seq") and todo[0]["seq"] > self.checkpoint.seq + 1:
            log.warning("%s: events %d..%d are no longer in the stream (trimmed or lost by Redis)%s",
                        self.applier.name, self.checkpoint.seq + 1, todo[0]["seq"] - 1,
                        ": derived again from the journal" if self.backfill else "")
            if self.backfill is not None:
                todo = self._missing(events.cursor(todo[0])) + todo
        checkpoint = Checkpoint.after(todo[-1])
        self.applier.apply(todo, checkpoint)
        self.checkpoint = checkpoint
        self.applied += len(todo)
        return len(todo)

    def _missing(self, before: tuple[int, int, int]) -> list[dict]:
        """The events between the checkpoint and `before`, derived from the journal."""
        out: list[dict] = []
        at = self.checkpoint
        while True:
            more = [e for e in fresh(self.backfill.read(at, self.batch), at) if events.cursor(e) < before]
            if not more:
                return out
            out += more
            at = Checkpoint.after(more[-1])

    def run(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                self.step()
                failing = False
            except Exception as exc:  # Redis or the database away: wait and read again
                if not failing:
                    log.warning("%s: reading events failed, will retry: %s", self.applier.name, exc)
                failing = True
                stop.wait(1.0)
        self.source.close()
        self.applier.close()
