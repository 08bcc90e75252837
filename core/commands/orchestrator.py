"""The orchestrator: every change to a tracked tree is one command run through one template.

    validate (names, existence, emptiness, read-only backend, subtree rules) -> record intent
    -> executor (physical change) -> one transaction (node, entries, snapshot, journal)
    -> after commit only: in-process cache, intent resolved, metrics

A command is written as its validate part (plain checks before `_run`), its `execute`
closure (physical I/O, returns what the executor saw) and its `record` closure (statements
for the transaction, plus what to apply to the in-process view once they committed). `record`
is re-run after an optimistic-version conflict, against freshly loaded rows.
"""
from __future__ import annotations

import errno
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from core.commands.xattrs import XattrCache, check_namespace, check_writable
from core.errors import FsError, errno_for
from core.faults import crash_point
from core.journal.intents import Intent, IntentLog
from core.model import ROOT_INODE, S_ISGID, Backend, Node, Principal, display_name, drops_sgid, name_arg
from core.observe import metrics
from core.rollups import deltas
from core.storage import store
from core.storage.db import Conflict, Database, IdPool, _first_line
from core.view.namespace import Namespace
from executors.base import ExecutorError, NoSpace, PartlyDone, Stat, Unsupported
from executors.local import STAGING_NAME

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 3
NODE_RESULT_COMMANDS = frozenset({"mkdir", "create", "symlink", "mknod", "link", "setattr", "write"})

Apply = Callable[[list[int]], Any]


def idempotent(command):
    """A retried command with the key of a recorded one answers what the first answered.

    Checked before validation: a retried mkdir must not be refused with EEXIST because its
    first attempt created the directory.
    """
    @functools.wraps(command)
    def wrapper(self: "Orchestrator", *args, idempotency_key: str | None = None, **kwargs):
        if idempotency_key:
            prior = store.find_by_idempotency_key(self.db, idempotency_key)
            if prior is not None:
                return self._replay(prior)
        return command(self, *args, idempotency_key=idempotency_key, **kwargs)
    return wrapper


@dataclass
class PendingCreate:
    """A file created in the mount and not yet on the backend (see create_deferred)."""
    node: Node
    parent_id: int
    name: bytes
    who: Principal
    backend: Backend
    entry_id: int


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
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)


