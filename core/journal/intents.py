"""The local intent log: what this host is changing, and what it answered but has not committed.

Two kinds of line, appended with one write(2) each (no fsync: they guard against a crash of
the process, whose page cache survives; a power loss is covered by the checkpoint comparison
in core.journal.recovery instead):

- an intent, before the executor touches the backend: request id, command, backend, paths;
- an answer, once the command is carried out: its request ids and its complete records (the
  JSON the pipeline commits, core.journal.records), so that a mount killed before its group
  commit replays the command as itself, with its principal and request id.

Both stay open until the command's journal rows commit (core.journal.pipeline resolves them).
At the next start an answer without a journal row is replayed; an intent without an answer
is unfinished: its paths are re-examined and the disk state adopted (core.journal.recovery).
The log is compacted when it grows past COMPACT_BYTES, keeping the lines of what is open,
after the WAL covering the resolved ones is flushed.
"""
from __future__ import annotations

import json
import os

import orjson
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

COMPACT_BYTES = 16 << 20


@dataclass(frozen=True)
class Intent:
    request_id: uuid.UUID
    command: str
    backend_id: int
    paths: tuple[bytes, ...]

    def line(self) -> bytes:
        return orjson.dumps({"id": str(self.request_id), "cmd": self.command, "backend": self.backend_id,
                             "paths": [p.hex() for p in self.paths]}) + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> "Intent":
        data = json.loads(line)
        return cls(uuid.UUID(data["id"]), data["cmd"], data["backend"],
                   tuple(bytes.fromhex(p) for p in data["paths"]))


@dataclass
class Unfinished:
    """One command found in the log, in the order it was first written."""
    request_id: uuid.UUID
    intent: Intent | None = None  # what it was about to change
    answered: list[uuid.UUID] = field(default_factory=list)  # its records' request ids, once answered
    payloads: list[str] = field(default_factory=list)  # its records, to replay


def _answer_line(request_ids: Sequence[uuid.UUID], payloads: Sequence[str]) -> bytes:
    return ('{"done":' + orjson.dumps([str(r) for r in request_ids]).decode() + ',"records":[' +
            ",".join(payloads) + "]}\n").encode()


class IntentLog:
    def __init__(self, path: Path, before_compact: Callable[[], None] | None = None):
        self.path = path
        # Compaction forgets resolved intents: their commits must be durable first (with
        # synchronous_commit=off a database crash could still lose them).
        self._before_compact = before_compact
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Open commands of this process: request id -> (intent or None, the lines written for it)
        self._open: dict[uuid.UUID, tuple[Intent | None, list[bytes]]] = {}
        self._alias: dict[uuid.UUID, uuid.UUID] = {}  # further request ids of an answer -> its first
        self._size = os.fstat(self._fd).st_size

    # -- writing (serving thread) ------------------------------------------------------
    def record(self, intent: Intent) -> None:
        """Before the physical change (an in-place write: before its first byte, once)."""
        line = intent.line()
        with self._lock:
            if intent.request_id in self._open:
                return
            os.write(self._fd, line)
            self._size += len(line)
            self._open[intent.request_id] = (intent, [line])

    def answered(self, request_ids: Sequence[uuid.UUID], payloads: Sequence[str]) -> None:
        """The command is carried out: its complete records, to replay if it never commits."""
        line = _answer_line(request_ids, payloads)
        first = request_ids[0]
        with self._lock:
            os.write(self._fd, line)
            self._size += len(line)
            intent, lines = self._open.get(first, (None, []))
            self._open[first] = (intent, lines + [line])
            for other in request_ids[1:]:
                self._alias[other] = first

    # -- resolving (committer thread) --------------------------------------------------
    def resolved(self, request_ids: Iterable[uuid.UUID]) -> None:
        """Committed (or provably changed nothing); compacts the log now and then."""
        with self._lock:
            for rid in request_ids:
                self._open.pop(self._alias.pop(rid, rid), None)
            big = self._size > COMPACT_BYTES
        if big:
            self._compact()

    def _compact(self) -> None:
        if self._before_compact is not None:
            self._before_compact()  # what was resolved before this point is durable now
        with self._lock:
            self._rewrite([line for _, lines in self._open.values() for line in lines])

    def pending(self) -> list[Intent]:
        """Intents of this process not resolved yet: changes in flight (the reconciler leaves them alone)."""
        with self._lock:
            return [intent for intent, _ in self._open.values() if intent is not None]

    # -- recovery ----------------------------------------------------------------------
    def read(self) -> list[Unfinished]:
        """Every command in the file, in order (recovery decides which ones finished)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        found: dict[uuid.UUID, Unfinished] = {}
        for line in data.splitlines():
            try:
                parsed = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-append: its command never ran or never answered
            if "done" in parsed:
                ids = [uuid.UUID(r) for r in parsed["done"]]
                item = found.setdefault(ids[0], Unfinished(ids[0]))
                item.answered = ids
                item.payloads = [json.dumps(r, separators=(",", ":")) for r in parsed["records"]]
            else:
                try:
                    intent = Intent.parse(line)
                except (ValueError, KeyError):
                    continue
                found.setdefault(intent.request_id, Unfinished(intent.request_id)).intent = intent
        return list(found.values())

    def reset(self) -> None:
        with self._lock:
            self._open.clear()
            self._alias.clear()
            self._rewrite([])

    def _rewrite(self, lines: list[bytes]) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = b"".join(lines)
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = len(data)

    def close(self) -> None:
        os.close(self._fd)
