"""Reads of S3 objects: ranged GETs in fixed chunks, read-ahead for sequential readers, and an
on-disk LRU cache of chunks with a size limit.

A chunk is cached under `<cache key>.<chunk index>`; the cache key names the content (the
node id and the object's ETag), so a changed object is never answered from the old chunks:
its new ETag is a new key, and the old chunks age out of the LRU.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class ChunkCache:
    """Chunk files in one directory, evicted least recently used first above `limit` bytes."""

    def __init__(self, directory: Path, limit: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.hits = self.misses = 0
        # Survives restarts: what an earlier process cached is reused, oldest use first out.
        found = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith(".tmp"):
                os.unlink(entry.path)
            elif entry.is_file():
                st = entry.stat()
                found.append((st.st_atime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self.used += size
        self._evict()

    def get(self, key: str, index: int) -> bytes | None:
        name = f"{key}.{index}"
        with self._lock:
            if name not in self._lru:
                self.misses += 1
                return None
            self._lru.move_to_end(name)
            self.hits += 1
        try:
            return (self.dir / name).read_bytes()
        except FileNotFoundError:  # evicted by another thread meanwhile
            with self._lock:
                self._lru.pop(name, None)
            return None

    def put(self, key: str, index: int, data: bytes) -> None:
        if len(data) > self.limit:
            return
        name = f"{key}.{index}"
        tmp = self.dir / f".tmp.{threading.get_ident()}.{name}"
        tmp.write_bytes(data)
        os.rename(tmp, self.dir / name)
        with self._lock:
            self.used += len(data) - self._lru.pop(name, 0)
            self._lru[name] = len(data)
            self._evict()

    def _evict(self) -> None:
        while self.used > self.limit and self._lru:
            name, size = self._lru.popitem(last=False)
            self.used -= size
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass


class Reader:
    """One open object: ranged GETs of whole chunks, the next ones fetched ahead while a
    reader goes sequentially, the last two chunks kept in memory (the kernel asks for 128 KiB
    at a time, a chunk is several MiB)."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int, cache: ChunkCache | None, key: str,
                 pool: ThreadPoolExecutor, chunk: int, readahead: int):
        self._fetch = fetch  # (start, end inclusive) -> bytes
        self.size = size
        self._cache = cache
        self._key = key
        self._pool = pool
        self._chunk = chunk
        self._readahead = readahead
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, Future] = {}
        self._next_offset = 0
        self._streak = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        sequential = offset == self._next_offset
        self._streak = self._streak + 1 if sequential else 0
        self._next_offset = end
        first, last = offset // self._chunk, (end - 1) // self._chunk
        if self._streak:
            # From the first read at the start (or right after the last one): the next chunk;
            # from the second on, `readahead` chunks, fetched in parallel ranged GETs.
            depth = self._readahead if self._streak >= 2 else 1
            for index in range(last + 1, min(last + 1 + depth, self._chunks())):
                self._prefetch(index)
        parts = []
        for index in range(first, last + 1):
            data = self._get(index)
            base = index * self._chunk
            parts.append(data[max(offset - base, 0):end - base])
        return b"".join(parts)

    def _chunks(self) -> int:
        return (self.size + self._chunk - 1) // self._chunk

    def _prefetch(self, index: int) -> None:
        with self._lock:
            if index in self._recent or index in self._inflight:
                return
            self._inflight[index] = self._pool.submit(self._load, index)

    def _get(self, index: int) -> bytes:
        with self._lock:
            data = self._recent.get(index)
            if data is not None:
                self._recent.move_to_end(index)
                return data
            future = self._inflight.get(index)
        try:
            data = future.result() if future is not None else self._load(index)
        finally:
            with self._lock:  # a failed fetch is forgotten: the next read of it tries again
                self._inflight.pop(index, None)
        with self._lock:
            self._recent[index] = data
            while len(self._recent) > 2 + self._readahead:
                self._recent.popitem(last=False)
        return data

    def _load(self, index: int) -> bytes:
        if self._cache is not None:
            data = self._cache.get(self._key, index)
            if data is not None:
                return data
        start = index * self._chunk
        data = self._fetch(start, min(start + self._chunk, self.size) - 1)
        if self._cache is not None:
            self._cache.put(self._key, index, data)
        return data

    def close(self) -> None:
        with self._lock:
            pending = list(self._inflight.values())
            self._inflight.clear()
            self._recent.clear()
        for future in pending:
            future.cancel()
