"""Event and metadata counters (the scalable-stats design, seed 003): global, per backend and
per directory, verified and repaired by subset (docs/architecture.md D21, D40).

Commands write nothing for them. A fold reads the committed journal in windows of snapshots:
a window is every transaction visible in the fold's snapshot and not in the previous fold's
(kept in `counter_watermark.snap`), and the fold runs in that snapshot (REPEATABLE READ), so the
tree it reads is exactly the tree those rows made. The window's counts, and the new snapshot,
commit together: a crash neither loses nor double-counts a window.

Counters of a journal row: `commands.<command>.<status>`, `events.<type>` (its events, as
core/events/outbox.py derives them), `bytes.written`. Of a node: `nodes.<kind>`, 1 while it is
not DELETED. Scopes:
- `global` and `backend`: every row of the journal (of the backend), cumulative; nodes by kind.
- `dir` (key: the directory's node id): the rows and nodes *located* below the directory. A node
  is located where its names are (once per name), or, once it lost its last name, in the
  directory it lost it in: its history stays counted where it happened, its `nodes.<kind>`
  goes to 0 when it is DELETED (a MISSING node still counts, until `drift purge`). So a rename
  moves a node's counts, and a directory's whole subtree, from the old chain of directories
  to the new one (old path down, new path up), and a node that leaves a backend through a
  nested one (`mirror`) leaves that backend's counters with it.

How a window moves `dir` counters (all additive, so the order of the window's rows does not
matter): the window's snapshots say which names it added and removed (`parent_id` with
`added_entry`, `removed_entry`, `from_parent_id`, `exchanged`, or version 1). For a node whose
location changed, what it carried before the window (its rows before it, its `nodes` count and,
for a directory, its own row) leaves the old location and joins the new one; then each node's
counts from the window join its location now. Each amount is added along the chain of
directories above the location in the tree as the snapshot shows it.

`recount` counts a subtree from the tree and the journal alone (the location tree walked down
from the directory, each node's journal rows by node id): `check`/`repair` compare and fix only
the subset asked for, then rebuild each ancestor of a repaired directory from its direct
children.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from core.errors import ConfigError
from core.journal import history, records
from core.model import Principal
from core.observe.progress import Callback, Meter
from core.storage.db import Database

# Folds and checks take this session advisory lock, so that one fold at a time moves the
# watermark (a sidecar and a mount may both fold) and a check reads a folded snapshot.
COUNTER_LOCK = 0x434E5452  # "CNTR"
_ROW = ("j.id, j.command, j.status, j.actor, j.node_id, coalesce(b.name, '-') AS backend,"
        " coalesce((j.args->>'bytes')::bigint, 0) AS bytes")


def _vec(rows: str, keys: Iterable[str]) -> str:
    """SQL: the counters of the journal rows of CTE `rows` (id, command, status, actor, bytes and
    the `keys` columns), as (keys..., counter, value), one row per key and counter."""
    keys = list(keys)
    k = ", ".join(f"r.{c}" for c in keys)
    g = ", ".join(str(i) for i in range(1, len(keys) + 2))
    return f"""
        SELECT {k}, 'commands.' || r.command || '.' || r.status AS counter, count(*)::bigint AS value
          FROM {rows} r GROUP BY {g}
        UNION ALL
        SELECT {k}, 'bytes.written', sum(r.bytes)::bigint FROM {rows} r
         WHERE r.command = 'write' AND r.status = 'committed' GROUP BY {g}
        UNION ALL
        SELECT {k}, 'events.' || filestore.event_type(r.command, r.actor, s.data->>'state', s.version), count(*)::bigint
          FROM {rows} r JOIN filestore.snapshots s ON s.journal_id = r.id WHERE r.status = 'committed' GROUP BY {g}
        UNION ALL
        SELECT {k}, 'events.drift.detected', count(*)::bigint FROM {rows} r
         WHERE r.command = 'drift' AND r.status = 'committed'
           AND NOT EXISTS (SELECT 1 FROM filestore.snapshots s WHERE s.journal_id = r.id) GROUP BY {g}
        UNION ALL
        SELECT {k}, 'events.threshold.crossed', count(*)::bigint FROM {rows} r
         WHERE r.command = 'threshold.crossed' AND r.status = 'committed' GROUP BY {g}
        UNION ALL
        SELECT {k}, 'events.command.completed', count(*)::bigint FROM {rows} r GROUP BY {g}"""


# The window: journal rows visible in this transaction's snapshot and not in the previous fold's.
_WINDOW = f"""
w AS (
    SELECT {_ROW}
      FROM filestore.journal_entries j LEFT JOIN filestore.backend_mounts b ON b.id = j.backend_id
     WHERE j.txid >= pg_snapshot_xmin(%(old)s::pg_snapshot)
       AND NOT pg_visible_in_snapshot(j.txid, %(old)s::pg_snapshot)
       AND pg_visible_in_snapshot(j.txid, %(new)s::pg_snapshot))"""

_FOLD_SCOPES = f"""
WITH {_WINDOW},
scoped AS (
    SELECT 'global'::text AS scope, ''::text AS scope_key, w.* FROM w
    UNION ALL SELECT 'backend', w.backend, w.* FROM w WHERE w.backend <> '-'),
