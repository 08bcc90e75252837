"""Shared cache of hot directory summaries, and the invalidation channel that keeps every
process's in-memory views coherent (docs/design.md sections 5 and 9).

With a Redis (`REDIS_URL`), summaries live under `filestore:rollup:<backend>:<node>` with a
TTL, and every change is announced on `filestore:invalidate`: directories whose rollups a fold
changed, and nodes and directories a command changed. Every mount and sidecar drops what it
holds of them (its namespace, its rollup values, the kernel's caches). `REDIS_URL=inline` keeps
the cache and the listeners in this process: one process needs no channel.
A cache is only ever a copy: when Redis is away, readers go to PostgreSQL and nothing fails;
a process that lost the channel drops everything it holds once it is back.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from core.observe import metrics

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "filestore:invalidate"
DEFAULT_TTL = 300.0
PUBLISH_DELAY = 0.005  # command announcements are batched this long, off the command's path


@dataclass
class Invalidation:
    rollups: list[int] = field(default_factory=list)  # directories with new rollup values
    nodes: list[int] = field(default_factory=list)  # nodes whose attributes or content changed
    dirs: list[int] = field(default_factory=list)  # directories whose entries changed
    names: list[tuple[int, bytes]] = field(default_factory=list)  # (directory, name) removed, replaced or added
    remote: bool = False  # announced by another process
    everything: bool = False  # announcements may have been missed: drop all
    folded: bool = False  # new rollup rows from a fold in this process (the exact totals did not move)
    # (directory, name, node) names removed: the kernel is told the entry was deleted, so that
    # inotify users of this mount see the removal another process made (IN_DELETE)
    deleted: list[tuple[int, bytes, int]] = field(default_factory=list)

    def as_json(self, origin: str) -> str:
        return json.dumps({"origin": origin, "rollups": self.rollups, "nodes": self.nodes, "dirs": self.dirs,
                           "names": [[d, n.hex()] for d, n in self.names],
                           "deleted": [[d, n.hex(), node] for d, n, node in self.deleted]})


Listener = Callable[[Invalidation], None]


class InlineCache:
    """One process: a dict with expiry, and listeners called directly."""

    shared = False  # nobody else hears announcements

    def __init__(self, ttl: float = DEFAULT_TTL):
        self.ttl = ttl
        self._items: dict[tuple[int, int], tuple[float, dict]] = {}
        self._listeners: list[Listener] = []

    def get(self, backend_id: int, node_id: int) -> dict | None:
        found = self._items.get((backend_id, node_id))
        if found is None or found[0] < time.monotonic():
            metrics.CACHE_REQUESTS.labels("miss").inc()
            return None
        metrics.CACHE_REQUESTS.labels("hit").inc()
        return found[1]

    def put(self, backend_id: int, node_id: int, value: dict) -> None:
        self._items[(backend_id, node_id)] = (time.monotonic() + self.ttl, value)

    def invalidate(self, keys: Iterable[tuple[int, int]]) -> None:
        ids = []
        for key in keys:
            self._items.pop(key, None)
            ids.append(key[1])
        self._tell(Invalidation(rollups=ids, folded=True))

    def announce(self, nodes: Iterable[int], dirs: Iterable[int], names: Iterable[tuple[int, bytes]] = (),
                 deleted: Iterable[tuple[int, bytes, int]] = ()) -> None:
        """A command changed these: nobody else holds them in this mode."""

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _tell(self, change: Invalidation) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # one listener's failure must not stop the others
                log.exception("invalidation listener failed")

    def close(self) -> None:
        self._listeners.clear()


class RedisCache(InlineCache):
    """Summaries in Redis with a TTL; invalidations fanned out with pub/sub."""

    shared = True

    def __init__(self, url: str, ttl: float = DEFAULT_TTL):
        import redis

        super().__init__(ttl)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.origin = uuid.uuid4().hex
        self._stopped = threading.Event()
        self._listening: threading.Thread | None = None
        self._outbox: list[tuple[list[int], list[int], list[tuple[int, bytes]]]] = []
        self._outbox_lock = threading.Lock()
        self._outbox_ready = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="cache-announce", daemon=True)
        self._publisher.start()

    @staticmethod
    def _key(backend_id: int, node_id: int) -> str:
        return f"filestore:rollup:{backend_id}:{node_id}"

    def get(self, backend_id: int, node_id: int) -> dict | None:
        try:
            raw = self.client.get(self._key(backend_id, node_id))
        except Exception as exc:  # a cache outage only costs a database read
            log.debug("cache read failed: %s", exc)
            raw = None
        metrics.CACHE_REQUESTS.labels("hit" if raw else "miss").inc()
        return json.loads(raw) if raw else None

    def put(self, backend_id: int, node_id: int, value: dict) -> None:
        try:
            self.client.set(self._key(backend_id, node_id), json.dumps(value), ex=int(self.ttl))
        except Exception as exc:
            log.debug("cache write failed: %s", exc)

    def invalidate(self, keys: Iterable[tuple[int, int]]) -> None:
        keys = list(keys)
        if not keys:
            return
        change = Invalidation(rollups=[n for _, n in keys], folded=True)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*(self._key(b, n) for b, n in keys))
            pipe.publish(INVALIDATE_CHANNEL, change.as_json(self.origin))
            pipe.execute()
        except Exception as exc:
            # Entries expire with their TTL; the listeners of this process still hear it now.
            log.warning("cache invalidation not published: %s", exc)
        self._tell(change)

    def announce(self, nodes: Iterable[int], dirs: Iterable[int], names: Iterable[tuple[int, bytes]] = (),
                 deleted: Iterable[tuple[int, bytes, int]] = ()) -> None:
        with self._outbox_lock:
            self._outbox.append((list(nodes), list(dirs), list(names), list(deleted)))
        self._outbox_ready.set()

    def _publish_loop(self) -> None:
        while not self._stopped.is_set():
            self._outbox_ready.wait(1.0)
            self._stopped.wait(PUBLISH_DELAY)
            self._outbox_ready.clear()
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
            if not batch:
                continue
            change = Invalidation(nodes=sorted({n for nodes, _, _, _ in batch for n in nodes}),
                                  dirs=sorted({d for _, dirs, _, _ in batch for d in dirs}),
                                  names=sorted({name for _, _, names, _ in batch for name in names}),
                                  deleted=sorted({entry for *_, deleted in batch for entry in deleted}))
            try:
                self.client.publish(INVALIDATE_CHANNEL, change.as_json(self.origin))
            except Exception as exc:
                log.warning("change announcement not published (%s): other mounts see it after their"
                            " attribute timeout or when they next load the directory", exc)

    def subscribe(self, listener: Listener) -> None:
        super().subscribe(listener)
        if self._listening is None:
            self._listening = threading.Thread(target=self._listen, name="cache-invalidations", daemon=True)
            self._listening.start()

    def _listen(self) -> None:
        lost = False
        while not self._stopped.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(INVALIDATE_CHANNEL)
                if lost:  # announcements were missed while away: drop everything held
                    self._tell(Invalidation(remote=True, everything=True))
                    lost = False
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if not message or message["type"] != "message":
                        continue
                    data = json.loads(message["data"])
                    if data.get("origin") == self.origin:
                        continue
                    self._tell(Invalidation(data.get("rollups", []), data.get("nodes", []), data.get("dirs", []),
                                            [(d, bytes.fromhex(n)) for d, n in data.get("names", [])],
                                            remote=True,
                                            deleted=[(d, bytes.fromhex(n), node)
                                                     for d, n, node in data.get("deleted", [])]))
            except Exception as exc:
                if not self._stopped.is_set():
                    log.warning("invalidation channel lost (%s); retrying", exc)
                    lost = True
                    self._stopped.wait(1.0)

    def close(self) -> None:
        self._stopped.set()
        self._outbox_ready.set()
        super().close()
        try:
            self.client.close()
        except Exception:
            pass


class Announcements:
    """AfterCommit (core.journal.pipeline): what a group changed is announced, so that other
    processes drop their copies. Batched off the committer's path by the cache itself."""

    def __init__(self, cache: InlineCache):
        self.cache = cache

    def after_commit(self, batch) -> None:
        nodes, dirs, names = batch.touched()
        if nodes or dirs or names:
            self.cache.announce(nodes, dirs, names, batch.removed())


def open_cache(redis_url: str, ttl: float = DEFAULT_TTL) -> InlineCache | RedisCache:
    return InlineCache(ttl) if redis_url == "inline" else RedisCache(redis_url, ttl)
