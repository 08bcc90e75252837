"""Recovery: finish every command this host left unfinished, and adopt what the backend holds.

Run at every mount start, before serving. What a crash can leave (docs/architecture.md §5):
1. answers (core.journal.intents) with no journal row: commands carried out and answered,
   their group never committed. Each is committed now as itself, from its records in the log
   (principal, request id, arguments), in the order they were answered, exactly once
   (`Pipeline.replay`);
2. intents with no answer: the physical change may or may not have happened, so the paths
   are re-examined and the database is made to match the disk (one `recover` command per
   intent, actor `recovery`, carrying the intent's request id);
3. staging files of dead processes: content whose command never answered; deleted;
4. after an unclean stop, files whose write or create committed since the last clean stop
   are compared with their journaled size (a power loss can lose data the database kept).

`Adoption` makes the database match the backend for some paths; it serves recovery (2, 4),
a change cut off midway (an S3 directory rename), nested backends (core.repair.overlaps),
and, from the database instead of the namespace, the pipeline's conflicts (`ConflictAdopter`).
"""
from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import orjson

from core.journal.intents import Intent
from core.journal.pipeline import Entry
from core.journal.records import Change, Journal, Record
from core.model import Backend, Node, Principal, display_name, name_arg
from core.rollups import deltas
from core.view.cache import Invalidation
from executors.base import ExecutorError, NotFound, Stat

log = logging.getLogger(__name__)

RECOVERY = Principal.system("recovery")


@dataclass
class Report:
    replayed: int = 0
    intents_resolved: int = 0
    paths_changed: int = 0
    staging_removed: int = 0
    files_verified: int = 0

    @property
    def total(self) -> int:
        return self.replayed + self.intents_resolved + self.staging_removed + self.paths_changed

    def __str__(self) -> str:
        return (f"{self.replayed} answered commands committed, {self.intents_resolved} unfinished commands "
                f"resolved, {self.paths_changed} paths adopted from disk, {self.staging_removed} staging files "
                f"removed, {self.files_verified} files verified after an unclean stop")


def run(fs) -> Report:
    report = Report()
    clean_marker = fs.settings.home / "clean-stop"
    was_clean = clean_marker.exists()
    checkpoint = _read_checkpoint(clean_marker)

    unfinished = fs.intents.read()
    if unfinished:
        ids = [rid for item in unfinished for rid in (item.answered or [item.request_id])]
        journaled = {row[0] for row in fs.db.query(
            "SELECT request_id FROM filestore.journal_entries WHERE request_id = ANY(%s)", (ids,))}
        for item in unfinished:
            if (item.answered or [item.request_id])[0] in journaled:
                continue
            intent = item.intent
            if item.payloads:
                fs.pipeline.replay(item.answered, item.payloads, intent.backend_id if intent else None,
                                   intent.paths if intent else ())
                report.replayed += 1
                continue
            backend = fs.ns.backends.get(intent.backend_id)
            if backend is None:
                log.warning("intent %s names an unavailable backend; kept", intent.request_id)
                continue
            fs.pipeline.sync()  # the replays before it are in the database: the tree is read from it
            report.paths_changed += fs.adoption.resolve(backend, intent)
            report.intents_resolved += 1

    for backend in fs.ns.backends.values():
        for staged in backend.executor.staged():
            pid = staged.split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live process on this host is writing it
            backend.executor.discard(staged)
            report.staging_removed += 1

    fs.pipeline.sync()
    if report.replayed:
        fs.ns.forget_everything(keep=lambda node_id: False)  # the replays changed what it loaded
    if not was_clean and checkpoint is not None:
        report.files_verified, changed = _verify_since(fs, checkpoint)
        report.paths_changed += changed
        fs.pipeline.sync()
    fs.intents.reset()
    try:
        clean_marker.unlink()
    except FileNotFoundError:
        pass
    return report


def mark_clean(fs) -> None:
    """A clean stop: everything on disk; remember the journal position for the next start."""
    for backend in fs.ns.backends.values():
        backend.executor.syncfs()
    fs.db.flush_wal()
    last = fs.db.query("SELECT coalesce(max(id), 0) FROM filestore.journal_entries")[0][0]
    (fs.settings.home / "clean-stop").write_text(f"{last}\n")
    fs.intents.reset()  # everything in it is committed and durable


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
            changed += fs.adoption.resolve(backend, Intent(uuid.uuid4(), "verify", backend.id, (rel,)))
    return verified, changed


