"""Which paths a mount is changing right now, so that the reconciler never calls its writes drift.

A mount appends an intent line (core.journal.intents) before every physical change and resolves it
when the command's journal row commits; an in-place write keeps its intent open from its
first byte until the write command commits at close. So a path whose disk state differs from
its committed node is drift only if no unresolved intent names it (or an ancestor, or a
descendant: a directory rename moves everything below it).

- In the mount's own process (inline mode) the open intents are in memory.
- A sidecar reads the mount's `intents.log` in the same FILESTORE_HOME incrementally; an
  intent is resolved once a journal row carries its request id. Intents of a mount that is not
  running (no holder of `mount.lock`) are not in flight: its next start recovers them, and until
  then adopting the disk state is what recovery would do anyway.
"""
from __future__ import annotations

import fcntl
import os
import threading
import uuid
from pathlib import Path

from core.journal.intents import Intent, IntentLog
from core.storage.db import Database


def _related(a: bytes, b: bytes) -> bool:
    a, b = a.strip(b"/"), b.strip(b"/")
    return a == b or not a or not b or a.startswith(b + b"/") or b.startswith(a + b"/")


def _touches(intents, backend_id: int, rel: bytes) -> list[Intent]:
    return [i for i in intents if i.backend_id == backend_id and any(_related(p, rel) for p in i.paths)]


class InProcess:
    """The mount's own open intents (inline mode)."""

    def __init__(self, log: IntentLog):
        self.log = log

    def busy(self, backend_id: int, rel: bytes) -> bool:
        return bool(_touches(self.log.pending(), backend_id, rel))


class HomeIntents:
    """The open intents of the mount serving FILESTORE_HOME, read from its intent log."""

    def __init__(self, db: Database, home: Path):
        self.db = db
        self.path = home / "intents.log"
        self.lock_path = home / "mount.lock"
        self._lock = threading.Lock()
        self._inode = None
        self._offset = 0
        self._partial = b""
        self._open: dict[uuid.UUID, Intent] = {}

    def busy(self, backend_id: int, rel: bytes) -> bool:
        if not self._mount_alive():
            return False
        with self._lock:
            self._read_new()
            candidates = _touches(self._open.values(), backend_id, rel)
            if not candidates:
                return False
            done = {row[0] for row in self.db.query(
                "SELECT request_id FROM filestore.journal_entries WHERE request_id = ANY(%s)",
                ([i.request_id for i in candidates],))}
            for request_id in done:
                self._open.pop(request_id, None)
            return len(done) < len(candidates)

    def _mount_alive(self) -> bool:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it exclusively: no mount is serving this home
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _read_new(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if st.st_ino != self._inode or st.st_size < self._offset:
            # The mount compacted (rewrote) its log: what is still open is in the new file.
            self._inode, self._offset, self._partial, self._open = st.st_ino, 0, b"", {}
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = self._partial + f.read(st.st_size - self._offset)
        self._offset = st.st_size
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an append still being written
        for line in lines:
            try:
                intent = Intent.parse(line)
            except (ValueError, KeyError):
                continue
            self._open[intent.request_id] = intent