node_changes AS (
    SELECT w.backend, s.data->>'kind' AS kind,
           CASE WHEN s.version = 1 AND s.data->>'state' <> 'DELETED' THEN 1
                WHEN s.data->>'state' = 'DELETED' AND (s.data->>'nlink')::int = 0 THEN -1 ELSE 0 END AS delta
      FROM w JOIN filestore.snapshots s ON s.journal_id = w.id WHERE w.status = 'committed'),
increments AS ({_vec('scoped', ['scope', 'scope_key'])}
    UNION ALL
    SELECT 'global', '', 'nodes.' || kind, sum(delta)::bigint FROM node_changes WHERE delta <> 0 GROUP BY 1, 2, 3
    UNION ALL
    SELECT 'backend', backend, 'nodes.' || kind, sum(delta)::bigint FROM node_changes
     WHERE delta <> 0 AND backend <> '-' GROUP BY 1, 2, 3)
INSERT INTO filestore.counters AS c (scope, scope_key, counter, value)
SELECT scope, scope_key, counter, sum(value)::bigint FROM increments GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
ON CONFLICT (scope, scope_key, counter) DO UPDATE SET value = c.value + excluded.value
"""

# The dir counters of one window (see the module's docstring).
_FOLD_DIRS = f"""
WITH RECURSIVE {_WINDOW},
ws AS (SELECT s.node_id, s.version, s.journal_id, s.data
         FROM w JOIN filestore.snapshots s ON s.journal_id = w.id WHERE w.status = 'committed'),
created AS (SELECT DISTINCT node_id FROM ws WHERE version = 1),
deleted_here AS (SELECT DISTINCT node_id FROM ws WHERE data->>'state' = 'DELETED'),
-- names added (+1) and removed (-1) by the window, per (directory, node)
placed AS (
    SELECT (data->>'parent_id')::bigint AS parent, node_id, 1 AS k FROM ws
     WHERE data ? 'parent_id' AND ((version = 1 AND data->>'state' <> 'DELETED') OR data ? 'added_entry'
                                   OR data ? 'from_parent_id' OR data ? 'exchanged')
    UNION ALL
    SELECT (data->>'parent_id')::bigint, node_id, -1 FROM ws WHERE data ? 'parent_id' AND data ? 'removed_entry'
    UNION ALL
    SELECT (data->>'from_parent_id')::bigint, node_id, -1 FROM ws WHERE data ? 'from_parent_id'
    UNION ALL  -- RENAME_EXCHANGE: each node was where the other one is now
    SELECT (o.data->>'parent_id')::bigint, s.node_id, -1 FROM ws s
      JOIN ws o ON o.journal_id = s.journal_id AND o.node_id <> s.node_id AND o.data ? 'exchanged'
     WHERE s.data ? 'exchanged'),
net AS (SELECT parent, node_id, sum(k)::bigint AS k FROM placed GROUP BY 1, 2 HAVING sum(k) <> 0),
moved AS (SELECT DISTINCT node_id FROM net),
touched AS (SELECT node_id FROM moved UNION SELECT node_id FROM w WHERE node_id IS NOT NULL
            UNION SELECT node_id FROM ws),