# == adopting what the backend holds ====================================================
@dataclass
class Adopted:
    """What an adoption changed, to show in the namespace and the kernel's caches."""
    record: Record | None
    changed: int
    touched_dirs: set[int] = field(default_factory=set)


class Adoption:
    """Makes the database match the backend for the paths of one intent, journaled. Built on
    the namespace (the serving thread, recovery at start); `ConflictAdopter` builds the same
    records from the database."""

    def __init__(self, fs):
        self.fs = fs

    def resolve(self, backend: Backend, intent: Intent, *, command: str = "recover", who: Principal = RECOVERY,
                source: dict | None = None) -> int:
        """Adopt now (journaled as `recover`, or as `command` for the changes a nested backend
        saw: core.repair.overlaps) and show it in this mount. Returns paths changed."""
        fs = self.fs
        adopted = adoption_record(fs.ns, fs.orch, backend, intent, command=command, who=who, source=source,
                                  stored_xattrs=fs.orch.xattrs.of)
        if adopted.record is None:
            return 0
        fs.pipeline.submit([adopted.record], backend_id=backend.id, paths=intent.paths)
        change = adopted.record.change
        _show(fs.ns, change)
        for node_id, _, _ in change.xattrs:
            fs.orch.xattrs.forget(node_id)
        removed = sorted(change.names_removed())
        fs.kernel_invalidate(Invalidation(nodes=sorted(change.nodes_touched() | adopted.touched_dirs),
                                          names=removed))
        if adopted.changed:
            log.info("recovered %s %s: %d path(s) adopted from disk", intent.command,
                     [display_name(p) for p in intent.paths], adopted.changed)
        return adopted.changed

    def adopt_now(self, backend: Backend, intent: Intent) -> None:
        self.resolve(backend, intent)


# A conflict's adoption moves the nodes it changes this many versions on. The losing mount
# may hold answered commands built on its own view, each expecting the next version of a node
# (v+1, v+2, ...): after an adoption by plain +1 one of them could find the version it expects
# and apply over the adopted state (a node deleted by the adoption brought back by a chmod, seen
# in test_race). No queue holds this many commands (FILESTORE_COMMIT_BACKLOG bounds it far below).
CONFLICT_VERSION_STEP = 1 << 20


class ConflictAdopter:
    """The pipeline's resolution of an answered command that cannot be recorded as it is
    (another mount changed the node first, a constraint): its journal rows are kept, with the
    error, and the backend's state at its paths is adopted from the database's point of view
    (on the committer thread: no namespace). The mount's views of those paths are dropped."""

    def __init__(self, fs):
        self.fs = fs

    def journal_only(self, entry: Entry, error: BaseException, **result) -> list[Record]:
        """The loser's journal rows alone: what it did (carried out on the backend), why its
        records were refused, and what it saw (the versions and entries it expected)."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [Record(Journal(r.journal.command, "committed", r.journal.who, r.journal.request_id,
                               r.journal.backend_id, r.journal.node_id, r.journal.path, r.journal.args,
                               result={"adopted": reason, "saw": _saw(r, entry.replayed), **result},
                               idempotency_key=r.journal.idempotency_key))
                for r in entry.records]

    def compare_later(self, entry: Entry) -> None:
        """The adoption kept losing too (the other mount still changing those names): the
        loser is journaled alone and its paths are compared by the reconciler instead."""
        from core.repair.reconcile import job_key, job_payload
        from core.storage.queue import RECONCILE
        if entry.backend_id is None:
            return
        self.fs.jobs.enqueue_many(RECONCILE, [(job_key(entry.backend_id, p),
                                               job_payload(entry.backend_id, p, source="conflict"))
                                              for p in entry.paths])

    def adopt(self, entry: Entry, error: BaseException) -> list[Record]:
        fs = self.fs
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kept = self.journal_only(entry, error)
        backend = fs.ns.backends.get(entry.backend_id) if entry.backend_id is not None else None
        if backend is None or not entry.paths:
            return kept
        tree = deltas.DbTree(fs.db, fs.ns.backends.values())
        names = [(parent.id, name) for parent, name in (_locate(tree, backend, rel) for rel in entry.paths)
                 if parent is not None]
        _mark_adopting(fs.db, names)
        intent = Intent(uuid.uuid4(), entry.records[0].journal.command, backend.id, entry.paths)
        adopted = adoption_record(tree, fs.orch, backend, intent, command="recover", who=RECOVERY,
                                  source={"conflict": reason}, stored_xattrs=lambda node_id: {},
                                  version_step=CONFLICT_VERSION_STEP)
        marked = adopted.record.change if adopted.record is not None else kept[0].change
        marked.adopted_at_ns = time.time_ns()  # after the backend was read
        marked.adopted_names = names
        # This mount's views of what the loser changed are stale too (its versions were never
        # recorded): dropped with what the adoption changed.
        lost = [r.change for r in entry.records if r.change is not None] if not entry.replayed else []
        if adopted.record is not None:
            lost.append(adopted.record.change)
        fs.after_conflict(set().union(*(c.nodes_touched() | c.dirs_touched() for c in lost)),
                          set().union(*(c.names_changed() for c in lost)))
        if adopted.record is None:
            return kept
        return kept + [adopted.record]


def _mark_adopting(db, names: list[tuple[int, bytes]]) -> None:
    """Before a conflict's adoption reads the backend: another mount may have carried out
    commands on these names and not recorded them yet. Recorded after the adoption they would
    apply a second time (the adoption read their effect from the backend already); recorded
    while it runs they would not be seen by it. From now until the adoption commits (with the
    time it read the backend) every such command conflicts (filestore.name_adoptions), and its
    mount adopts the backend's state in its turn."""
    if names:
        db.query("SELECT filestore.mark_adopting(%s::jsonb)",
                 (orjson.dumps([{"parent_id": p, "name": n.hex()} for p, n in names]).decode(),))


