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
from collections.abc import Callable, Iterator
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

    def has(self, key: str, index: int) -> bool:
        with self._lock:
            return f"{key}.{index}" in self._lru

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
    at a time, a chunk is several MiB).

    Read-ahead GETs grow while a reader stays sequential: one chunk, then two, up to half the
    read-ahead window (as rclone doubles its read chunks), each GET streamed and handed over a
    chunk at a time, so a longer GET delays no chunk and a sequential read of a large object
    costs half the requests (D57)."""

    def __init__(self, fetch: Callable[[int, int], Iterator[bytes]], size: int, cache: ChunkCache | None,
                 key: str, pool: ThreadPoolExecutor, chunk: int, readahead: int):
        # (start, end inclusive) -> the bytes of that range, in pieces of at most `chunk`
        self._fetch = fetch
        self.size = size
        self._cache = cache
        self._key = key
        self._pool = pool
        self._chunk = chunk
        self._readahead = readahead
        self._max_span = max(1, readahead // 2)
        self._span = 1
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, Future] = {}
        self._next_offset = 0
        self._streak = 0
        self._closed = False
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
            # from the second on, a window of `readahead` chunks.
            self._read_ahead(last + 1, min(last + 1 + (self._readahead if self._streak >= 2 else 1),
                                           self._chunks()))
        else:
            self._span = 1
        parts = []
        for index in range(first, last + 1):
            data = self._get(index)
            base = index * self._chunk
            parts.append(data[max(offset - base, 0):end - base])
        return b"".join(parts)

    def _chunks(self) -> int:
        return (self.size + self._chunk - 1) // self._chunk

    def _read_ahead(self, start: int, stop: int) -> None:
        """Fetch the chunks of [start, stop) that nobody has, in runs of `_span` chunks: a run
        shorter than that waits for the window to move on, unless the reader needs its first
        chunk next or the run ends the object."""
        with self._lock:
            missing = [i for i in range(start, stop) if i not in self._recent and i not in self._inflight
                       and not (self._cache is not None and self._cache.has(self._key, i))]
            while missing:
                run = [missing[0]]
                for index in missing[1:self._span]:
                    if index != run[-1] + 1:
                        break
                    run.append(index)
                if len(run) < self._span and run[0] != start and run[-1] + 1 != self._chunks():
                    return
                futures = [Future() for _ in run]
                for index, future in zip(run, futures):
                    self._inflight[index] = future
                self._pool.submit(self._stream, run[0], futures)
                missing = missing[len(run):]
                self._span = min(self._span * 2, self._max_span)

    def _stream(self, first: int, futures: list[Future]) -> None:
        """One GET for the chunks first.. first+len(futures)-1, each future set as its bytes arrive."""
        start = first * self._chunk
        pieces = self._fetch(start, min(start + len(futures) * self._chunk, self.size) - 1)
        index = first
        try:
            for index, future in enumerate(futures, first):
                if self._closed or not future.set_running_or_notify_cancel():
                    break
                data = next(pieces)
                if self._cache is not None:
                    self._cache.put(self._key, index, data)
                future.set_result(data)
        except Exception as exc:  # this chunk and those after it: their readers fetch them again
            for future in futures[index - first:]:
                if not future.done():
                    future.set_exception(exc)
        finally:
            pieces.close()
            for future in futures:
                future.cancel()  # not started: the reader went away

    def _get(self, index: int) -> bytes:
        with self._lock:
            data = self._recent.get(index)
            if data is not None:
                self._recent.move_to_end(index)
                return data
            future = self._inflight.get(index)
        try:
            if future is None:
                data = self._load(index)
            else:
                try:
                    data = future.result()
                except Exception:  # a read-ahead that failed (or was cut) is one GET of its own now
                    data = self._load(index)
        finally:
            with self._lock:
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
        pieces = self._fetch(start, min(start + self._chunk, self.size) - 1)
        try:
            data = b"".join(pieces)
        finally:
            pieces.close()
        if self._cache is not None:
            self._cache.put(self._key, index, data)
        return data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._inflight.values())
            self._inflight.clear()
            self._recent.clear()
        for future in pending:
            future.cancel()