now_entries AS (SELECT e.parent_id AS parent, e.node_id, count(*)::bigint AS n
                  FROM touched t JOIN filestore.entries e ON e.node_id = t.node_id GROUP BY 1, 2),
-- where each node is counted now: its names, else where it lost its last one
loc_new AS (
    SELECT parent, node_id, n FROM now_entries
    UNION ALL
    SELECT l.parent, t.node_id, 1 FROM touched t
     CROSS JOIN LATERAL (SELECT (s.data->>'parent_id')::bigint AS parent FROM filestore.snapshots s
                          WHERE s.node_id = t.node_id AND s.data ? 'removed_entry'
                          ORDER BY s.version DESC LIMIT 1) AS l
     WHERE NOT EXISTS (SELECT 1 FROM now_entries e WHERE e.node_id = t.node_id)),
-- and where the moved ones were counted before the window
old_entries AS (
    SELECT parent, node_id, sum(n)::bigint AS n
      FROM (SELECT e.parent, e.node_id, e.n FROM now_entries e JOIN moved m ON m.node_id = e.node_id
            UNION ALL SELECT parent, node_id, -k FROM net) AS x
     GROUP BY 1, 2 HAVING sum(n) > 0),
loc_old AS (
    SELECT parent, node_id, n FROM old_entries
    UNION ALL
    SELECT l.parent, m.node_id, 1 FROM moved m
     CROSS JOIN LATERAL (SELECT (s.data->>'parent_id')::bigint AS parent FROM filestore.snapshots s
                          WHERE s.node_id = m.node_id AND s.data ? 'removed_entry'
                            AND NOT EXISTS (SELECT 1 FROM w WHERE w.id = s.journal_id)
                          ORDER BY s.version DESC LIMIT 1) AS l
     WHERE NOT EXISTS (SELECT 1 FROM old_entries e WHERE e.node_id = m.node_id)),
moves AS (
    SELECT parent, node_id, sum(n)::bigint AS n
      FROM (SELECT l.parent, l.node_id, l.n FROM loc_new l JOIN moved m ON m.node_id = l.node_id
            UNION ALL SELECT parent, node_id, -n FROM loc_old) AS x
     GROUP BY 1, 2 HAVING sum(n) <> 0),
-- what a moved node carried before the window: its rows, its node count, its directory's row
old_rows AS (
    SELECT j.id, j.command, j.status, j.actor, j.node_id, coalesce((j.args->>'bytes')::bigint, 0) AS bytes
      FROM moved m JOIN filestore.journal_entries j ON j.node_id = m.node_id
     WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.id = j.id)),
carried AS ({_vec('old_rows', ['node_id'])}
    UNION ALL
    SELECT m.node_id, 'nodes.' || n.kind, 1 FROM moved m JOIN filestore.nodes n ON n.id = m.node_id
     WHERE m.node_id NOT IN (SELECT node_id FROM created)
       AND NOT (n.state = 'DELETED' AND m.node_id NOT IN (SELECT node_id FROM deleted_here))
    UNION ALL
    SELECT m.node_id, c.counter, c.value FROM moved m
      JOIN filestore.counters c ON c.scope = 'dir' AND c.scope_key = m.node_id::text),
-- what the window added to each node: its rows, and +1/-1 for a node created or deleted
w_nodes AS (SELECT * FROM w WHERE node_id IS NOT NULL),
added AS ({_vec('w_nodes', ['node_id'])}
    UNION ALL
    SELECT t.node_id, 'nodes.' || n.kind,
           (CASE WHEN n.state <> 'DELETED' THEN 1 ELSE 0 END)
           - (CASE WHEN t.node_id IN (SELECT node_id FROM created) THEN 0
                   WHEN n.state = 'DELETED' AND t.node_id NOT IN (SELECT node_id FROM deleted_here) THEN 0
                   ELSE 1 END)
      FROM touched t JOIN filestore.nodes n ON n.id = t.node_id),