def _saw(record: Record, replayed: bool) -> dict:
    """What a command that lost a race expected to find (its optimistic preconditions): the
    version of each node it changed, the entries it removed and the names it took as free,
    as the loser's journal row keeps them (issue 15). Unknown for a command replayed from the intent log at start."""
    change = None if replayed else getattr(record, "change", None)
    if change is None:
        return {"versions": {}, "entries": [], "free_names": [], "unknown": "replayed from the intent log"}
    return {"versions": {str(node.id): expected for node, expected in change.updates},
            "entries": [{"parent_id": parent, "name": display_name(name), "node_id": node_id}
                        for parent, name, node_id in change.unlinks],
            "free_names": [{"parent_id": link[0], "name": display_name(link[1])} for link in change.links]}


def adoption_record(tree, orch, backend: Backend, intent: Intent, *, command: str, who: Principal,
                    source: dict | None, stored_xattrs, version_step: int = 1) -> Adopted:
    """The record that makes the database (as `tree` shows it) match the disk for the paths
    of one intent; `record` None when nothing differs and nothing needs journaling. The nodes
    it changes move `version_step` versions on (see CONFLICT_VERSION_STEP)."""
    change = Change()
    touched_dirs: set[int] = set()
    now = time.time_ns()
    changed = 0
    paths = list(intent.paths)

    # A directory rename cut off midway on a backend that moves objects one by one (S3): both
    # names exist; finish it (copies are idempotent, sources go last) and adopt it below.
    if intent.command == "rename" and len(paths) == 2 and backend.executor.moves_objects_one_by_one:
        src_parent, src_name = _locate(tree, backend, paths[0])
        moved = tree.child(src_parent.id, src_name) if src_parent else None
        if moved is not None and moved.is_dir and stat_or_none(backend, paths[0]) is not None \
                and stat_or_none(backend, paths[1]) is not None:
            backend.executor.finish_rename(paths[0], paths[1])
            log.info("finished the interrupted rename %s -> %s", display_name(paths[0]), display_name(paths[1]))

    # A rename that happened on disk: move the node instead of deleting and re-creating it.
    if intent.command == "rename" and len(paths) == 2:
        src, dst = paths
        src_parent, src_name = _locate(tree, backend, src)
        dst_parent, dst_name = _locate(tree, backend, dst)
        moved = tree.child(src_parent.id, src_name) if src_parent else None
        if moved is not None and dst_parent is not None and stat_or_none(backend, src) is None \
                and stat_or_none(backend, dst) is not None:
            replaced = tree.child(dst_parent.id, dst_name)
            if replaced is not None:
                _drop(change, replaced, dst_parent.id, dst_name, now, version_step)
            change.unlinks.append((src_parent.id, src_name, moved.id))
            change.links.append((dst_parent.id, dst_name, moved.id, orch.entry_ids.take()))
            change.update(moved.changed(ctime_ns=now, version=moved.version + version_step), moved.version,
                          parent_id=dst_parent.id, name=name_arg(dst_name), from_parent_id=src_parent.id)
            touched_dirs |= {src_parent.id, dst_parent.id}
            paths = []
            changed = 1

    for rel in paths:
        parent, name = _locate(tree, backend, rel)
        if parent is None:
            continue
        st = stat_or_none(backend, rel)
        node = tree.child(parent.id, name)
        if st is None and node is None:
            continue
        if st is None:
            _drop(change, node, parent.id, name, now, version_step)
        elif node is None or node.kind != st.kind:
            if node is not None:
                _drop(change, node, parent.id, name, now, version_step)
            fresh = _node_from(orch, backend, st)
            change.links.append((parent.id, name, fresh.id, orch.entry_ids.take()))
            change.insert(fresh, parent_id=parent.id, name=name_arg(name))
        else:
            owner = (st.uid, st.gid) if backend.executor.owns_files else (node.uid, node.gid)
            after = node.changed(size=st.size if st.kind != "dir" else node.size, mode=st.mode,
                                 uid=owner[0], gid=owner[1], mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                                 atime_ns=st.atime_ns, version=node.version + version_step, state="ACTIVE")
            if after == node.changed(version=node.version + version_step):
                continue
            change.update(after, node.version)
        touched_dirs.add(parent.id)
        changed += 1

    if intent.command in ("setxattr", "removexattr"):
        changed += _adopt_xattrs(tree, backend, intent.paths, change, stored_xattrs)

    if command != "recover" and not changed:
        return Adopted(None, 0)  # nothing to adopt: no row for a path that already agrees
    own_request = command == "recover" and intent.command != "verify"
    journal = Journal(
        command, "committed", who, intent.request_id if own_request else uuid.uuid4(),
        backend.id, change.snapshots[0][0] if change.snapshots else None,
        display_name(intent.paths[0]) if intent.paths else None,
        {"intent": intent.command, "intent_id": str(intent.request_id),
         "paths": [display_name(p) for p in intent.paths], **(source or {})},
        result={"paths_changed": changed})
    deltas.derive(tree, [change])
    return Adopted(Record(journal, change), changed, touched_dirs)