class Orchestrator:
    def __init__(self, db: Database, ns: Namespace, intents: IntentLog):
        self.db = db
        self.ns = ns
        self.intents = intents
        self.ids = IdPool(db)
        self.entry_ids = IdPool(db, "filestore.entry_ids")
        self.xattrs = XattrCache(db)
        # Called with the id of every existing node a command is about to change, so that a
        # file created but not yet on the backend (core.commands.files) gets there first.
        self.settle: Callable[[int], None] = lambda node_id: None
        # Called with a backend before a directory is renamed or removed on it: content
        # recorded but not uploaded yet under it lands first (core.commands.writeback).
        self.settle_tree: Callable[[Backend], None] = lambda backend: None
        # Called with the id of a file whose last name a command is about to remove, so that
        # an open of the inode the kernel still holds keeps working (core.files.retain).
        self.retain: Callable[[int], None] = lambda node_id: None
        # Changes made on a backend while the database was away, and how to adopt them
        # (core.recovery.heal, wired by core.service).
        self.unrecorded: list[Intent] = []
        self.heal: Callable[[Intent], None] | None = None
        # Called after a commit that wrote rollup deltas, with its changes (core.service: the
        # served values take them at once, the folder wakes).
        self.rollups_changed: Callable[[list[store.Change]], None] = lambda changes: None
        # Called after every commit with the nodes and directories it changed, so that other
        # processes drop their copies (core.view.cache announces them).
        self.changed: Callable[[set[int], set[int], set[tuple[int, bytes]]], None] = lambda *changed: None
        # Called after every commit on a backend: backends whose roots overlap adopt it too.
        self.mirror: Callable[[Backend, str, uuid.UUID, tuple[bytes, ...]], None] = lambda *args: None
        # Called after every journal row commits: wakes the in-process event relay (core.events.relay).
        self.committed: Callable[[], None] = lambda: None
        # Called before a directory moves: waits until no commit is at the database, as their
        # rollup deltas name the directory chain they saw (core.commands.corelock).
        self.quiesce: Callable[[], None] = lambda: None

    # == the template ==================================================================
    def _run(self, cmd: Command, execute: Callable[[], Any],
             record: Callable[[Any], tuple[store.Change | list[tuple[Command, store.Change]], Apply]]) -> Any:
        if self.unrecorded:
            self.heal_unrecorded()
        backend_label = cmd.backend.name if cmd.backend else "-"
        started = time.perf_counter()
        if cmd.backend is not None:
            self.intents.record(Intent(cmd.request_id, cmd.name, cmd.backend.id, cmd.paths))
        try:
            outcome = execute()
        except PartlyDone as exc:
            # Started and cut off (an S3 directory rename midway): the intent stays open and the
            # change is finished and adopted like one the database missed (heal, or recovery).
            log.error("%s %s: cut off midway (%s); finished by recovery", cmd.name, cmd.path, exc)
            metrics.EXECUTOR_OUTCOMES.labels(backend_label, cmd.name, "partial").inc()
            if cmd.backend is not None:
                self.unrecorded.append(Intent(cmd.request_id, cmd.name, cmd.backend.id, cmd.paths))
            raise FsError(errno.EIO, str(exc)) from exc
        except ExecutorError as exc:
            code = errno_for(exc)
            metrics.EXECUTOR_OUTCOMES.labels(backend_label, cmd.name, "error").inc()
            self._journal_failure(cmd, code, str(exc))
            self.intents.resolved(cmd.request_id)
            metrics.COMMAND_SECONDS.labels(cmd.name, backend_label, "failed").observe(
                time.perf_counter() - started)
            raise FsError(code, str(exc)) from exc
        metrics.EXECUTOR_OUTCOMES.labels(backend_label, cmd.name, "ok").inc()
        crash_point(f"after_execute:{cmd.name}")

        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            recorded, apply = record(outcome)
            # A record is this command's change, or several commands recorded together
            # (a new file's create and its first write): each keeps its own journal row.
            pairs = recorded if isinstance(recorded, list) else [(cmd, recorded)]
            deltas.derive(self.ns, [change for _, change in pairs])
            statements = []
            for c, change in pairs:
                statements.append(store.record(self._journal(c, "committed", result=_result_of(outcome, change)),
                                               change))
                statements.extend(store.xattr_statements(change))
                statements.extend(change.statements)
            try:
                rows = self.db.transaction(statements, label=cmd.name)
                break
            except Conflict:
                if attempt == MAX_CONFLICT_RETRIES:
                    raise FsError(errno.EIO, f"{cmd.name}: conflicting changes kept winning") from None
                for _, change in pairs:
                    self._reload(change)
            except psycopg.Error as exc:
                # The physical change happened but could not be recorded (the database is
                # away): the intent stays in the log, and the change is adopted from the disk
                # as soon as the database answers again (heal), or at the next start.
                log.error("%s %s: change made but not recorded (%s); adopted when the database is back",
                          cmd.name, cmd.path, _first_line(exc))
                if cmd.backend is not None:
                    self.unrecorded.append(Intent(cmd.request_id, cmd.name, cmd.backend.id, cmd.paths))
                raise FsError(errno.EIO, "database unavailable") from exc
        self.intents.resolved(cmd.request_id)
        if any(change.rollup or change.moves for _, change in pairs):
            self.rollups_changed([change for _, change in pairs])
        self.changed(*_touched(change for _, change in pairs))
        self.committed()
        journal_id, entry_ids = rows[0][0]
        if log.isEnabledFor(logging.DEBUG):  # -vv: one line per command, with its journal id
            log.debug("%s %s committed", cmd.name, cmd.path,
                      extra={"journal_id": journal_id, "command": cmd.name, "path": cmd.path,
                             "backend": backend_label})
        value = apply(entry_ids)
        if cmd.backend is not None and cmd.paths:
            self.mirror(cmd.backend, cmd.name, cmd.request_id, cmd.paths)
        metrics.COMMAND_SECONDS.labels(cmd.name, backend_label, "committed").observe(
            time.perf_counter() - started)
        return value

    def heal_unrecorded(self) -> None:
        """Adopt the changes that could not be recorded, oldest first, once the database answers."""
        while self.unrecorded and self.heal is not None:
            try:
                self.heal(self.unrecorded[0])
            except (psycopg.Error, ExecutorError):
                return  # still away: the next command tries again
            self.intents.resolved(self.unrecorded.pop(0).request_id)

    def refuse(self, cmd: Command, code: int, message: str = "") -> FsError:
        """Journal a command refused by validation and return the error to raise."""
        self._journal_failure(cmd, code, message)
        return FsError(code, message)

    def _journal(self, cmd: Command, status: str, **outcome: Any) -> store.Journal:
        return store.Journal(cmd.name, status, cmd.who, cmd.request_id, cmd.backend and cmd.backend.id,
                             cmd.node_id, cmd.path, cmd.args, idempotency_key=cmd.idempotency_key, **outcome)

    def _journal_failure(self, cmd: Command, code: int, message: str) -> None:
        try:
            journal = self._journal(cmd, "failed", error=message or errno.errorcode.get(code), errno=code)
            self.db.transaction([store.record(journal)], label=f"{cmd.name}.failed")
            self.committed()
        except (psycopg.Error, Conflict) as exc:
            log.warning("could not journal failed %s: %s", cmd.name, exc)

    def _replay(self, prior: dict) -> Any:
        """A retried command: answer what the first attempt answered, change nothing."""
        if prior["status"] == "failed":
            raise FsError(prior["errno"] or errno.EIO, prior["error"] or "")
        if prior["command"] in NODE_RESULT_COMMANDS and prior["node_id"]:
            return self.ns.node(prior["node_id"])
        return None

    def _reload(self, change: store.Change) -> None:
        for node_id, _, _ in change.snapshots:
            fresh = store.load_node(self.db, node_id)
            if fresh is not None:
                self.ns.put(fresh)

    # == validation helpers ============================================================
    def _parent(self, cmd_name: str, who: Principal, parent_id: int, name: bytes) -> tuple[Node, Backend]:
        """The directory a new name goes into, checked for every command that adds one."""
        if parent_id == ROOT_INODE:
            raise FsError(errno.EPERM, "the mount root lists backends; add one with `filestore backend add`")
        parent = self.ns.dir(parent_id)
        backend = self.ns.backend_of(parent)
        check_name(name)
        if name == STAGING_NAME:  # reserved in every directory: nested backends keep theirs there
            raise FsError(errno.EINVAL, "name reserved for the executor's staging area")
        if backend.read_only:
            raise FsError(errno.EROFS)
        self._backend_name_check(backend, parent_id, name)
        return parent, backend

    def _backend_name_check(self, backend: Backend, parent_id: int, name: bytes) -> None:
        """Names the backend cannot hold (S3: not UTF-8, key too long) are refused before
        anything is uploaded, even for a file that reaches the backend only at its close."""
        checker = getattr(backend.executor, "check_name", None)
        if checker is not None:
            try:
                checker(self._path(parent_id)[1], name)
            except ExecutorError as exc:
                raise FsError(errno_for(exc), str(exc)) from exc

    def _path(self, node_id: int) -> tuple[Backend, bytes]:
        return self.ns.path_of(node_id)

    @staticmethod
    def _join(parent_rel: bytes, name: bytes) -> bytes:
        return parent_rel + b"/" + name if parent_rel else name

    def _new_owner(self, who: Principal, parent: Node, kind: str, mode: int) -> tuple[int, int, int]:
        """Owner of a new entry: the caller, with the group of a setgid directory."""
        uid = who.uid if who.uid is not None else 0
        gid = who.gid if who.gid is not None else 0
        if parent.mode & S_ISGID:
            gid = parent.gid
            if kind == "dir":
                mode |= S_ISGID
        return uid, gid, mode

    # == commands that add a name ======================================================
    @idempotent
    def mkdir(self, who: Principal, parent_id: int, name: bytes, mode: int, *,
              idempotency_key: str | None = None) -> Node:
        return self._add_name("mkdir", who, parent_id, name, mode, idempotency_key=idempotency_key)

    @idempotent
    def create(self, who: Principal, parent_id: int, name: bytes, mode: int, *,
               idempotency_key: str | None = None) -> Node:
        return self._add_name("create", who, parent_id, name, mode, idempotency_key=idempotency_key)

    @idempotent
    def symlink(self, who: Principal, parent_id: int, name: bytes, target: bytes, *,
                idempotency_key: str | None = None) -> Node:
        return self._add_name("symlink", who, parent_id, name, 0o777, target=target,
                              idempotency_key=idempotency_key)

    @idempotent
    def mknod(self, who: Principal, parent_id: int, name: bytes, kind: str, mode: int, rdev: int = 0, *,
              idempotency_key: str | None = None) -> Node:
        """A FIFO, socket, character or block device (or an empty regular file), as mknod(2)."""
        return self._add_name("mknod", who, parent_id, name, mode, kind=kind, rdev=rdev,
                              idempotency_key=idempotency_key)

    def _add_name(self, command: str, who: Principal, parent_id: int, name: bytes, mode: int, *,
                  target: bytes | None = None, kind: str | None = None, rdev: int = 0,
                  idempotency_key: str | None = None) -> Node:
        parent, backend = self._parent(command, who, parent_id, name)
        _, parent_rel = self._path(parent_id)
        rel = self._join(parent_rel, name)
        kind = kind or {"mkdir": "dir", "create": "file", "symlink": "symlink"}[command]
        uid, gid, mode = self._new_owner(who, parent, kind, mode & 0o7777)
        args: dict[str, Any] = {"parent_id": parent_id, "name": name_arg(name), "mode": mode}
        if target is not None:
            args["target"] = name_arg(target)
        if command == "mknod":
            args.update(kind=kind, rdev=rdev)
        cmd = Command(command, who, backend, path=display_name(rel), args=args, paths=(rel,),
                      idempotency_key=idempotency_key)
        if self.ns.child(parent_id, name) is not None:
            raise self.refuse(cmd, errno.EEXIST)
        node_id = self.ids.take()
        cmd.node_id = node_id
        executor = backend.executor

        def execute() -> Stat:
            if kind == "dir":
                return executor.mkdir(parent_rel, name, mode, uid, gid)
            if kind == "file":
                return executor.create_file(parent_rel, name, mode, uid, gid)
            if kind == "symlink":
                return executor.symlink(parent_rel, name, target, uid, gid)
            return executor.mknod(parent_rel, name, kind, mode, rdev, uid, gid)

        def record(st: Stat):
            node = Node(node_id, backend.id, kind, st.size if kind != "dir" else 0, mode, uid, gid, st.rdev,
                        st.atime_ns, st.mtime_ns, st.ctime_ns, target=target, checksum=st.checksum,
                        nlink=2 if kind == "dir" else 1)
            change = store.Change(links=[(parent_id, name, node_id)], touches=[(parent_id, st.ctime_ns)])
            change.insert(node, parent_id=parent_id, name=name_arg(name))

            def apply(entry_ids):
                self.ns.link(parent_id, name, entry_ids[0], node)
                _touch_cached(parent, st.ctime_ns)
                if kind == "dir":
                    parent.nlink += 1
                return node
            return change, apply

        return self._run(cmd, execute, record)

    # == hard links ====================================================================
    @idempotent
    def link(self, who: Principal, node_id: int, new_parent_id: int, new_name: bytes, *,
             idempotency_key: str | None = None) -> Node:
        """A new name for an existing file (link(2)): one node, several entries."""
        node = self.ns.node(node_id)
        new_parent, backend = self._parent("link", who, new_parent_id, new_name)
        _, parent_rel = self._path(new_parent_id)
        rel = self._join(parent_rel, new_name)
        cmd = Command("link", who, backend, node_id=node_id, path=display_name(rel),
                      args={"parent_id": new_parent_id, "name": name_arg(new_name)},
                      idempotency_key=idempotency_key)
        if node.is_dir:
            raise self.refuse(cmd, errno.EPERM, "hard links to directories are not allowed")
        if node.backend_id != backend.id:
            raise self.refuse(cmd, errno.EXDEV, "hard link across backends")
        if self.ns.child(new_parent_id, new_name) is not None:
            raise self.refuse(cmd, errno.EEXIST)
        self.settle(node_id)
        _, src_rel = self._path(node_id)
        cmd.paths = (src_rel, rel)
        executor = backend.executor

        def execute() -> Stat:
            return executor.link(src_rel, parent_rel, new_name)

        def record(st: Stat):
            current = self.ns.node(node_id)
            after = current.changed(nlink=current.nlink + 1, ctime_ns=st.ctime_ns, version=current.version + 1)
            change = store.Change(links=[(new_parent_id, new_name, node_id)], touches=[(new_parent_id, st.ctime_ns)])
            change.update(after, current.version, parent_id=new_parent_id, name=name_arg(new_name), added_entry=True)

            def apply(entry_ids):
                self.ns.link(new_parent_id, new_name, entry_ids[0], after)
                _touch_cached(new_parent, st.ctime_ns)
                return after
            return change, apply

        return self._run(cmd, execute, record)

    # == a new file, recorded at its first close ======================================
    def create_deferred(self, who: Principal, parent_id: int, name: bytes, mode: int) -> "PendingCreate":
        """A new regular file, in this mount's view at once; it reaches the backend and the
        journal at its first close or fsync (`finish_create`), in one transaction with its
        first content. Nothing is on the backend before: no reader there ever sees it empty
        or half-written, and a crash before the close leaves nothing behind."""
        parent, backend = self._parent("create", who, parent_id, name)
        if self.ns.child(parent_id, name) is not None:
            _, parent_rel = self._path(parent_id)
            raise self.refuse(Command("create", who, backend, path=display_name(self._join(parent_rel, name)),
                                      args={"parent_id": parent_id, "name": name_arg(name)}), errno.EEXIST)
        uid, gid, mode = self._new_owner(who, parent, "file", mode & 0o7777)
        now = time.time_ns()
        node = Node(self.ids.take(), backend.id, "file", 0, mode, uid, gid, 0, now, now, now)
        entry_id = self.entry_ids.take()
        self.ns.link(parent_id, name, entry_id, node)
        _touch_cached(parent, now)
        return PendingCreate(node, parent_id, name, who, backend, entry_id)

    def finish_create(self, pending: "PendingCreate", *, land: Callable[[bytes, bytes], Stat],
                      write: dict[str, Any] | None, writer: Principal | None, request_id: uuid.UUID,
                      durable: bool, pending_upload: Callable[[], list[store.Statement]] | None = None) -> Node:
        """Put a deferred file on the backend (`land(parent_rel, name)`, which must not replace
        anything) and record its create, and its first write if any, in one transaction. With
        `pending_upload`, `land` only kept the content for a write-back upload (see `write`)."""
        node, parent_id, name, backend = pending.node, pending.parent_id, pending.name, pending.backend
        _, parent_rel = self._path(parent_id)
        rel = self._join(parent_rel, name)
        cmd = Command("create", pending.who, backend, node_id=node.id, path=display_name(rel),
                      args={"parent_id": parent_id, "name": name_arg(name), "mode": node.mode},
                      paths=(rel,), request_id=request_id)
        write_cmd = None
        if write is not None:
            if pending_upload is not None:
                write = {**write, "upload": "pending"}
            write_cmd = Command("write", writer or pending.who, backend, node_id=node.id, path=display_name(rel),
                                args=write, paths=(rel,))

        def execute() -> Stat:
            return land(parent_rel, name)

        def record(st: Stat):
            current = self.ns.node(node.id)  # mode and owner may have changed while it was open
            link = store.Change(links=[(parent_id, name, node.id, pending.entry_id)],
                                touches=[(parent_id, node.ctime_ns)])
            if write_cmd is None:  # an empty file: the create alone, as the backend has it
                final = current.changed(size=st.size, atime_ns=st.atime_ns, mtime_ns=st.mtime_ns,
                                        ctime_ns=st.ctime_ns, checksum=st.checksum, version=1)
                link.insert(final, parent_id=parent_id, name=name_arg(name))
                pairs = [(cmd, link)]
            else:  # version 1 as created (empty), version 2 with the content that landed
                created = current.changed(size=0, version=1, atime_ns=node.atime_ns,
                                          mtime_ns=node.ctime_ns, ctime_ns=node.ctime_ns)
                link.insert(created, parent_id=parent_id, name=name_arg(name))
                # the times the backend gave the landed file: the clock of our own create
                # (fine-grained) can be ahead of the disk's (coarse), and atime must not pass mtime
                final = created.changed(size=st.size, mtime_ns=st.mtime_ns,
                                        ctime_ns=_landed_ctime(st, True, write.get("attrs")),
                                        atime_ns=st.atime_ns, checksum=st.checksum, version=2)
                content = store.Change(statements=pending_upload() if pending_upload is not None else [])
                content.update(final, 1)
                pairs = [(cmd, link), (write_cmd, content)]

            def apply(_entry_ids):
                self.ns.put(final)
                if write_cmd is not None:
                    metrics.BYTES_WRITTEN.labels(backend.name).inc(write.get("bytes", 0))
                return final
            return pairs, apply

        try:
            result = self._run(cmd, execute, record)
        except FsError:
            self.ns.unlink(parent_id, name, node.id)  # it never existed outside this mount
            raise
        if durable:
            self.db.flush_wal()
        return result

    # == commands that remove a name ===================================================
    @idempotent
    def unlink(self, who: Principal, parent_id: int, name: bytes, *, idempotency_key: str | None = None) -> None:
        self._remove_name("unlink", who, parent_id, name, idempotency_key)

    @idempotent
    def rmdir(self, who: Principal, parent_id: int, name: bytes, *, idempotency_key: str | None = None) -> None:
        self._remove_name("rmdir", who, parent_id, name, idempotency_key)

    def _remove_name(self, command: str, who: Principal, parent_id: int, name: bytes,
                     idempotency_key: str | None) -> None:
        parent, backend = self._parent(command, who, parent_id, name)
        _, parent_rel = self._path(parent_id)
        rel = self._join(parent_rel, name)
        cmd = Command(command, who, backend, path=display_name(rel),
                      args={"parent_id": parent_id, "name": name_arg(name)}, paths=(rel,),
                      idempotency_key=idempotency_key)
        node = self.ns.child(parent_id, name)
        if node is None:
            raise self.refuse(cmd, errno.ENOENT)
        cmd.node_id = node.id
        self.settle(node.id)
        if command == "unlink" and node.is_dir:
            raise self.refuse(cmd, errno.EISDIR)
        if command == "rmdir":
            if not node.is_dir:
                raise self.refuse(cmd, errno.ENOTDIR)
            if self.ns.listing(node.id).by_name:
                raise self.refuse(cmd, errno.ENOTEMPTY)
            self.settle_tree(backend)
        if command == "unlink":
            self.retain(node.id)
        executor = backend.executor

        def execute() -> None:
            (executor.rmdir if command == "rmdir" else executor.unlink)(parent_rel, name)

        def record(_):
            now = time.time_ns()
            current = self.ns.node(node.id)
            links = 0 if current.is_dir else current.nlink - 1
            after = current.changed(nlink=max(links, 0), ctime_ns=now, version=current.version + 1,
                                    state="DELETED" if links <= 0 else current.state)
            change = store.Change(unlinks=[(parent_id, name, node.id)], touches=[(parent_id, now)])
            change.update(after, current.version, parent_id=parent_id, name=name_arg(name), removed_entry=True)

            def apply(_entry_ids):
                self.ns.unlink(parent_id, name, node.id)
                self.ns.put(after)
                _touch_cached(parent, now)
                if current.is_dir:
                    parent.nlink -= 1
                    self.ns.forget_listing(node.id)
            return change, apply

        self._run(cmd, execute, record)

    # == rename ========================================================================
    @idempotent
    def rename(self, who: Principal, old_parent_id: int, old_name: bytes, new_parent_id: int,
               new_name: bytes, *, noreplace: bool = False, exchange: bool = False,
               idempotency_key: str | None = None) -> None:
        if ROOT_INODE in (old_parent_id, new_parent_id):
            raise FsError(errno.EPERM, "backends are renamed with the CLI, not through the mount")
        old_parent = self.ns.dir(old_parent_id)
        new_parent = self.ns.dir(new_parent_id)
        src_backend = self.ns.backend_of(old_parent)
        backend = self.ns.backend_of(new_parent)
        _, old_rel_parent = self._path(old_parent_id)
        _, new_rel_parent = self._path(new_parent_id)
        old_rel = self._join(old_rel_parent, old_name)
        new_rel = self._join(new_rel_parent, new_name)
        cmd = Command("rename", who, src_backend, path=display_name(old_rel),
                      args={"from": display_name(old_rel), "to": display_name(new_rel),
                            "old_parent_id": old_parent_id, "old_name": name_arg(old_name),
                            "new_parent_id": new_parent_id, "new_name": name_arg(new_name),
                            "noreplace": noreplace, "exchange": exchange},
                      paths=(old_rel, new_rel), idempotency_key=idempotency_key)
        src = self.ns.child(old_parent_id, old_name)
        cmd.node_id = src.id if src is not None else None
        if src_backend.id != backend.id:
            raise self.refuse(cmd, errno.EXDEV, "rename across backends")
        check_name(new_name)
        if backend.read_only:
            raise self.refuse(cmd, errno.EROFS)
        try:
            self._backend_name_check(backend, new_parent_id, new_name)
        except FsError as exc:
            raise self.refuse(cmd, exc.errno, str(exc)) from None
        if new_name == STAGING_NAME:
            raise self.refuse(cmd, errno.EINVAL, "name reserved for the executor's staging area")
        if src is None:
            raise self.refuse(cmd, errno.ENOENT)
        self.settle(src.id)
        if src.is_dir:
            self.settle_tree(backend)  # an S3 directory rename copies every object under it
        dst = self.ns.child(new_parent_id, new_name)
        if dst is not None:
            self.settle(dst.id)
        if src.is_dir or (dst is not None and dst.is_dir):
            self.quiesce()
        if exchange:
            return self._exchange(cmd, src, dst, (old_parent, old_rel_parent, old_name),
                                  (new_parent, new_rel_parent, new_name))
        if src.is_dir and self._is_within(new_parent_id, src.id):
            raise self.refuse(cmd, errno.EINVAL, "cannot move a directory into itself")
        if dst is not None:
            if noreplace:
                raise self.refuse(cmd, errno.EEXIST)
            if dst.id == src.id:
                return  # two names of one file, or the same name: POSIX says do nothing
            if src.is_dir and not dst.is_dir:
                raise self.refuse(cmd, errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise self.refuse(cmd, errno.EISDIR)
            if dst.is_dir and self.ns.listing(dst.id).by_name:
                raise self.refuse(cmd, errno.ENOTEMPTY)
            self.retain(dst.id)
        executor = backend.executor

        def execute() -> None:
            executor.rename(old_rel_parent, old_name, new_rel_parent, new_name, noreplace=noreplace)

        def record(_):
            now = time.time_ns()
            moved = self.ns.node(src.id)
            moved_after = moved.changed(ctime_ns=now, version=moved.version + 1)
            change = store.Change(unlinks=[(old_parent_id, old_name, src.id)],
                                  touches=[(old_parent_id, now)])
            replaced_after = None
            if dst is not None:
                replaced = self.ns.node(dst.id)
                links = 0 if replaced.is_dir else replaced.nlink - 1
                replaced_after = replaced.changed(
                    nlink=max(links, 0), ctime_ns=now, version=replaced.version + 1,
                    state="DELETED" if links <= 0 else replaced.state)
                change.unlinks.append((new_parent_id, new_name, dst.id))
                change.update(replaced_after, replaced.version, parent_id=new_parent_id,
                              name=name_arg(new_name), removed_entry=True)
            change.links.append((new_parent_id, new_name, src.id))
            change.update(moved_after, moved.version, parent_id=new_parent_id, name=name_arg(new_name),
                          from_parent_id=old_parent_id, from_name=name_arg(old_name))
            if new_parent_id != old_parent_id:
                change.touches.append((new_parent_id, now))

            def apply(entry_ids):
                self.ns.unlink(old_parent_id, old_name, src.id)
                if replaced_after is not None:
                    self.ns.unlink(new_parent_id, new_name, dst.id)
                    self.ns.put(replaced_after)
                    if replaced_after.is_dir:
                        new_parent.nlink -= 1
                        self.ns.forget_listing(dst.id)
                if moved_after.is_dir:
                    self.ns.parents[src.id] = (new_parent_id, new_name)
                    old_parent.nlink -= 1
                    new_parent.nlink += 1
                self.ns.link(new_parent_id, new_name, entry_ids[0], moved_after)
                _touch_cached(old_parent, now)
                _touch_cached(new_parent, now)
            return change, apply

        self._run(cmd, execute, record)

    def _exchange(self, cmd: Command, src: Node, dst: Node | None, old: tuple[Node, bytes, bytes],
                  new: tuple[Node, bytes, bytes]) -> None:
        """renameat2(RENAME_EXCHANGE): both names exist and swap atomically; nothing is removed."""
        (old_parent, old_rel_parent, old_name), (new_parent, new_rel_parent, new_name) = old, new
        if dst is None:
            raise self.refuse(cmd, errno.ENOENT)
        if dst.id == src.id:
            return
        if (src.is_dir and self._is_within(new_parent.id, src.id)) or \
                (dst.is_dir and self._is_within(old_parent.id, dst.id)):
            raise self.refuse(cmd, errno.EINVAL, "cannot move a directory into itself")
        executor = cmd.backend.executor

        def execute() -> None:
            executor.rename(old_rel_parent, old_name, new_rel_parent, new_name, exchange=True)

        def record(_):
            now = time.time_ns()
            a, b = self.ns.node(src.id), self.ns.node(dst.id)
            a_after = a.changed(ctime_ns=now, version=a.version + 1)
            b_after = b.changed(ctime_ns=now, version=b.version + 1)
            change = store.Change(
                unlinks=[(old_parent.id, old_name, a.id), (new_parent.id, new_name, b.id)],
                links=[(new_parent.id, new_name, a.id), (old_parent.id, old_name, b.id)],
                touches=[(old_parent.id, now)] + ([(new_parent.id, now)] if new_parent.id != old_parent.id else []))
            change.update(a_after, a.version, parent_id=new_parent.id, name=name_arg(new_name), exchanged=True)
            change.update(b_after, b.version, parent_id=old_parent.id, name=name_arg(old_name), exchanged=True)

            def apply(entry_ids):
                self.ns.unlink(old_parent.id, old_name, a.id)
                self.ns.unlink(new_parent.id, new_name, b.id)
                for node in (a_after, b_after):
                    if node.is_dir:
                        self.ns.parents.pop(node.id, None)
                self.ns.link(new_parent.id, new_name, entry_ids[0], a_after)
                self.ns.link(old_parent.id, old_name, entry_ids[1], b_after)
                if new_parent.id != old_parent.id and a.is_dir != b.is_dir:
                    moved_dir_to_new = 1 if a.is_dir else -1
                    new_parent.nlink += moved_dir_to_new
                    old_parent.nlink -= moved_dir_to_new
                _touch_cached(old_parent, now)
                _touch_cached(new_parent, now)
            return change, apply

        self._run(cmd, execute, record)

    def _is_within(self, node_id: int, ancestor_id: int) -> bool:
        current = node_id
        while current is not None:
            if current == ancestor_id:
                return True
            if current in self.ns.backend_roots:
                return False
            link = self.ns.parent_of(current)
            current = link[0] if link else None
        return False

    # == setattr =======================================================================
    @idempotent
    def setattr(self, who: Principal, node_id: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, idempotency_key: str | None = None) -> Node:
        if node_id == ROOT_INODE:
            raise FsError(errno.EPERM)
        self.settle(node_id)
        node = self.ns.node(node_id)
        if size is not None and mode is None and drops_sgid(node, who):
            mode = node.mode & ~S_ISGID
        backend, rel = self._path(node_id)
        changes = {k: v for k, v in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size),
                                      ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)) if v is not None}
        cmd = Command("setattr", who, backend, node_id=node_id, path=display_name(rel), args=changes,
                      paths=(rel,), idempotency_key=idempotency_key)
        if backend.read_only:
            raise self.refuse(cmd, errno.EROFS)
        if size is not None and node.kind != "file":
            raise self.refuse(cmd, errno.EISDIR if node.is_dir else errno.EINVAL)
        times = None
        if atime_ns is not None or mtime_ns is not None:
            times = (node.atime_ns if atime_ns is None else atime_ns,
                     node.mtime_ns if mtime_ns is None else mtime_ns)
        executor = backend.executor

        def execute() -> Stat:
            return executor.set_attrs(rel, mode=mode & 0o7777 if mode is not None else None, uid=uid,
                                      gid=gid, size=size, times_ns=times)

        def record(st: Stat):
            current = self.ns.node(node_id)
            after = current.changed(
                mode=(mode & 0o7777) if mode is not None else current.mode,
                uid=current.uid if uid is None else uid, gid=current.gid if gid is None else gid,
                size=st.size if current.kind == "file" else current.size,
                atime_ns=_set_atime(st, times) if times else current.atime_ns,
                mtime_ns=st.mtime_ns if (times or size is not None) else current.mtime_ns,
                ctime_ns=st.ctime_ns, checksum=st.checksum or current.checksum, version=current.version + 1)
            change = store.Change()
            change.update(after, current.version)

            def apply(_entry_ids):
                self.ns.put(after)
                return after
            return change, apply

        return self._run(cmd, execute, record)

    # == extended attributes ==========================================================
    @idempotent
    def setxattr(self, who: Principal, node_id: int, name: bytes, value: bytes, *, flags: int = 0,
                 idempotency_key: str | None = None) -> Node:
        """setxattr(2) in the user namespace; flags XATTR_CREATE (1) and XATTR_REPLACE (2)."""
        return self._xattr_change("setxattr", who, node_id, name, value, flags, idempotency_key)

    @idempotent
    def removexattr(self, who: Principal, node_id: int, name: bytes, *,
                    idempotency_key: str | None = None) -> Node:
        return self._xattr_change("removexattr", who, node_id, name, None, 0, idempotency_key)

    def _xattr_change(self, command: str, who: Principal, node_id: int, name: bytes, value: bytes | None,
                      flags: int, idempotency_key: str | None) -> Node:
        if node_id == ROOT_INODE:
            raise FsError(errno.EPERM)
        check_namespace(name)  # not journaled: what a filesystem without these answers
        node = self.ns.node(node_id)
        backend, rel = self._path(node_id)
        args: dict[str, Any] = {"name": name_arg(name)}
        if value is not None:
            args.update(size=len(value), flags=flags)
        cmd = Command(command, who, backend, node_id=node_id, path=display_name(rel), args=args, paths=(rel,),
                      idempotency_key=idempotency_key)
        try:
            check_writable(name, value)
        except FsError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                # cp -p and mv probe system.posix_acl_* and security.* on every file they copy:
                # a namespace this filesystem has no place for is not a change to journal.
                raise
            raise self.refuse(cmd, exc.errno, str(exc)) from None
        if backend.read_only:
            raise self.refuse(cmd, errno.EROFS)
        if node.kind not in ("file", "dir"):  # Linux keeps user xattrs on files and directories only
            raise self.refuse(cmd, errno.EPERM, f"user xattrs on a {node.kind}")
        present = name in self.xattrs.of(node_id)
        if (value is None or flags & 2) and not present:
            raise self.refuse(cmd, errno.ENODATA)
        if flags & 1 and present:
            raise self.refuse(cmd, errno.EEXIST)
        self.settle(node_id)
        executor = backend.executor

        def execute() -> Stat:
            # The database holds the attribute; the disk keeps a copy where it can (D18).
            try:
                st = (executor.set_xattr(rel, name, value) if value is not None
                      else executor.remove_xattr(rel, name))
                cmd.args["on_disk"] = True
            except (Unsupported, NoSpace):
                st = executor.stat_node(rel)
                cmd.args["on_disk"] = False
            return st

        def record(st: Stat):
            current = self.ns.node(node_id)
            ctime = st.ctime_ns if cmd.args["on_disk"] else max(time.time_ns(), current.ctime_ns)
            after = current.changed(ctime_ns=ctime, version=current.version + 1)
            change = store.Change(xattrs=[(node_id, name, value)])
            change.update(after, current.version)

            def apply(_entry_ids):
                self.ns.put(after)
                if value is None:
                    self.xattrs.drop(node_id, name)
                else:
                    self.xattrs.put(node_id, name, value)
                return after
            return change, apply

        return self._run(cmd, execute, record)

    # == write (commit of file content) ================================================
    def write(self, who: Principal, node_id: int, *, land: Callable[[], Stat],
              ranges: Sequence[tuple[int, int]], request_id: uuid.UUID, staged: bool,
              paths: tuple[bytes, ...], durable: bool, attrs: dict[str, int] | None = None,
              pending_upload: Callable[[], list[store.Statement]] | None = None) -> Node:
        """Commit content already written to the backend (in place) or staged (landed by `land`).
        With `pending_upload`, the content is kept for a write-back upload (core.commands.writeback): the
        statements it returns (the upload's row) go into the command's transaction."""
        node = self.ns.node(node_id)
        backend = self.ns.backend_of(node)
        args = write_args(ranges, staged=staged, durable=durable, attrs=attrs)
        if pending_upload is not None:
            args["upload"] = "pending"
        written = args["bytes"]
        cmd = Command("write", who, backend, node_id=node_id,
                      path=display_name(paths[0]) if paths else None, args=args,
                      paths=paths, request_id=request_id)

        def record(st: Stat):
            current = self.ns.node(node_id)
            # mode, uid and gid folded in by FileTable.absorb_attrs are already on `current`
            after = current.changed(size=st.size, mtime_ns=st.mtime_ns, ctime_ns=_landed_ctime(st, staged, attrs),
                                    atime_ns=st.atime_ns if attrs and "atime_ns" in attrs else current.atime_ns,
                                    checksum=st.checksum, version=current.version + 1)
            change = store.Change(statements=pending_upload() if pending_upload is not None else [])
            change.update(after, current.version)

            def apply(_entry_ids):
                self.ns.put(after)
                metrics.BYTES_WRITTEN.labels(backend.name).inc(written)
                return after
            return change, apply

        result = self._run(cmd, land, record)
        if durable:
            self.db.flush_wal()
        return result

    def record_atime(self, node_id: int, atime_ns: int) -> None:
        """A read's relatime update: not a change anyone made, so no command, no journal row
        and no new version (as Linux does not bump i_version for atime); best effort."""
        try:
            self.db.transaction([store.atime(node_id, atime_ns)], label="atime")
        except psycopg.Error as exc:
            log.warning("atime of node %s not recorded: %s", node_id, _first_line(exc))

    def record_intent(self, request_id: uuid.UUID, command: str, backend: Backend, paths: tuple[bytes, ...]) -> None:
        self.intents.record(Intent(request_id, command, backend.id, paths))


