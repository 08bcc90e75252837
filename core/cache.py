"""The shared cache of hot directory summaries and its invalidation channel (DESIGN.md section 5).

With a Redis (`REDIS_URL`), summaries live under `filestore:rollup:<backend>:<node>` with a
TTL and every process that changes them publishes the node ids on `filestore:invalidate`, so
every mount and sidecar drops what it holds. `REDIS_URL=inline` keeps both in this process.
A cache is only ever a copy: when Redis is away, readers go to PostgreSQL and nothing fails.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

from . import metrics

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "filestore:invalidate"
DEFAULT_TTL = 300.0

Listener = Callable[[list[int]], None]


class InlineCache:
    """One process: a dict with expiry, and listeners called directly."""

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
        for listener in self._listeners:
            listener(ids)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        self._listeners.clear()


class RedisCache:
    """Summaries in Redis with a TTL; invalidations fanned out with pub/sub."""

    def __init__(self, url: str, ttl: float = DEFAULT_TTL):
        import redis

        self.ttl = ttl
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

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
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*(self._key(b, n) for b, n in keys))
            pipe.publish(INVALIDATE_CHANNEL, json.dumps([n for _, n in keys]))
            pipe.execute()
        except Exception as exc:
            # Entries expire with their TTL; the listeners of this process still hear it now.
            log.warning("cache invalidation not published: %s", exc)
        for listener in self._listeners:
            listener([n for _, n in keys])

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="cache-invalidations", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        while not self._stopped.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(INVALIDATE_CHANNEL)
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        ids = json.loads(message["data"])
                        for listener in self._listeners:
                            listener(ids)
            except Exception as exc:
                # Missed invalidations while away: drop everything (empty list = all).
                log.warning("cache invalidation channel lost (%s); retrying", exc)
                for listener in self._listeners:
                    listener([])
                self._stopped.wait(1.0)

    def close(self) -> None:
        self._stopped.set()
        self.client.close()


def open_cache(redis_url: str, ttl: float = DEFAULT_TTL) -> InlineCache | RedisCache:
    return InlineCache(ttl) if redis_url == "inline" else RedisCache(redis_url, ttl)
