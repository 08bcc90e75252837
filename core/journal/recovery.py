"""Recovery: resolve every command this host left unfinished, before serving again.

Run at every mount start. Three sources of unfinished work:
1. intents (core.journal.intents) with no journal row of the same request id: the physical change
   may or may not have happened, so the paths they name are re-examined and the database
   is made to match the disk (one `recover` command per intent, actor `recovery`, carrying
   the intent's request id so that it is resolved exactly once);
2. staging files of dead processes: content whose write command never committed; deleted;
3. after an unclean stop, files whose write or create committed since the last clean stop
   are compared with their journaled size (a power loss can lose data the database kept).
"""
from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass

from core.journal.intents import Intent
from core.model import Backend, Node, Principal, display_name, name_arg
from core.rollups import deltas
from core.storage import store
from core.view.cache import Invalidation
from executors.base import ExecutorError, NotFound, Stat

log = logging.getLogger(__name__)

RECOVERY = Principal.system("recovery")


@dataclass
class Report:
    intents_resolved: int = 0
    paths_changed: int = 0
    staging_removed: int = 0
    files_verified: int = 0

    @property
    def total(self) -> int:
        return self.intents_resolved + self.staging_removed + self.paths_changed

    def __str__(self) -> str:
        return (f"{self.intents_resolved} unfinished commands resolved, {self.paths_changed} paths "
                f"adopted from disk, {self.staging_removed} staging files removed, "
                f"{self.files_verified} files verified after an unclean stop")


def run(fs) -> Report:
    report = Report()
    clean_marker = fs.settings.home / "clean-stop"
    was_clean = clean_marker.exists()
    checkpoint = _read_checkpoint(clean_marker)

    intents = fs.intents.read()
    if intents:
        ids = [i.request_id for i in intents]
        finished = {row[0] for row in fs.db.query(
            "SELECT request_id FROM filestore.journal_entries WHERE request_id = ANY(%s)", (ids,))}
        for intent in intents:
            if intent.request_id in finished:
                continue
            backend = fs.ns.backends.get(intent.backend_id)
            if backend is None:
                log.warning("intent %s names an unavailable backend; kept", intent.request_id)
                continue
            report.paths_changed += resolve(fs, backend, intent)
            report.intents_resolved += 1

    for backend in fs.ns.backends.values():
        for staged in backend.executor.staged():
            pid = staged.split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live process on this host is writing it
            backend.executor.discard(staged)
            report.staging_removed += 1

    if not was_clean and checkpoint is not None:
        report.files_verified, changed = _verify_since(fs, checkpoint)
        report.paths_changed += changed
    fs.intents.reset()
    try:
        clean_marker.unlink()
    except FileNotFoundError:
        pass
    return report


def heal(fs, intent: Intent) -> None:
    """Adopt a change made while the database was away (called when it answers again)."""
    recorded = fs.db.query("SELECT 1 FROM filestore.journal_entries WHERE request_id = %s",
                           (intent.request_id,))
    backend = fs.ns.backends.get(intent.backend_id)
    if backend is None:
        return
    if recorded:
        # It committed after all (the connection broke after the commit): reload what it touched.
        for rel in intent.paths:
            parent, name = _locate(fs, backend, rel)
            if parent is not None:
                child = fs.ns.child(parent.id, name)
                if child is not None:
                    fs.ns.nodes.pop(child.id, None)
                fs.ns.forget_listing(parent.id)
        return
    resolve(fs, backend, intent)


def mark_clean(fs) -> None:
    """A clean stop: everything on disk; remember the journal position for the next start."""
    for backend in fs.ns.backends.values():
        backend.executor.syncfs()
    fs.db.flush_wal()
    last = fs.db.query("SELECT coalesce(max(id), 0) FROM filestore.journal_entries")[0][0]
    (fs.settings.home / "clean-stop").write_text(f"{last}\n")


