"""The one template every command runs through (docs/design.md section 4).

    validate (names, existence, emptiness, read-only backend, subtree rules; before `run`)
    -> intent line (core.journal.intents) -> executor: the physical change
    -> records built, rollup deltas derived, submitted to the pipeline (the answer line is
       written to the intent log: the command is now replayable) -> the namespace takes it
    -> answered: the caller goes on while the group commit follows (core.journal.pipeline)

A command is written as its validate part, its `execute` closure (physical I/O, returns what
the executor saw) and its `record` closure, which returns the command's change (or several
commands' changes recorded together: a new file's create and its first write) and the
`apply` that shows it in the namespace. Entry ids are taken when a change links a name, so the
namespace and the journal agree before anything is committed.
"""
from __future__ import annotations

import errno
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.commands.xattrs import XattrCache
from core.errors import FsError, errno_for
from core.faults import crash_point
from core.journal.intents import Intent, IntentLog
from core.journal.pipeline import Pipeline
from core.journal.records import Change, Journal, Record
from core.model import Backend, Node, Principal, new_request_id
from core.observe import metrics
from core.rollups import deltas
from core.storage import store
from core.storage.db import Database, IdPool
from core.view.namespace import Namespace
from executors.base import ExecutorError, PartlyDone, Stat

log = logging.getLogger(__name__)

NODE_RESULT_COMMANDS = frozenset({"mkdir", "create", "symlink", "mknod", "link", "setattr", "write"})

Apply = Callable[[], Any]
Recorded = tuple[Change | list[tuple["Command", Change]], Apply]


@dataclass
class Command:
    name: str
    who: Principal
    backend: Backend | None
    node_id: int | None = None
    path: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    paths: tuple[bytes, ...] = ()  # backend-relative paths the physical change touches
    idempotency_key: str | None = None
    request_id: uuid.UUID = field(default_factory=new_request_id)


class OpenContent(Protocol):
    """What commands ask of the open files (core.commands.files.FileTable)."""

    def settle(self, node_id: int) -> None:
        """Before another command changes a file: content staged or pending reaches the backend."""

    def settle_tree(self, backend: Backend) -> None:
        """Before a directory moves or goes on a backend that copies objects: uploads land first."""

    def retain(self, node_id: int) -> None:
        """Before a command removes a file's last name: keep it readable for whoever holds it."""


class AfterAnswer(Protocol):
    """What must follow a command at once, on the serving thread, before its commit: the
    served rollups, the paths the inline watcher must not call drift, nested backends."""

    def answered(self, cmd: Command, changes: list[Change]) -> None: ...


class ServedRollups(Protocol):
    """The directory totals a mount serves (core.rollups.folder.RollupView): they take a
    command's deltas before it is submitted, so `stat` shows it at once."""

    def answering(self, changes: list[Change]) -> set[int]: ...


class Adoption(Protocol):
    """Adopt what the backend holds at some paths now (a change cut off midway)."""

    def adopt_now(self, backend: Backend, intent: Intent) -> None: ...


