"""Drift as visible state, and what an operator does about it (seed 001's node lifecycle).

- `pending`: what is not ACTIVE (`filestore drift ls`): nodes INCONSISTENT (drift seen, not
  adopted: a backend in observe-only mode, or a job that has not run yet) or MISSING (gone from
  the backend: they lost their names), and paths where drift was journaled on a backend in
  observe-only mode that have no node (UNTRACKED: made behind Filestore's back, not adopted),
  each with when and how it was found.
- `purge`: the seed's `purge_confirmed`, MISSING -> DELETED, journaled as `purge`: the node (and
  the subtree of a MISSING directory) is gone for good; its history stays.
- `adopt`: rollout phase 1 to 2 for some paths: what was observed under a path is reconciled
  now (journaled as `reconcile` rows naming the operator), by the reconcile workers of a live
  mount or sidecar (so a mount shows it), or in this process when none runs.

Paths of nodes that lost their names are the ones they were journaled with when they went
(the `reconcile` row with outcome missing), found through `journal_drift_idx`.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from core.errors import ConfigError
from core.journal import history
from core.journal.pipeline import Pipeline
from core.journal.records import Change, Journal, Record
from core.model import Node, Principal, display_name, name_arg
from core.observe.progress import Callback, Meter
from core.rollups import deltas
from core.storage import store
from core.storage.db import Database
from core.storage.queue import RECONCILE, JobQueue
from executors.base import ExecutorError, NotFound

UNTRACKED = "UNTRACKED"
ADOPT_WAIT_SECONDS = float(os.environ.get("FILESTORE_ADOPT_WAIT_SECONDS", "60"))


@dataclass
class Drifted:
    backend: str
    path: str
    state: str  # INCONSISTENT, MISSING or UNTRACKED
    node_id: int | None
    kind: str | None
    since: datetime | None  # when the node entered this state
    found_at: datetime | None  # the drift row: when and by whom (watcher, audit, writeback)
    found_by: str | None
    journal_id: int | None  # of that drift row
    observed: dict | None = None  # what the backend held, as the drift row says
    recorded: dict | None = None  # what the journal held then
    observe_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        for key in ("since", "found_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


# Every node not ACTIVE with its path: up its entries to the backend root, or to the node that
# lost its name (a MISSING directory, or the node itself), whose path is the one it went with.
_NODES = """
WITH RECURSIVE drifted AS (
    SELECT n.id, n.backend_id, n.kind, n.state, n.version FROM filestore.nodes n
      JOIN filestore.backend_mounts b ON b.id = n.backend_id AND b.state = 'active'
     WHERE n.state IN ('INCONSISTENT', 'MISSING') AND (%(backend)s::int IS NULL OR n.backend_id = %(backend)s)),
up(node_id, cur, path, depth) AS (
    SELECT d.id, d.id, ''::bytea, 0 FROM drifted d
    UNION ALL
    SELECT u.node_id, e.parent_id,
           CASE WHEN u.depth = 0 THEN e.name ELSE e.name || '\\x2f'::bytea || u.path END, u.depth + 1
      FROM up u JOIN filestore.entries e ON e.node_id = u.cur WHERE u.depth < 4096),
ends AS (SELECT DISTINCT ON (node_id) node_id, cur, path, depth FROM up ORDER BY node_id, depth DESC)
SELECT d.id, b.name, b.options, d.kind, d.state, x.path, x.depth,
       CASE WHEN x.cur = b.root_node_id THEN NULL ELSE
           (SELECT j.path FROM filestore.journal_entries j WHERE j.node_id = x.cur AND j.path IS NOT NULL
             ORDER BY j.id DESC LIMIT 1) END AS lost_at,
       (SELECT j.completed_at FROM filestore.snapshots s JOIN filestore.journal_entries j ON j.id = s.journal_id
         WHERE s.node_id = d.id AND s.version = d.version) AS since,
       f.id AS drift_id, f.completed_at AS found_at, f.actor AS found_by, f.args AS drift_args
  FROM drifted d JOIN ends x ON x.node_id = d.id
  JOIN filestore.backend_mounts b ON b.id = d.backend_id
  LEFT JOIN LATERAL (SELECT j.id, j.completed_at, j.actor, j.args FROM filestore.journal_entries j
                      WHERE j.node_id IN (d.id, x.cur) AND j.command = 'drift' ORDER BY j.id DESC LIMIT 1) AS f ON true