def _read_checkpoint(marker) -> int | None:
    try:
        return int(marker.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        # Never stopped cleanly here: the whole journal of this home is the window.
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _verify_since(fs, checkpoint: int) -> tuple[int, int]:
    rows = fs.db.query(
        "SELECT DISTINCT j.node_id FROM filestore.journal_entries j JOIN filestore.nodes n ON n.id = j.node_id"
        " WHERE j.id > %s AND j.status = 'committed' AND j.command IN ('create', 'write', 'setattr')"
        " AND n.kind = 'file' AND n.state <> 'DELETED'"
        # not uploaded yet (write-back, core.commands.writeback): the backend holds the old object until then
        " AND NOT EXISTS (SELECT 1 FROM filestore.uploads u WHERE u.node_id = n.id)", (checkpoint,))
    verified = changed = 0
    for (node_id,) in rows:
        try:
            backend, rel = fs.ns.path_of(node_id)
        except Exception:
            continue
        verified += 1
        node = fs.ns.node(node_id)
        try:
            st = backend.executor.stat(rel)
        except NotFound:
            st = None
        if st is None or st.size != node.size or st.mtime_ns != node.mtime_ns:
            changed += resolve(fs, backend, Intent(uuid.uuid4(), "verify", backend.id, (rel,)))
    return verified, changed


def resolve(fs, backend: Backend, intent: Intent, *, command: str = "recover", who: Principal = RECOVERY,
            source: dict | None = None) -> int:
    """Make the database match the disk for the paths of one intent; journal it (as `recover`,
    or as `command` for the changes a nested backend saw: core.repair.overlaps). Returns paths changed."""
    ns = fs.ns
    change = store.Change()
    touched_dirs: list[int] = []
    now = time.time_ns()
    changed = 0
    paths = list(intent.paths)

    # A directory rename cut off midway on a backend that moves objects one by one (S3): both
    # names exist; finish it (copies are idempotent, sources go last) and adopt it below.
    finish = getattr(backend.executor, "finish_rename", None)
    if finish is not None and intent.command == "rename" and len(paths) == 2:
        src_parent, src_name = _locate(fs, backend, paths[0])
        moved = ns.child(src_parent.id, src_name) if src_parent else None
        if moved is not None and moved.is_dir and stat_or_none(backend, paths[0]) is not None \
                and stat_or_none(backend, paths[1]) is not None:
            finish(paths[0], paths[1])
            log.info("finished the interrupted rename %s -> %s", display_name(paths[0]), display_name(paths[1]))

    # A rename that happened on disk: move the node instead of deleting and re-creating it.
    if intent.command == "rename" and len(paths) == 2:
        src, dst = paths
        src_parent, src_name = _locate(fs, backend, src)
        dst_parent, dst_name = _locate(fs, backend, dst)
        moved = ns.child(src_parent.id, src_name) if src_parent else None
        if moved is not None and dst_parent is not None and stat_or_none(backend, src) is None \
                and stat_or_none(backend, dst) is not None:
            replaced = ns.child(dst_parent.id, dst_name)
            if replaced is not None:
                _drop(change, replaced, dst_parent.id, dst_name, now)
            change.unlinks.append((src_parent.id, src_name, moved.id))
            change.links.append((dst_parent.id, dst_name, moved.id))
            change.update(moved.changed(ctime_ns=now, version=moved.version + 1), moved.version,
                          parent_id=dst_parent.id, name=name_arg(dst_name))
            touched_dirs += [src_parent.id, dst_parent.id]
            paths = []
            changed = 1

    for rel in paths:
        parent, name = _locate(fs, backend, rel)
        if parent is None:
            continue
        st = stat_or_none(backend, rel)
        node = ns.child(parent.id, name)
        if st is None and node is None:
            continue
        if st is None:
            _drop(change, node, parent.id, name, now)
        elif node is None or node.kind != st.kind:
            if node is not None:
                _drop(change, node, parent.id, name, now)
            fresh = _node_from(fs, backend, st)
            change.links.append((parent.id, name, fresh.id))
            change.insert(fresh, parent_id=parent.id, name=name_arg(name))
        else:
            owner = (st.uid, st.gid) if backend.executor.owns_files else (node.uid, node.gid)
            after = node.changed(size=st.size if st.kind != "dir" else node.size, mode=st.mode,
                                 uid=owner[0], gid=owner[1], mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                                 atime_ns=st.atime_ns, version=node.version + 1, state="ACTIVE")
            if after == node.changed(version=node.version + 1):
                continue
            change.update(after, node.version)
        touched_dirs.append(parent.id)
        changed += 1

    if intent.command in ("setxattr", "removexattr"):
        changed += _adopt_xattrs(fs, backend, intent.paths, change)

    if command != "recover" and not changed:
        return 0  # nothing to adopt: no row for a path that already agrees
    own_request = command == "recover" and intent.command != "verify"
    journal = store.Journal(
        command, "committed", who, intent.request_id if own_request else uuid.uuid4(),
        backend.id, change.snapshots[0][0] if change.snapshots else None,
        display_name(intent.paths[0]) if intent.paths else None,
        {"intent": intent.command, "intent_id": str(intent.request_id),
         "paths": [display_name(p) for p in intent.paths], **(source or {})},
        result={"paths_changed": changed})
    deltas.derive(ns, [change])
    fs.db.transaction([store.record(journal, change), *store.xattr_statements(change)], label="recover")
    fs.orch.rollups_changed([change])
    for node_id, _, _ in change.xattrs:
        fs.orch.xattrs.forget(node_id)
    # The view of what was touched is rebuilt from the database on next use.
    for dir_id in touched_dirs:
        ns.forget_listing(dir_id)
    for node_id, _, _ in change.snapshots:
        ns.nodes.pop(node_id, None)
        ns.parents.pop(node_id, None)
    changed_nodes = {n for n, _, _ in change.snapshots}
    removed = {(parent, name) for parent, name, _ in change.unlinks}
    fs.orch.changed(changed_nodes, set(touched_dirs), removed)  # other mounts drop their copies
    fs.kernel_invalidate(Invalidation(nodes=sorted(changed_nodes | set(touched_dirs)), names=sorted(removed)))
    if changed:
        log.info("recovered %s %s: %d path(s) adopted from disk", intent.command,
                 [display_name(p) for p in intent.paths], changed)
    return changed


def _adopt_xattrs(fs, backend: Backend, paths, change: store.Change) -> int:
    """An interrupted setxattr/removexattr: the attributes the disk has are taken as they are
    (the set happened). A name the database has and the disk lacks is kept: it may be a value
    the disk had no room for, or a removal that did not complete (the call never returned)."""
    adopted = 0
    for rel in paths:
        parent, name = _locate(fs, backend, rel)
        node = fs.ns.child(parent.id, name) if parent is not None else None
        if node is None or node.kind not in ("file", "dir"):
            continue
        try:
            on_disk = backend.executor.xattrs(rel)
        except ExecutorError:
            continue
        stored = fs.orch.xattrs.of(node.id)
        for key, value in sorted(on_disk.items()):
            if stored.get(key) != value:
                change.xattrs.append((node.id, key, value))
                adopted += 1
    return adopted


def _locate(fs, backend: Backend, rel: bytes) -> tuple[Node | None, bytes]:
    parent_rel, _, name = rel.rpartition(b"/")
    current = fs.ns.node(backend.root_node_id)
    for part in filter(None, parent_rel.split(b"/")):
        current = fs.ns.child(current.id, part)
        if current is None or not current.is_dir:
            return None, name
    return current, name


def stat_or_none(backend: Backend, rel: bytes) -> Stat | None:
    """What the backend holds at `rel` now, or None when nothing is there (also when a parent
    on the way is not a directory any more)."""
    try:
        return backend.executor.stat(rel)
    except NotFound:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _drop(change: store.Change, node: Node, parent_id: int, name: bytes, now: int) -> None:
    links = 0 if node.is_dir else node.nlink - 1
    after = node.changed(nlink=max(links, 0), ctime_ns=now, version=node.version + 1,
                         state="DELETED" if links <= 0 else node.state)
    change.unlinks.append((parent_id, name, node.id))
    change.update(after, node.version, parent_id=parent_id, name=name_arg(name), removed_entry=True)


def _node_from(fs, backend: Backend, st: Stat) -> Node:
    return Node(fs.orch.ids.take(), backend.id, st.kind, st.size if st.kind != "dir" else 0, st.mode,
                st.uid, st.gid, st.rdev, st.atime_ns, st.mtime_ns, st.ctime_ns, target=st.target,
                nlink=2 if st.kind == "dir" else 1)
