"""The reconciler: make the database match a backend path changed behind Filestore's back.

One job names one backend path (filestore_reconcile_queue, coalesced per path). Running it:

    stat the disk -> skip if a mount has a change to it in flight (core.repair.inflight)
    -> load the committed node -> stat again (a disk still changing is looked at later)
    -> equal: nothing happened that the journal does not already hold (the mount's own writes)
    -> different: drift. First transaction: journal `drift` (actor watcher or audit) and mark the
       node INCONSISTENT; second: journal `reconcile` (actor reconciler) with the outcome:
       created / updated / moved / missing / restored, the node ACTIVE or MISSING again.

A job killed between the two transactions leaves the node INCONSISTENT and its lease
expires: the next run finds the difference again and finishes it. Everything goes through
the commit pipeline, the write path of commands. A vanished node loses its name (the tree shown is
the disk's) and becomes MISSING with its subtree; its last name is found again through the
journal when it reappears, and it becomes ACTIVE again.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.faults import crash_point
from core.journal.pipeline import Pipeline
from core.journal.records import Change, Journal, Record
from core.journal.recovery import stat_or_none
from core.model import Backend, Node, Principal, display_name, name_arg
from core.observe import metrics
from core.rollups import deltas
from core.storage import store
from core.storage.db import Database, IdPool
from core.storage.queue import RECONCILE, JobQueue
from executors.base import NotFound, Stat

log = logging.getLogger(__name__)

RECONCILER = Principal.system("reconciler")


class Busy(Exception):
    """The path is being changed (by a mount, or still on disk): look again later."""


@dataclass
class Applied:
    """What one reconcile changed, for a mount that must show it (inline mode)."""
    puts: list[Node] = field(default_factory=list)
    links: list[tuple[int, bytes, int, Node]] = field(default_factory=list)  # parent, name, entry id, node
    unlinks: list[tuple[int, bytes, int]] = field(default_factory=list)  # parent, name, node id


def job_key(backend_id: int, rel: bytes) -> str:
    return f"{backend_id}:{rel.hex()}"


def job_payload(backend_id: int, rel: bytes, **extra: Any) -> dict[str, Any]:
    return {"backend": backend_id, "path": rel.hex(), **extra}


def _same_disk(a: Stat | None, b: Stat | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.kind == b.kind == "dir":
        # A directory's times are not compared anywhere (differs); an S3 prefix without a
        # marker object has none of its own and reports the time of asking.
        return (a.mode, a.uid, a.gid, a.ino) == (b.mode, b.uid, b.gid, b.ino)
    return (a.kind, a.size, a.mode, a.uid, a.gid, a.mtime_ns, a.target, a.ino) == \
        (b.kind, b.size, b.mode, b.uid, b.gid, b.mtime_ns, b.target, b.ino)


def observe_only(backend: Backend) -> bool:
    """A backend added with --observe-only (seed 001's rollout phase 1): drift is journaled and
    published, its nodes are marked INCONSISTENT, nothing is adopted until `drift adopt`."""
    return bool((backend.options or {}).get("observe_only"))


def differs(node: Node, st: Stat, owns_files: bool) -> bool:
    """Does the disk hold something the committed node does not say? (Directory times are
    the mount's own bookkeeping, ctime and atime change on their own: not compared.)"""
    if node.state != "ACTIVE" or node.kind != st.kind or node.mode != st.mode:
        return True
    if owns_files and (node.uid, node.gid) != (st.uid, st.gid):
        return True
    if node.kind == "file":
        return node.size != st.size or node.mtime_ns != st.mtime_ns
    if node.kind == "symlink":
        return node.target != st.target
    if node.kind in ("chardev", "blockdev"):
        return node.rdev != st.rdev
    return False


class Reconciler:
    def __init__(self, db: Database, backends: Callable[[], dict[int, Backend]], queue: JobQueue,
                 pipeline: Pipeline, *, in_flight=None, on_applied: Callable[[Applied], None] | None = None,
                 known: Callable[[Backend, bytes, Stat], bool] | None = None):
        self.db = db
        self.pipeline = pipeline
        # Inline: "does the mount's own view already hold this stat?" (no query). Most events a
        # mount's watcher sees are its own writes, already committed and in its namespace.
        self.known = known
        self.backends = backends
        self.queue = queue
        self.in_flight = in_flight
        self.on_applied = on_applied
        self.ids = IdPool(db)
        self.entry_ids = IdPool(db, "filestore.entry_ids")

    # == one job ========================================================================
    def run(self, payload: dict[str, Any]) -> str:
        """Reconcile one path; returns the outcome. Raises Busy to be looked at again later."""
        backend = self.backends().get(payload["backend"])
        if backend is None or backend.executor is None:
            return "no-backend"
        rel = bytes.fromhex(payload["path"])
        source = payload.get("source", "watcher")
        src = bytes.fromhex(payload["from"]) if payload.get("from") else None
        # An operator's `filestore drift adopt` (who ran it): what it finds is adopted even on an
        # observe-only backend, and so is what it queues below it.
        adopt = {"adopt": payload["adopt"]} if payload.get("adopt") else {}

        first = stat_or_none(backend, rel)
        for path in (rel, src):
            if path is not None and self.in_flight is not None and self.in_flight.busy(backend.id, path):
                raise Busy(f"a mount is changing {display_name(path)}")
        if self.known is not None and first is not None and src is None and not payload.get("deep") \
                and self.known(backend, rel, first):
            return "unchanged"
        parent, name, found = self._locate(backend, rel)
        if parent is None:
            # The parent directory is not known yet (created out of band too): reconcile the
            # nearest unknown ancestor, which brings this path in with its subtree.
            ancestor = self._unknown_ancestor(backend, rel)
            self.queue.enqueue(RECONCILE, job_key(backend.id, ancestor),
                               job_payload(backend.id, ancestor, source=source, deep=True, **adopt))
            return "parent-queued"
        st = stat_or_none(backend, rel)
        if not _same_disk(first, st):
            raise Busy(f"{display_name(rel)} is still changing on disk")
        node = found[1] if found else None
        if node is None and st is None:
            if src is not None:
                return self.run(job_payload(backend.id, src, source=source, **adopt))
            if self._untracked(backend, rel):
                self._record_gone(backend, rel)  # observed, never adopted, gone again
            return "absent"
        if node is not None and st is not None and not differs(node, st, backend.executor.owns_files):
            if st.kind == "dir" and payload.get("deep"):
                self._compare_listing(backend, rel, node, source, recurse=source == "audit", extra=adopt)
            return "unchanged"
        if self._in_transit(backend, rel, node):
            raise Busy(f"{display_name(rel)} has an upload or a deletion pending")
        if observe_only(backend) and not adopt:
            settled = node is not None and st is not None and \
                not differs(node.changed(state="ACTIVE"), st, backend.executor.owns_files)
            if not settled:  # (back as recorded: nothing to adopt, the mark goes below)
                return self._observe(backend, rel, node, st, source)
        return self._heal(backend, rel, parent, name, found, st, src, source, payload)

    def _in_transit(self, backend: Backend, rel: bytes, node: Node | None) -> bool:
        """Is the object at `rel` about to change by a write-back row (core.commands.writeback,
        core.commands.deletes)? An upload recorded and not sent (S3 holds the old object, or
        none, until then), or the deletion of a name already removed from the journal (S3
        holds the object until the batch is sent): either is the mount's own change in flight,
        never drift to adopt."""
        return bool(self.db.query(
            "SELECT 1 FROM filestore.uploads WHERE node_id = %s OR (backend_id = %s AND path = %s) LIMIT 1",
            (node.id if node is not None else None, backend.id, rel)))

    # == observe-only (seed 001, rollout phase 1) ========================================
    def _observe(self, backend: Backend, rel: bytes, node: Node | None, st: Stat | None, source: str) -> str:
        """Drift journaled and published, the node marked INCONSISTENT; nothing adopted until
        an operator runs `filestore drift adopt` (core.repair.drift)."""
        if node is None and self._untracked(backend, rel):
            return "observed"  # journaled already (an audit finds it again at every round)
        if not rel.strip(b"/") and st is None:
            raise NotFound(f"backend root {backend.root} is unreachable")
        if st is None:
            backend.executor.probe()  # gone, or the backend away (Unavailable: looked at later)
        self._record_drift(backend, rel, node, _describe(st), source)
        if node is not None and self.on_applied is not None:
            marked = store.load_node(self.db, node.id)
            if marked is not None:
                self.on_applied(Applied(puts=[marked]))
        return "observed"

    def _untracked(self, backend: Backend, rel: bytes) -> bool:
        """Is drift journaled at this path with no node, and not resolved since?"""
        return bool(self.db.query(
            "SELECT 1 FROM filestore.journal_entries d WHERE d.backend_id = %s AND d.path = %s"
            " AND d.command = 'drift' AND d.node_id IS NULL AND NOT EXISTS ("
            "  SELECT 1 FROM filestore.journal_entries r WHERE r.backend_id = d.backend_id AND r.path = d.path"
            "   AND r.id > d.id AND r.command IN ('reconcile', 'purge')) LIMIT 1",
            (backend.id, display_name(rel))))

    def _record_gone(self, backend: Backend, rel: bytes) -> None:
        journal = Journal("reconcile", "committed", RECONCILER, uuid.uuid4(), backend.id, None, display_name(rel),
                          {"outcome": "gone", "source": "watcher", "observed": None}, result={"nodes_changed": 0})
        self._record(journal, Change())

    # == drift ==========================================================================
    def _heal(self, backend: Backend, rel: bytes, parent: Node, name: bytes,
              found: tuple[int, Node] | None, st: Stat | None, src: bytes | None, source: str,
              payload: dict) -> str:
        node = found[1] if found else None
        if not rel.strip(b"/") and st is None:
            raise NotFound(f"backend root {backend.root} is unreachable")
        if st is None:
            # Nothing there, or no backend there (its root gone, its endpoint away)? Only the
            # first is drift: the probe raises Unavailable for the second, and the job waits.
            backend.executor.probe()
        if st is None and node is not None and self._moved_away(backend, rel):
            # A job for the path it moved to is waiting or running: that job moves the node
            # (keeping its id); marking it MISSING here first would make that a re-creation.
            return "moved-away"
        observed = _describe(st)
        self._record_drift(backend, rel, node, observed, source)
        crash_point("reconcile:after_drift")
        node = store.load_node(self.db, node.id) if node is not None else None
        change = Change()
        applied = Applied()
        now = time.time_ns()
        current: Node | None = None
        moved_from: bytes | None = None
        if st is None:
            outcome = "missing"
            self._vanish(change, applied, parent.id, name, node, now)
        elif node is not None and node.kind == st.kind:
            outcome = "restored" if node.state == "MISSING" else "updated"
            current = self._adopt(node, st, backend)
            change.update(current, node.version, parent_id=parent.id, name=name_arg(name))
            applied.puts.append(current)
        else:
            if node is not None:  # replaced by something of another kind
                self._vanish(change, applied, parent.id, name, node, now)
            moved = self._moved_node(backend, src, st) if src is not None else None
            if moved is not None:
                outcome, moved_from, revived = "moved", src, moved[2]
                change.unlinks.append((moved[0].id, moved[1], revived.id))
                applied.unlinks.append((moved[0].id, moved[1], revived.id))
                change.touches.append((moved[0].id, now))
            else:
                # The old name may have been handled first (marked MISSING by its own job):
                # the node is found again by the path it vanished from.
                revived = self._missing_at(backend, src, st) if src is not None else None
                if revived is not None:
                    outcome, moved_from = "moved", src
                else:
                    revived = self._missing_at(backend, rel, st)
                    outcome = "restored" if revived is not None else "created"
            if revived is not None:
                current = self._adopt(revived, st, backend)
                # the name it gets: moved from another, or given back to a node that had lost
                # its last one (the counters move what it carries: core.rollups.counters)
                entry = {"from_parent_id": moved[0].id} if moved is not None else {"added_entry": True}
                change.update(current, revived.version, parent_id=parent.id, name=name_arg(name), **entry)
            else:
                current = self._new_node(backend, st)
                change.insert(current, parent_id=parent.id, name=name_arg(name))
            entry_id = self.entry_ids.take()
            change.links.append((parent.id, name, current.id, entry_id))
            applied.links.append((parent.id, name, entry_id, current))
        if rel.strip(b"/"):
            change.touches.append((parent.id, now))
        journal = Journal(
            "reconcile", "committed", RECONCILER, uuid.uuid4(), backend.id,
            change.snapshots[0][0] if change.snapshots else None, display_name(rel),
            {"outcome": outcome, "source": source, "observed": observed,
             **({"from": display_name(moved_from)} if moved_from is not None else {}),
             **({"adopted_by": payload["adopt"]} if payload.get("adopt") else {})},
            result={"nodes_changed": len(change.snapshots)})
        deltas.derive(deltas.DbTree(self.db, self.backends().values()), [change])
        self._record(journal, change)
        metrics.RECONCILED.labels(backend.name, outcome).inc()
        log.info("reconciled %s:/%s: %s", backend.name, display_name(rel), outcome,
                 extra={"backend": backend.name, "path": display_name(rel), "outcome": outcome,
                        "request_id": str(journal.request_id)})
        if self.on_applied is not None:
            self.on_applied(applied)
        if current is not None and current.is_dir:
            self._compare_listing(backend, rel, current, source, recurse=outcome in ("restored", "moved"),
                                  extra={"adopt": payload["adopt"]} if payload.get("adopt") else {})
        return outcome

    def _record_drift(self, backend: Backend, rel: bytes, node: Node | None, observed, source: str) -> None:
        """Journal the drift and mark the node INCONSISTENT, before healing it (own transaction)."""
        change = Change()
        if node is not None and node.state not in ("INCONSISTENT", "MISSING"):
            change.update(node.changed(state="INCONSISTENT", version=node.version + 1), node.version)
        elif node is not None and node.state == "INCONSISTENT":
            return  # already journaled (by a run that died before healing it, or observe-only)
        elif node is None and self._untracked(backend, rel):
            return  # journaled on an observe-only backend, adopted now
        journal = Journal(
            "drift", "committed", Principal.system(source), uuid.uuid4(), backend.id,
            node.id if node else None, display_name(rel),
            {"observed": observed, "recorded": _describe_node(node)})
        self._record(journal, change)
        metrics.DRIFT_EVENTS.labels(backend.name, source).inc()

    def _record(self, journal: Journal, change: Change) -> None:
        """Through the pipeline, waiting for the commit: a job is done once its rows are in."""
        self.pipeline.wait(self.pipeline.submit([Record(journal, change)], log_intent=False))

    def _vanish(self, change: Change, applied: Applied, parent_id: int, name: bytes, node: Node,
                now: int) -> None:
        """A node gone from the disk: it loses this name and becomes MISSING with its subtree."""
        change.unlinks.append((parent_id, name, node.id))
        applied.unlinks.append((parent_id, name, node.id))
        gone = node.changed(state="MISSING", ctime_ns=now, version=node.version + 1)
        change.update(gone, node.version, parent_id=parent_id, name=name_arg(name), removed_entry=True)
        applied.puts.append(gone)
        if node.is_dir:
            for child in self._subtree(node.id):
                if child.state in ("ACTIVE", "INCONSISTENT"):
                    after = child.changed(state="MISSING", version=child.version + 1)
                    change.update(after, child.version)
                    applied.puts.append(after)

    # == helpers ========================================================================
    def _adopt(self, node: Node, st: Stat, backend: Backend) -> Node:
        owner = (st.uid, st.gid) if backend.executor.owns_files else (node.uid, node.gid)
        return node.changed(size=st.size if st.kind != "dir" else 0, mode=st.mode, uid=owner[0], gid=owner[1],
                            rdev=st.rdev, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns, atime_ns=st.atime_ns,
                            target=st.target, state="ACTIVE", version=node.version + 1)

    def _new_node(self, backend: Backend, st: Stat) -> Node:
        return Node(self.ids.take(), backend.id, st.kind, st.size if st.kind != "dir" else 0, st.mode,
                    st.uid, st.gid, st.rdev, st.atime_ns, st.mtime_ns, st.ctime_ns, target=st.target,
                    nlink=2 if st.kind == "dir" else 1)

    def _locate(self, backend: Backend, rel: bytes) -> tuple[Node | None, bytes, tuple[int, Node] | None]:
        """(parent directory node, name, (entry id, node) or None); parent None if not known."""
        rel = rel.strip(b"/")
        current = store.load_node(self.db, backend.root_node_id)
        if not rel:
            return current, b"", (0, current)  # the backend root has no entry
        *dirs, name = rel.split(b"/")
        for part in dirs:
            found = store.load_child(self.db, current.id, part)
            if found is None or not found[1].is_dir:
                return None, name, None
            current = found[1]
        return current, name, store.load_child(self.db, current.id, name)

    def _unknown_ancestor(self, backend: Backend, rel: bytes) -> bytes:
        parts = rel.strip(b"/").split(b"/")
        for i in range(1, len(parts)):
            prefix = b"/".join(parts[:i])
            parent, _, found = self._locate(backend, prefix)
            if parent is None or found is None or not found[1].is_dir:
                return prefix
        return rel

    def _moved_node(self, backend: Backend, src: bytes, st: Stat) -> tuple[Node, bytes, Node] | None:
        """(parent, name, node) recorded at `src` if the disk no longer has it: a rename made outside."""
        parent, name, found = self._locate(backend, src)
        if parent is None or found is None or found[1].kind != st.kind or stat_or_none(backend, src) is not None:
            return None
        return parent, name, found[1]

    def _moved_away(self, backend: Backend, rel: bytes) -> bool:
        return bool(self.db.query(
            "SELECT 1 FROM filestore.jobs WHERE queue = %s AND state IN ('queued', 'running')"
            " AND payload->>'from' = %s AND (payload->>'backend')::int = %s LIMIT 1",
            (RECONCILE, rel.hex(), backend.id)))

    def _missing_at(self, backend: Backend, rel: bytes, st: Stat) -> Node | None:
        rows = self.db.query(
            "SELECT node_id FROM filestore.journal_entries WHERE backend_id = %s AND path = %s"
            " AND command = 'reconcile' AND args->>'outcome' = 'missing' ORDER BY id DESC LIMIT 1",
            (backend.id, display_name(rel)))
        if not rows or rows[0][0] is None:
            return None
        node = store.load_node(self.db, rows[0][0])
        return node if node is not None and node.state == "MISSING" and node.kind == st.kind else None

    def _subtree(self, dir_id: int) -> list[Node]:
        rows = self.db.query(
            "WITH RECURSIVE t(id) AS (SELECT node_id FROM filestore.entries WHERE parent_id = %s"
            " UNION SELECT e.node_id FROM filestore.entries e JOIN t ON e.parent_id = t.id) SELECT id FROM t",
            (dir_id,))
        return [n for n in (store.load_node(self.db, r[0]) for r in rows) if n is not None]

    def _compare_listing(self, backend: Backend, rel: bytes, node: Node, source: str, *,
                         recurse: bool = False, extra: dict | None = None) -> int:
        """Queue a job for every name the disk and the database disagree on in one directory.

        With `recurse` (the audit, a directory restored or moved in) every subdirectory is
        looked at too, so the whole subtree is compared, one directory per job.
        """
        try:
            on_disk = dict(backend.executor.listdir(rel))
        except (NotFound, OSError):
            return 0
        recorded = {name: child for _, name, child in store.load_listing(self.db, node.id)}
        owns = backend.executor.owns_files
        names = set(on_disk) ^ set(recorded)
        for name in set(on_disk) & set(recorded):
            st, child = on_disk[name], recorded[name]
            if differs(child, st, owns) or (recurse and st.kind == "dir"):
                names.add(name)
        items = []
        for name in sorted(names):
            child_rel = rel + b"/" + name if rel else name
            st = on_disk.get(name)
            deep = {"deep": True} if st is not None and st.kind == "dir" and recurse else {}
            items.append((job_key(backend.id, child_rel),
                          job_payload(backend.id, child_rel, source=source, **deep, **(extra or {}))))
        self.queue.enqueue_many(RECONCILE, items)
        return len(items)


def _describe(st: Stat | None) -> dict[str, Any] | None:
    if st is None:
        return None
    return {"kind": st.kind, "size": st.size, "mode": st.mode, "uid": st.uid, "gid": st.gid,
            "mtime_ns": st.mtime_ns}


def _describe_node(node: Node | None) -> dict[str, Any] | None:
    if node is None:
        return None
    return {"id": node.id, "kind": node.kind, "size": node.size, "mode": node.mode, "uid": node.uid,
            "gid": node.gid, "mtime_ns": node.mtime_ns, "state": node.state, "version": node.version}