"""

# Drift journaled on a path with no node (observe-only) that nothing resolved since.
_UNTRACKED = """
SELECT DISTINCT ON (d.backend_id, d.path) d.id, b.name, b.options, d.path, d.completed_at, d.actor, d.args
  FROM filestore.journal_entries d JOIN filestore.backend_mounts b ON b.id = d.backend_id AND b.state = 'active'
 WHERE d.command = 'drift' AND d.status = 'committed' AND d.node_id IS NULL
   AND (%(backend)s::int IS NULL OR d.backend_id = %(backend)s)
   AND NOT EXISTS (SELECT 1 FROM filestore.journal_entries r
                    WHERE r.backend_id = d.backend_id AND r.path = d.path AND r.id > d.id
                      AND r.command IN ('reconcile', 'purge'))
 ORDER BY d.backend_id, d.path, d.id DESC
"""


def _backend_id(db: Database, name: str) -> tuple[int, int]:
    rows = db.query("SELECT id, root_node_id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                    (name,))
    if not rows:
        raise ConfigError(f"no backend named {name!r}")
    return rows[0]


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.strip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def pending(db: Database, backend: str | None = None, rel: bytes = b"") -> list[Drifted]:
    """Everything not ACTIVE, at or under `rel` of `backend` (all backends when None), by path."""
    backend_id = _backend_id(db, backend)[0] if backend is not None else None
    prefix = os.fsdecode(rel).strip("/")
    out: list[Drifted] = []
    for row in db.query_dicts(_NODES, {"backend": backend_id}):
        path = bytes(row["path"]).decode("utf-8", "backslashreplace")
        if row["lost_at"] is not None:  # below (or at) a node that lost its name
            path = "/".join(p for p in (row["lost_at"], path) if p)
        if not _under(path, prefix):
            continue
        args = row["drift_args"] or {}
        out.append(Drifted(row["name"], path, row["state"], row["id"], row["kind"], row["since"],
                           row["found_at"], row["found_by"], row["drift_id"], args.get("observed"),
                           args.get("recorded"), bool((row["options"] or {}).get("observe_only"))))
    for row in db.query_dicts(_UNTRACKED, {"backend": backend_id}):
        if not _under(row["path"] or "", prefix):
            continue
        args = row["args"] or {}
        observed = args.get("observed") or {}
        out.append(Drifted(row["name"], row["path"], UNTRACKED, None, observed.get("kind"), row["completed_at"],
                           row["completed_at"], row["actor"], row["id"], args.get("observed"), None,
                           bool((row["options"] or {}).get("observe_only"))))
    out.sort(key=lambda d: (d.backend, d.path, d.node_id or 0))
    return out


# == purge: MISSING -> DELETED =======================================================
def purge(db: Database, pipeline: Pipeline, backend: str, rel: bytes, who: Principal) -> list[Drifted]:
    """Every MISSING node at or under the path (a MISSING directory with its subtree) becomes
    DELETED: one `purge` row per node that lost its name, naming all it deleted. Returns the
    nodes purged; raises ConfigError when nothing there is MISSING."""
    backend_id, _ = _backend_id(db, backend)
    found = [d for d in pending(db, backend, rel) if d.state == "MISSING"]
    if not found:
        raise ConfigError(f"nothing MISSING at {backend}:/{os.fsdecode(rel).strip('/')} (see `filestore drift ls`)")
    backends = store.load_backends(db)
    tree = deltas.DbTree(db, backends)
    purged: list[Drifted] = []
    ids = {d.node_id for d in found}
    parents = {d.node_id: store.load_parent(db, d.node_id) for d in found}
    tops = [d for d in found if parents[d.node_id] is None or parents[d.node_id][0] not in ids]
    for top in tops:
        change = Change()
        names: list[str] = []
        now = time.time_ns()
        stack: list[tuple[int, str, tuple[int, bytes] | None]] = [(top.node_id, top.path, parents[top.node_id])]
        while stack:
            node_id, path, entry = stack.pop()
            node = store.load_node(db, node_id)
            names.append(path)
            after = node.changed(state="DELETED", nlink=0, ctime_ns=now, version=node.version + 1)
            if entry is None:  # the node that lost its name: it has none to remove
                change.update(after, node.version)
            else:  # below a MISSING directory: its name there goes too
                change.unlinks.append((entry[0], entry[1], node_id))
                change.update(after, node.version, parent_id=entry[0], name=name_arg(entry[1]), removed_entry=True)
            for _, name, child in store.load_listing(db, node_id) if node.is_dir else []:
                if child.state == "MISSING":
                    stack.append((child.id, f"{path}/{display_name(name)}", (node_id, name)))
        journal = Journal("purge", "committed", who, uuid.uuid4(), backend_id, top.node_id, top.path,
                          {"confirmed": True, "paths": sorted(names)}, result={"nodes_deleted": len(names)})
        deltas.derive(tree, [change])
        pipeline.wait(pipeline.submit([Record(journal, change)], log_intent=False))
        purged += [d for d in found if d.path == top.path or d.path.startswith(top.path + "/")]
    return purged


# == adopt: what was observed, reconciled now ========================================
def adopt(db: Database, backend: str, rel: bytes, who: Principal, *, run_here=None,
          timeout: float | None = None) -> list[Drifted]:
    """Queue a reconcile job that adopts each path under `rel` with drift not adopted
    (INCONSISTENT, UNTRACKED), and wait until none is left. `run_here`: called (with a stop
    event) to run the jobs in this process when no mount or sidecar runs reconcile workers."""
    from core.repair.reconcile import job_key, job_payload

    backend_id, _ = _backend_id(db, backend)
    todo = [d for d in pending(db, backend, rel) if d.state in ("INCONSISTENT", UNTRACKED)]
    if not todo:
        raise ConfigError(f"nothing to adopt at {backend}:/{os.fsdecode(rel).strip('/')} (see `filestore drift ls`)")
    operator = {"uid": who.uid, "gid": who.gid, "pid": who.pid, "actor": who.actor}
    items = []
    for d in todo:
        path = os.fsencode(d.path)
        items.append((job_key(backend_id, path), job_payload(backend_id, path, source="audit", adopt=operator)))
    JobQueue(db).enqueue_many(RECONCILE, items)
    stop = threading.Event()
    runner = None
    if run_here is not None and not reconcilers_running(db):
        runner = threading.Thread(target=run_here, args=(stop,), name="adopt", daemon=True)
        runner.start()
    deadline = time.monotonic() + (ADOPT_WAIT_SECONDS if timeout is None else timeout)
    try:
        while True:
            left = [d for d in pending(db, backend, rel) if d.state in ("INCONSISTENT", UNTRACKED)]
            queued = db.query("SELECT count(*) FROM filestore.jobs WHERE queue = %s AND payload ? 'adopt'"
                              " AND (payload->>'backend')::int = %s", (RECONCILE, backend_id))[0][0]
            if not left and not queued:
                return todo
            if time.monotonic() > deadline:
                raise ConfigError(f"{len(left)} path(s) not adopted yet (a mount or sidecar runs the jobs;"
                                  f" is one running?): {', '.join(d.path for d in left[:5])}")
            time.sleep(0.1)
    finally:
        stop.set()
        if runner is not None:
            runner.join(30)


def reconcilers_running(db: Database) -> bool:
    """Does a live mount (with inline loops) or sidecar run reconcile workers?"""
    return bool(db.query(
        "SELECT 1 FROM filestore.processes WHERE stopped_at IS NULL AND heartbeat_at > now() - interval '15 seconds'"
        " AND (role = 'sidecar' OR (info->>'inline_loops')::boolean) LIMIT 1"))


class Session:
    """What the CLI needs to journal (`purge`) or reconcile (`adopt` with no live worker): a
    pipeline of its own (with a Redis, running mounts hear what changed: D23), closed after."""

    def __init__(self, db: Database, settings):
        from core.view.cache import Announcements, open_cache

        self.db = db
        self.settings = settings
        self.cache = open_cache(settings.redis_url)
        self.pipeline = Pipeline(db, listeners=[Announcements(self.cache)] if self.cache.shared else [],
                                 name="cli-committer")

    def run_reconcilers(self, stop: threading.Event) -> None:
        """Reconcile workers in this process until `stop` (no mount or sidecar runs any)."""
        from core.repair.inflight import HomeIntents
        from core.repair.sidecar import Context, Loops, open_backends

        backends = open_backends(self.db)
        ctx = Context(self.db, self.settings, JobQueue(self.db), lambda: backends, "cli", self.pipeline)
        loops = Loops(ctx, in_flight=HomeIntents(self.db, self.settings.home), workers=1, watch=False, audit=False)
        loops.start()
        try:
            stop.wait()
        finally:
            loops.stop()
            for backend in backends.values():
                backend.executor.close()

    def close(self) -> None:
        self.pipeline.close()
        self.cache.close()


# == scan: the backend compared with the database, now ================================
@dataclass
class Found:
    """A difference a scan found: `new` on the backend (not in the database), `gone` from it
    (in the database only), or `changed` (kind, size, mode, owner, mtime or target; or a node
    already marked INCONSISTENT or MISSING)."""
    backend: str
    path: str
    what: str
    observed: dict | None
    recorded: dict | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def scan(db: Database, backend: str, rel: bytes, *, home=None, progress: Callback | None = None) -> list[Found]:
    """Compare the backend with the database at and under `rel`, directory by directory (the
    audit's comparison, core.repair.reconcile, without queueing or changing anything): what
    differs, by path. A new directory on the backend is one difference (not descended); a
    directory gone or become something else counts its recorded subtree as scanned.

    `progress` (core.observe.progress): directories scanned of those the database holds there (its
    rollup, so the total is known before the first listing)."""
    from core.repair.reconcile import _describe, _describe_node, differs
    from core.rollups import totals
    from core.storage.backends import make_executor

    backend_id, _ = _backend_id(db, backend)
    top = history.resolve(db, backend, rel)
    node = store.load_node(db, top)
    if node is None or not node.is_dir:
        raise ConfigError(f"{backend}:/{display_name(rel)} is not a directory: scan its directory")
    known = {b.id: b for b in store.load_backends(db)}[backend_id]

    def dirs_at(ids: list[int]) -> int:  # directories recorded at and below these, from their rollups
        with db.pool.connection() as conn:
            got = totals.totals(conn, ids)
        return sum(got[i].dir_count + 1 for i in ids)

    # The mount's own changes in flight (an upload recorded and not sent, a deletion queued:
    # core.commands.writeback and deletes) are not differences, as the reconciler holds too.
    rows = db.query("SELECT node_id, path FROM filestore.uploads WHERE backend_id = %s", (backend_id,))
    moving_nodes, moving_paths = {r[0] for r in rows}, {bytes(r[1]) for r in rows}
    meter = Meter(progress, "directories scanned")
    total = dirs_at([top])
    executor = make_executor(known, home, read_only=True)
    try:
        owns = executor.owns_files
        found: list[Found] = []
        done = 0
        meter.update(done, total)
        stack: list[tuple[bytes, Node]] = [(rel.strip(b"/"), node)]
        while stack:
            here, dir_node = stack.pop()
            try:
                on_disk = dict(executor.listdir(here))
            except ExecutorError as exc:
                if not isinstance(exc, NotFound):  # the backend away, a permission: no answer
                    raise ConfigError(f"scan of {backend}:/{display_name(here)} stopped: {exc}") from exc
                found.append(Found(backend, display_name(here), "gone", None, _describe_node(dir_node)))
                done += dirs_at([dir_node.id])
                meter.update(done, total)
                continue
            recorded = {name: child for _, name, child in store.load_listing(db, dir_node.id)}
            skipped: list[int] = []
            for name in sorted(set(on_disk) | set(recorded)):
                key = here + b"/" + name if here else name
                path = display_name(key)
                st, child = on_disk.get(name), recorded.get(name)
                if key in moving_paths or (child is not None and child.id in moving_nodes):
                    continue
                if child is None:
                    found.append(Found(backend, path, "new", _describe(st), None))
                    continue
                if st is None:
                    found.append(Found(backend, path, "gone", None, _describe_node(child)))
                elif differs(child, st, owns):
                    found.append(Found(backend, path, "changed", _describe(st), _describe_node(child)))
                if child.is_dir and st is not None and st.kind == "dir":
                    stack.append((here + b"/" + name if here else name, child))
                elif child.is_dir:
                    skipped.append(child.id)
            done += 1 + (dirs_at(skipped) if skipped else 0)
            meter.update(done, max(total, done))
    finally:
        executor.close()
    meter.finish()
    found.sort(key=lambda f: f.path)
    return found