at_parent AS (
    SELECT mv.parent, c.counter, mv.n * c.value AS value FROM moves mv JOIN carried c ON c.node_id = mv.node_id
    UNION ALL
    SELECT l.parent, a.counter, l.n * a.value FROM loc_new l JOIN added a ON a.node_id = l.node_id WHERE a.value <> 0),
chain(start, dir, depth) AS (
    SELECT DISTINCT parent, parent, 0 FROM at_parent WHERE parent IS NOT NULL
    UNION ALL
    SELECT c.start, p.parent, c.depth + 1 FROM chain c
     CROSS JOIN LATERAL (SELECT filestore.location_parent(c.dir) AS parent) AS p
     WHERE p.parent IS NOT NULL AND c.depth < 4096),
increments AS (
    SELECT c.dir, a.counter, sum(a.value)::bigint AS value
      FROM at_parent a JOIN chain c ON c.start = a.parent GROUP BY 1, 2)
INSERT INTO filestore.counters AS c (scope, scope_key, counter, value)
SELECT 'dir', dir::text, counter, value FROM increments WHERE value <> 0 ORDER BY 2, 3
ON CONFLICT (scope, scope_key, counter) DO UPDATE SET value = c.value + excluded.value
"""

# What the dir counters of a subtree should be: the location tree walked down from `top`.
_RECOUNT = f"""
WITH RECURSIVE tree(node_id, path, depth) AS (
    SELECT %(top)s::bigint, ARRAY[%(top)s::bigint], 0
    UNION ALL
    SELECT c.node_id, t.path || c.node_id, t.depth + 1
      FROM tree t, filestore.location_children(t.node_id) AS c WHERE c.kind = 'dir' AND t.depth < 4096),
below AS (SELECT c.node_id, c.n, t.path FROM tree t, filestore.location_children(t.node_id) AS c),
located AS (SELECT DISTINCT node_id FROM below),
r AS (SELECT j.id, j.command, j.status, j.actor, j.node_id, coalesce((j.args->>'bytes')::bigint, 0) AS bytes
        FROM located l JOIN filestore.journal_entries j ON j.node_id = l.node_id),
vec AS ({_vec('r', ['node_id'])}
    UNION ALL
    SELECT l.node_id, 'nodes.' || n.kind, 1 FROM located l JOIN filestore.nodes n ON n.id = l.node_id
     WHERE n.state <> 'DELETED')
SELECT t.node_id, v.counter, v.value FROM tree t
  LEFT JOIN (SELECT u.dir, v.counter, sum(b.n * v.value)::bigint AS value
               FROM below b JOIN vec v ON v.node_id = b.node_id, unnest(b.path) AS u(dir)
              GROUP BY 1, 2) AS v ON v.dir = t.node_id
"""

# One directory again from what is directly in it and its subdirectories' rows.
_FROM_CHILDREN = f"""
WITH ch AS (SELECT * FROM filestore.location_children(%(dir)s)),
r AS (SELECT j.id, j.command, j.status, j.actor, j.node_id, coalesce((j.args->>'bytes')::bigint, 0) AS bytes
        FROM ch JOIN filestore.journal_entries j ON j.node_id = ch.node_id),
vec AS ({_vec('r', ['node_id'])}
    UNION ALL
    SELECT ch.node_id, 'nodes.' || n.kind, 1 FROM ch JOIN filestore.nodes n ON n.id = ch.node_id
     WHERE n.state <> 'DELETED'
    UNION ALL
    SELECT ch.node_id, c.counter, c.value FROM ch
      JOIN filestore.counters c ON c.scope = 'dir' AND c.scope_key = ch.node_id::text WHERE ch.kind = 'dir')
SELECT v.counter, sum(ch.n * v.value)::bigint FROM ch JOIN vec v ON v.node_id = ch.node_id GROUP BY 1
"""

_RECOUNT_SCOPE = """
WITH r AS (
    SELECT j.id, j.command, j.status, j.actor, %(key)s::text AS k, coalesce((j.args->>'bytes')::bigint, 0) AS bytes
      FROM filestore.journal_entries j WHERE %(all)s OR j.backend_id = %(backend_id)s)
{vec}
UNION ALL
SELECT %(key)s::text, 'nodes.' || n.kind, count(*)::bigint FROM filestore.nodes n
 WHERE n.state <> 'DELETED' AND (%(all)s OR n.backend_id = %(backend_id)s)
   AND NOT EXISTS (SELECT 1 FROM filestore.backend_mounts b WHERE b.root_node_id = n.id)
 GROUP BY 1, 2