def _show(ns, change: Change) -> None:
    """An adoption in the namespace at once (its commit follows, like every command's)."""
    after = {n.id: n for n in change.new_nodes}
    after.update((n.id, n) for n, _ in change.updates)
    for parent, name, node_id in change.unlinks:
        ns.unlink(parent, name, node_id)
    for parent, name, node_id, entry_id in change.links:
        node = after.get(node_id) or ns.node(node_id)
        ns.link(parent, name, entry_id, node)
        if node.is_dir:
            ns.parents[node.id] = (parent, name)
    for node in after.values():
        ns.put(node)


def _adopt_xattrs(tree, backend: Backend, paths, change: Change, stored_xattrs) -> int:
    """An interrupted setxattr/removexattr: the attributes the disk has are taken as they are
    (the set happened). A name the database has and the disk lacks is kept: it may be a value
    the disk had no room for, or a removal that did not complete (the call never returned)."""
    adopted = 0
    for rel in paths:
        parent, name = _locate(tree, backend, rel)
        node = tree.child(parent.id, name) if parent is not None else None
        if node is None or node.kind not in ("file", "dir"):
            continue
        try:
            on_disk = backend.executor.xattrs(rel)
        except ExecutorError:
            continue
        stored = stored_xattrs(node.id)
        for key, value in sorted(on_disk.items()):
            if stored.get(key) != value:
                change.xattrs.append((node.id, key, value))
                adopted += 1
    return adopted


def _locate(tree, backend: Backend, rel: bytes) -> tuple[Node | None, bytes]:
    parent_rel, _, name = rel.rpartition(b"/")
    current = tree.node(backend.root_node_id)
    for part in filter(None, parent_rel.split(b"/")):
        current = tree.child(current.id, part)
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


def _drop(change: Change, node: Node, parent_id: int, name: bytes, now: int, version_step: int = 1) -> None:
    links = 0 if node.is_dir else node.nlink - 1
    after = node.changed(nlink=max(links, 0), ctime_ns=now, version=node.version + version_step,
                         state="DELETED" if links <= 0 else node.state)
    change.unlinks.append((parent_id, name, node.id))
    change.update(after, node.version, parent_id=parent_id, name=name_arg(name), removed_entry=True)


def _node_from(orch, backend: Backend, st: Stat) -> Node:
    return Node(orch.ids.take(), backend.id, st.kind, st.size if st.kind != "dir" else 0, st.mode,
                st.uid, st.gid, st.rdev, st.atime_ns, st.mtime_ns, st.ctime_ns, target=st.target,
                nlink=2 if st.kind == "dir" else 1)
