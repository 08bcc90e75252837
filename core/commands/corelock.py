"""One thread at a time runs core code (namespace, open files, commands).

The mount serves requests on one trio thread, and core code is written for one thread at a
time. A few requests run on worker threads instead, because they wait for something slow:
an S3 upload at close, fsync's flush of file data. They hold this lock like the serving
thread does while they run core code. Nothing waits for the database under it: commands are
answered before their commit (core.journal.pipeline), and fsync waits for its commit after
letting go (docs/architecture.md D36).
"""
from __future__ import annotations

import threading


class CoreLock:
    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> "CoreLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