""".format(vec=_vec("r", ["k"]))


# == folding ==========================================================================
def fold(conn: psycopg.Connection) -> bool:
    """Fold the journal rows of the transactions committed since the last fold; True when
    there were any. `conn`: an autocommit connection (the pool's)."""
    with _locked(conn):
        return _fold_in_snapshot(conn)


class _locked:
    """The counter lock (session level, so that the snapshot is taken after it is held), and a
    REPEATABLE READ transaction: every statement inside reads one snapshot."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.autocommit = True
        self.conn.execute("SELECT pg_advisory_lock(%s)", (COUNTER_LOCK,))
        self.conn.autocommit = False
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.tx = self.conn.transaction()
        self.tx.__enter__()
        return self.conn

    def __exit__(self, *exc):
        try:
            return self.tx.__exit__(*exc)
        finally:
            if not self.conn.closed:
                self.conn.isolation_level = None
                self.conn.autocommit = True
                try:
                    self.conn.execute("SELECT pg_advisory_unlock(%s)", (COUNTER_LOCK,))
                except psycopg.Error:
                    pass  # a broken connection took its session lock with it


def _fold_in_snapshot(conn: psycopg.Connection) -> bool:
    conn.execute("INSERT INTO filestore.counter_watermark (txid, snap) VALUES ('0'::xid8, '1:1:'::pg_snapshot)"
                 " ON CONFLICT DO NOTHING")
    old, seeded = conn.execute("SELECT snap::text, dirs_seeded FROM filestore.counter_watermark").fetchone()
    new = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    params = {"old": old, "new": new}
    any_rows = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM filestore.journal_entries j WHERE j.txid >= pg_snapshot_xmin(%(old)s::pg_snapshot)"
        " AND NOT pg_visible_in_snapshot(j.txid, %(old)s::pg_snapshot)"
        " AND pg_visible_in_snapshot(j.txid, %(new)s::pg_snapshot))", params).fetchone()[0]
    if any_rows:
        conn.execute(_FOLD_SCOPES, params)
        if seeded:
            conn.execute(_FOLD_DIRS, params)
    if not seeded:
        _seed_dirs(conn)
    if any_rows or not seeded:
        conn.execute("UPDATE filestore.counter_watermark SET snap = %(new)s::pg_snapshot,"
                     " txid = pg_snapshot_xmin(%(new)s::pg_snapshot), dirs_seeded = true, updated_at = now()", params)
    return any_rows


def _seed_dirs(conn: psycopg.Connection) -> None:
    """The dir counters of every backend counted from the tree and the journal (once: a new
    database, or one upgraded from the path-text counters of schema 7)."""
    conn.execute("DELETE FROM filestore.counters WHERE scope = 'dir'")
    roots = [r[0] for r in conn.execute("SELECT root_node_id FROM filestore.backend_mounts"
                                        " WHERE state = 'active' AND root_node_id IS NOT NULL").fetchall()]
    for root in roots:
        _write_dirs(conn, recount(conn, root))


def seed_backend(conn: psycopg.Connection, root: int) -> None:
    """A backend's imported tree has no snapshots to fold: its dir counters are counted once, in
    the transaction that finishes the import (core.storage.backends)."""
    _write_dirs(conn, recount(conn, root))


# == counting from the source =========================================================
def recount(conn: psycopg.Connection, top: int) -> dict[int, dict[str, int]]:
    """What every dir counter of the subtree at `top` should be (each directory of it, also
    those with nothing counted)."""
    out: dict[int, dict[str, int]] = {}
    for dir_id, counter, value in conn.execute(_RECOUNT, {"top": top}).fetchall():
        values = out.setdefault(dir_id, {})
        if counter is not None and value:
            values[counter] = value
    return out


def _write_dirs(conn: psycopg.Connection, values: dict[int, dict[str, int]]) -> None:
    keys = [str(d) for d in values]
    conn.execute("DELETE FROM filestore.counters WHERE scope = 'dir' AND scope_key = ANY(%s)", (keys,))
    rows = [("dir", str(d), name, v) for d, counted in sorted(values.items()) for name, v in sorted(counted.items())]
    if rows:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO filestore.counters (scope, scope_key, counter, value) VALUES (%s, %s, %s, %s)",
                            rows)


def _recount_scope(conn: psycopg.Connection, scope: str, key: str) -> dict[str, int]:
    backend_id = None
    if scope == "backend":
        found = conn.execute("SELECT id FROM filestore.backend_mounts WHERE name = %s", (key,)).fetchone()
        backend_id = found[0] if found else -1
    rows = conn.execute(_RECOUNT_SCOPE, {"key": key, "all": scope == "global", "backend_id": backend_id}).fetchall()
    return {counter: value for _, counter, value in rows if value}


def _stored(conn: psycopg.Connection, scope: str, keys: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {k: {} for k in keys}
    for key, counter, value in conn.execute(
            "SELECT scope_key, counter, value FROM filestore.counters WHERE scope = %s AND scope_key = ANY(%s)",
            (scope, keys)).fetchall():
        if value:
            out[key][counter] = value
    return out


def _ancestors(conn: psycopg.Connection, node_id: int) -> list[int]:
    rows = conn.execute("""
        WITH RECURSIVE up(id, depth) AS (
            SELECT filestore.location_parent(%s), 1
            UNION ALL
            SELECT filestore.location_parent(up.id), up.depth + 1 FROM up WHERE up.id IS NOT NULL AND up.depth < 4096)
        SELECT id FROM up WHERE id IS NOT NULL ORDER BY depth""", (node_id,)).fetchall()
    return [r[0] for r in rows]


# == verify and repair by subset ======================================================
@dataclass(frozen=True)
class Subset:
    """What `stats verify|repair` looks at: the global counters, one backend's (with the dir
    counters of its whole tree), or the dir counters of one subtree."""
    scope: str  # global, backend or dir
    key: str = ""  # backend name, or the directory's node id
    root: int | None = None  # the directory whose subtree is counted (backend: its root)


@dataclass(frozen=True)
class Difference:
    scope: str
    key: str
    counter: str
    recorded: int
    expected: int


CHECK_BATCH = 5000  # directories compared (and rewritten where they differ) a step


def check(db: Database, subset: Subset, *, repair: bool = False, who: Principal | None = None,
          progress: Callback | None = None) -> list[Difference]:
    """Count the subset again from the journal and the tree and compare it with the counters,
    in one snapshot taken right after a fold; with `repair`, replace what differs (a repaired
    subtree's ancestors are rebuilt from their direct children) and journal it
    (`stats.repair`). Returns the differences found.

    `progress` (core.observe.progress): directories compared of the subtree's, CHECK_BATCH at a time;
    the fold and the recounts before are set-based statements with nothing to count (notes say
    which runs)."""
    meter = Meter(progress, "directories compared")
    with db.pool.connection() as conn, _locked(conn):
        meter.note("folding the journal")
        _fold_in_snapshot(conn)
        differences: list[Difference] = []
        if subset.scope in ("global", "backend"):
            meter.note(f"recounting the {subset.scope} counters (one statement)")
            expected = _recount_scope(conn, subset.scope, subset.key)
            recorded = _stored(conn, subset.scope, [subset.key])[subset.key]
            differences += _diff(subset.scope, subset.key, recorded, expected)
            if repair and differences:
                conn.execute("DELETE FROM filestore.counters WHERE scope = %s AND scope_key = %s",
                             (subset.scope, subset.key))
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO filestore.counters (scope, scope_key, counter, value)"
                                    " VALUES (%s, %s, %s, %s)",
                                    [(subset.scope, subset.key, n, v) for n, v in sorted(expected.items())])
        if subset.root is not None:
            meter.note("recounting the directories (one statement)")
            fresh = sorted(recount(conn, subset.root).items())
            meter.update(0, len(fresh))
            for at in range(0, len(fresh), CHECK_BATCH):
                chunk = dict(fresh[at:at + CHECK_BATCH])
                stored = _stored(conn, "dir", [str(d) for d in chunk])
                found = [x for dir_id, values in chunk.items() for x in _diff("dir", str(dir_id), stored[str(dir_id)],
                                                                                 values)]
                differences += found
                if repair and found:
                    _write_dirs(conn, {int(k): chunk[int(k)] for k in dict.fromkeys(d.key for d in found)})
                meter.update(min(at + CHECK_BATCH, len(fresh)), len(fresh))
            if repair:
                # Each ancestor again from what is directly in it, nearest first: right whether the
                # subtree's rows or the ancestors' held the error.
                for ancestor in _ancestors(conn, subset.root):
                    values = {n: v for n, v in conn.execute(_FROM_CHILDREN, {"dir": ancestor}).fetchall() if v}
                    found = _diff("dir", str(ancestor), _stored(conn, "dir", [str(ancestor)])[str(ancestor)], values)
                    if found:
                        differences += found
                        _write_dirs(conn, {ancestor: values})
        if repair:
            backend_id = None
            if subset.root is not None:
                backend_id = conn.execute("SELECT backend_id FROM filestore.nodes WHERE id = %s",
                                          (subset.root,)).fetchone()[0]
            records.record_in(conn, [records.Record(records.Journal(
                "stats.repair", "committed", who or Principal.current_process(), uuid.uuid4(), backend_id,
                subset.root, None, {"scope": subset.scope, "key": subset.key},
                result={"differences": len(differences)}))])
    meter.finish()
    return differences


def _diff(scope: str, key: str, recorded: dict[str, int], expected: dict[str, int]) -> list[Difference]:
    return [Difference(scope, key, name, recorded.get(name, 0), expected.get(name, 0))
            for name in sorted(set(recorded) | set(expected)) if recorded.get(name, 0) != expected.get(name, 0)]


def subset_of(db: Database, backend: str | None, rel: bytes | None = None) -> tuple[Subset, int | None, str | None]:
    """What a command line names: nothing (global), a backend, or a path in one; returns the
    subset, the node id and its kind (a file has no stored counters: `of_node`)."""
    if backend is None:
        return Subset("global"), None, None
    rows = db.query("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                    (backend,))
    if not rows:
        raise ConfigError(f"no backend named {backend!r}")
    if rel is None:
        return Subset("backend", backend, rows[0][0]), rows[0][0], "dir"
    node_id = history.resolve(db, backend, rel)
    kind = db.query("SELECT kind FROM filestore.nodes WHERE id = %s", (node_id,))[0][0]
    return Subset("dir", str(node_id), node_id if kind == "dir" else None), node_id, kind


# == reading ==========================================================================
def read(db: Database, scope: str, scope_key: str) -> dict[str, int]:
    rows = db.query("SELECT counter, value FROM filestore.counters WHERE scope = %s AND scope_key = %s"
                    " AND value <> 0 ORDER BY counter", (scope, scope_key))
    return {name: value for name, value in rows}


def of_node(db: Database, node_id: int) -> dict[str, int]:
    """The counters of one node (a file named by `filestore stats PATH`): its own journal rows,
    counted now (no row is kept per node)."""
    sql = f"""
        WITH r AS (SELECT j.id, j.command, j.status, j.actor, j.node_id,
                          coalesce((j.args->>'bytes')::bigint, 0) AS bytes
                     FROM filestore.journal_entries j WHERE j.node_id = %(node)s)
        {_vec('r', ['node_id'])}
        UNION ALL
        SELECT n.id, 'nodes.' || n.kind, 1 FROM filestore.nodes n WHERE n.id = %(node)s AND n.state <> 'DELETED'"""
    return {counter: value for _, counter, value in sorted(db.query(sql, {"node": node_id}), key=lambda r: r[1])
            if value}


def backends_summary(db: Database) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, name, value in db.query(
            "SELECT scope_key, counter, value FROM filestore.counters WHERE scope = 'backend' ORDER BY 1, 2"):
        out.setdefault(key, {})[name] = value
    return out