def _set_atime(st: Stat, times: tuple[int, int]) -> int:
    """The atime a utimensat set. The stat taken after it may already show a later one (a
    directory read on the disk meanwhile moves it, relatime): where the disk kept the mtime
    asked for to the nanosecond, it kept the atime asked for too."""
    return times[0] if st.mtime_ns == times[1] else st.atime_ns


def _touched(changes) -> tuple[set[int], set[int], set[tuple[int, bytes]]]:
    """Nodes, directories and removed names (directory, name) that some changes touched."""
    nodes: set[int] = set()
    dirs: set[int] = set()
    names: set[tuple[int, bytes]] = set()
    for change in changes:
        names.update((parent, name) for parent, name, _ in change.unlinks)
        nodes.update(n.id for n in change.new_nodes)
        nodes.update(n.id for n, _ in change.updates)
        dirs.update(link[0] for link in change.links)
        dirs.update(parent for parent, _, _ in change.unlinks)
        dirs.update(d for d, _ in change.touches)
    return nodes, dirs, names


def check_name(name: bytes) -> None:
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name!r}")


def _landed_ctime(st: Stat, staged: bool, attrs: dict | None) -> int:
    """A staged file's ctime as its writer made it: landing (chmod, chown, rename) is the
    daemon's own work and moves the disk's ctime past the last write, which a native file
    never shows; attribute changes the writer made itself keep the disk's ctime."""
    if staged and not attrs:
        return st.mtime_ns
    return st.ctime_ns


