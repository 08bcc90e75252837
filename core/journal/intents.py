"""The local intent log: what this host was about to change, written before the change.

One JSON line per command (request id, command, backend, paths) is appended before the
executor touches the backend. The command's journal row carries the same request id, so at
recovery an intent whose request id has no journal row is unfinished: its paths are
re-examined and the disk state adopted (core.journal.recovery). The append costs one write(2) and no
fsync: it guards against a crash of the process, whose page cache survives; a power loss is
covered by the checkpoint comparison in core.journal.recovery instead.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

_COMPACT_BYTES = 4 << 20


@dataclass(frozen=True)
class Intent:
    request_id: uuid.UUID
    command: str
    backend_id: int
    paths: tuple[bytes, ...]

    def line(self) -> bytes:
        return json.dumps({
            "id": str(self.request_id), "cmd": self.command, "backend": self.backend_id,
            "paths": [p.hex() for p in self.paths],
        }).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> "Intent":
        data = json.loads(line)
        return cls(uuid.UUID(data["id"]), data["cmd"], data["backend"],
                   tuple(bytes.fromhex(p) for p in data["paths"]))


class IntentLog:
    def __init__(self, path: Path, before_compact=None):
        self.path = path
        # Compaction forgets resolved intents: their commits must be durable first (with
        # synchronous_commit=off a database crash could still lose them).
        self._before_compact = before_compact
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._open: dict[uuid.UUID, Intent] = {}  # written by this process and not yet resolved

    def record(self, intent: Intent) -> None:
        with self._lock:
            if intent.request_id in self._open:  # an in-place write logs before its first byte
                return
            os.write(self._fd, intent.line())
            self._open[intent.request_id] = intent

    def resolved(self, request_id: uuid.UUID) -> None:
        """The command committed (or provably changed nothing); compact the log now and then."""
        with self._lock:
            self._open.pop(request_id, None)
            if os.fstat(self._fd).st_size > _COMPACT_BYTES:
                if self._before_compact is not None:
                    self._before_compact()
                self._rewrite(list(self._open.values()))

    def pending(self) -> list[Intent]:
        """Intents of this process not resolved yet: changes in flight (the reconciler leaves them alone)."""
        with self._lock:
            return list(self._open.values())

    def read(self) -> list[Intent]:
        """Every intent in the file (recovery decides which ones finished)."""
        out = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return out
        seen = set()
        for line in data.splitlines():
            try:
                intent = Intent.parse(line)
            except (ValueError, KeyError):
                continue  # a line torn by a crash mid-append: its command never ran
            if intent.request_id not in seen:
                seen.add(intent.request_id)
                out.append(intent)
        return out

    def reset(self, keep: list[Intent] = ()) -> None:
        with self._lock:
            self._rewrite(list(keep))

    def _rewrite(self, keep: list[Intent]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(i.line() for i in keep))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        os.close(self._fd)