class Template:
    def __init__(self, db: Database, ns: Namespace, intents: IntentLog, pipeline: Pipeline):
        self.db = db
        self.ns = ns
        self.intents = intents
        self.pipeline = pipeline
        self.ids = IdPool(db)
        self.entry_ids = IdPool(db, "filestore.entry_ids")
        self.xattrs = XattrCache(db)
        self.files: OpenContent | None = None  # set by core.service once the file table exists
        self.after_answer: list[AfterAnswer] = []
        self.adoption: Adoption | None = None
        self.served_rollups: ServedRollups | None = None
        # Changes cut off midway (an S3 directory rename whose deletes failed): finished and
        # adopted before the next command, once the backend answers again; their intents stay
        # open meanwhile, so a restart finishes them instead.
        self.unfinished: list[tuple[Backend, Intent]] = []

    # == the template ==================================================================
    def run(self, cmd: Command, execute: Callable[[], Any], record: Callable[[Any], Recorded]) -> Any:
        if self.unfinished:
            self.finish_unfinished()
        backend_label = cmd.backend.name if cmd.backend else "-"
        started = time.perf_counter()
        if cmd.backend is not None:
            self.intents.record(Intent(cmd.request_id, cmd.name, cmd.backend.id, cmd.paths))
        try:
            outcome = execute()
        except PartlyDone as exc:
            # Started and cut off (an S3 directory rename midway): finished and adopted before
            # the next command once the backend answers (journaled as recover, this request id).
            log.error("%s %s: cut off midway (%s); finished when the backend answers", cmd.name, cmd.path, exc)
            metrics.bound(metrics.EXECUTOR_OUTCOMES, backend_label, cmd.name, "partial").inc()
            if cmd.backend is not None:
                self.unfinished.append((cmd.backend, Intent(cmd.request_id, cmd.name, cmd.backend.id, cmd.paths)))
            raise FsError(errno.EIO, str(exc)) from exc
        except ExecutorError as exc:
            if errno_for(exc) == errno.EIO:  # not an answer a filesystem gives to bad input: say why
                log.warning("%s %s failed on the backend: %s", cmd.name, cmd.path, exc)
            metrics.bound(metrics.EXECUTOR_OUTCOMES, backend_label, cmd.name, "error").inc()
            metrics.bound(metrics.COMMAND_SECONDS, cmd.name, backend_label, "failed").observe(time.perf_counter() - started)
            raise self.refuse(cmd, errno_for(exc), str(exc)) from exc
        metrics.bound(metrics.EXECUTOR_OUTCOMES, backend_label, cmd.name, "ok").inc()
        crash_point(f"after_execute:{cmd.name}")

        recorded, apply = record(outcome)
        # A record is this command's change, or several commands recorded together (a new
        # file's create and its first write): each keeps its own journal row.
        pairs = recorded if isinstance(recorded, list) else [(cmd, recorded)]
        changes = [change for _, change in pairs]
        deltas.derive(self.ns, changes)
        if self.served_rollups is not None:
            self.served_rollups.answering(changes)
        self.pipeline.submit([Record(self.journal(c, "committed", result=_result_of(outcome, change)), change)
                              for c, change in pairs],
                             backend_id=cmd.backend.id if cmd.backend else None, paths=cmd.paths)
        crash_point(f"after_answer:{cmd.name}")
        value = apply()
        for listener in self.after_answer:
            listener.answered(cmd, changes)
        if log.isEnabledFor(logging.DEBUG):  # -vv: one line per command, with its request id
            log.debug("%s %s answered", cmd.name, cmd.path,
                      extra={"request_id": str(cmd.request_id), "command": cmd.name, "path": cmd.path,
                             "backend": backend_label})
        metrics.bound(metrics.COMMAND_SECONDS, cmd.name, backend_label, "answered").observe(time.perf_counter() - started)
        return value

    def finish_unfinished(self) -> None:
        """Finish and adopt changes cut off midway, oldest first; stop at the first that still
        cannot be finished (the backend is still failing): the next command tries again."""
        while self.unfinished and self.adoption is not None:
            backend, intent = self.unfinished[0]
            try:
                self.adoption.adopt_now(backend, intent)
            except (ExecutorError, FsError) as exc:
                log.info("%s %s: still unfinished (%s)", intent.command, intent.paths, exc)
                return
            self.unfinished.pop(0)

    def refuse(self, cmd: Command, code: int, message: str = "") -> FsError:
        """Journal a refused command (through the pipeline, like every row) and return the
        error to raise; it resolves the command's intent when it commits."""
        journal = self.journal(cmd, "failed", error=message or errno.errorcode.get(code), errno=code)
        self.pipeline.submit([Record(journal)], backend_id=cmd.backend.id if cmd.backend else None)
        return FsError(code, message)

    def journal(self, cmd: Command, status: str, **outcome: Any) -> Journal:
        return Journal(cmd.name, status, cmd.who, cmd.request_id, cmd.backend and cmd.backend.id,
                       cmd.node_id, cmd.path, cmd.args, idempotency_key=cmd.idempotency_key, **outcome)

    def earlier_answer(self, key: str) -> tuple[bool, Any]:
        """A retried command with the key of an earlier one: (True, what the first answered)."""
        pending = self.pipeline.in_flight_key(key)
        prior = store.find_by_idempotency_key(self.db, key) if pending is None else {
            "status": pending.journal.status, "errno": pending.journal.errno, "error": pending.journal.error,
            "command": pending.journal.command, "node_id": pending.journal.node_id}
        if prior is None:
            return False, None
        if prior["status"] == "failed":
            raise FsError(prior["errno"] or errno.EIO, prior["error"] or "")
        if prior["command"] in NODE_RESULT_COMMANDS and prior["node_id"]:
            return True, self.ns.node(prior["node_id"])
        return True, None

    # == helpers the commands share ====================================================
    def path(self, node_id: int) -> tuple[Backend, bytes]:
        return self.ns.path_of(node_id)

    def add_entry(self, change: Change, parent_id: int, name: bytes, node_id: int) -> int:
        """Add a name to a change, with its entry id (the readdir offset) taken now."""
        entry_id = self.entry_ids.take()
        change.links.append((parent_id, name, node_id, entry_id))
        return entry_id

    def settle(self, node_id: int) -> None:
        if self.files is not None:
            self.files.settle(node_id)

    def settle_tree(self, backend: Backend) -> None:
        if self.files is not None:
            self.files.settle_tree(backend)

    def retain(self, node_id: int) -> None:
        if self.files is not None:
            self.files.retain(node_id)


def idempotent(command):
    """A retried command with the key of a recorded (or answered) one answers what the first
    answered. Checked before validation: a retried mkdir must not be refused with EEXIST
    because its first attempt created the directory."""
    @functools.wraps(command)
    def wrapper(self: Template, *args, idempotency_key: str | None = None, **kwargs):
        if idempotency_key:
            found, value = self.earlier_answer(idempotency_key)
            if found:
                return value
        return command(self, *args, idempotency_key=idempotency_key, **kwargs)
    return wrapper


def join(parent_rel: bytes, name: bytes) -> bytes:
    return parent_rel + b"/" + name if parent_rel else name


def touch_cached(directory: Node, when_ns: int) -> None:
    directory.mtime_ns = directory.ctime_ns = when_ns


def _result_of(outcome: Any, change: Change) -> dict[str, Any] | None:
    """What the executor left, as the node this record writes has it."""
    if not isinstance(outcome, Stat):
        return None
    written = change.new_nodes[-1] if change.new_nodes else (change.updates[-1][0] if change.updates else None)
    if written is None or written.kind != outcome.kind:
        return {"size": outcome.size, "mtime_ns": outcome.mtime_ns, "mode": outcome.mode}
    return {"size": written.size, "mtime_ns": written.mtime_ns, "mode": written.mode}


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for off, length in sorted(ranges):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + length - merged[-1][0])
        else:
            merged.append([off, length])
    return [(a, b) for a, b in merged]


def write_args(ranges: Sequence[tuple[int, int]], *, staged: bool, durable: bool,
               attrs: dict[str, int] | None) -> dict[str, Any]:
    """The journal arguments of a write command: byte ranges touched (merged, first 64), bytes."""
    return {"ranges": [list(r) for r in merge_ranges(ranges)][:64],
            "bytes": sum(length for _, length in ranges),
            "mode": "staged" if staged else "in_place", "durable": durable,
            **({"attrs": attrs} if attrs else {})}