def _touch_cached(directory: Node, when_ns: int) -> None:
    directory.mtime_ns = directory.ctime_ns = when_ns


def write_args(ranges: Sequence[tuple[int, int]], *, staged: bool, durable: bool,
               attrs: dict[str, int] | None) -> dict[str, Any]:
    """The journal arguments of a write command: byte ranges touched (merged, first 64), bytes."""
    return {"ranges": [list(r) for r in merge_ranges(ranges)][:64],
            "bytes": sum(length for _, length in ranges),
            "mode": "staged" if staged else "in_place", "durable": durable,
            **({"attrs": attrs} if attrs else {})}


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for off, length in sorted(ranges):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + length - merged[-1][0])
        else:
            merged.append([off, length])
    return [(a, b) for a, b in merged]


def _result_of(outcome: Any, change: store.Change) -> dict[str, Any] | None:
    """What the executor left, as the node this record writes has it."""
    if not isinstance(outcome, Stat):
        return None
    written = change.new_nodes[-1] if change.new_nodes else (change.updates[-1][0] if change.updates else None)
    if written is None or written.kind != outcome.kind:
        return {"size": outcome.size, "mtime_ns": outcome.mtime_ns, "mode": outcome.mode}
    return {"size": written.size, "mtime_ns": written.mtime_ns, "mode": written.mode}
