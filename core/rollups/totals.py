"""Directory rollups (docs/design.md section 5): folding deltas into rows, recounting, reading totals.

Commands append deltas (core.rollups.deltas) and never update a rollup row. A folder (`fold`) adds batches of
deltas to the rows; a directory's exact value at any moment is its row plus its pending
deltas (filestore.rollup_totals). A moved directory takes its exact totals along, computed
in the moving command's own statement. `recalculate` rebuilds a subtree set-based, for
trees whose deltas can't be trusted (adopted by recovery or the reconciler, or repaired).

Counting rules, the same for deltas and recounts: a directory's `size_bytes` is the sum of
st_size of the non-directory entries below it, `file_count` the number of those entries (a
file with two names counts twice, as it does for `ls`), `dir_count` the directories below it.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import psycopg

from core.journal import records
from core.model import Principal
from core.observe import metrics
from core.observe.progress import Callback, Meter
from core.storage.db import Database

# Folds take this advisory lock shared (several folders may run: they split batches with
# SKIP LOCKED); a recalculation takes it exclusively, so that it sees every visible delta
# folded and no fold lands between its snapshot and its write.
FOLD_LOCK = 0x524F4C4C  # "ROLL"
FOLD_BATCH = 5000


@dataclass(frozen=True)
class Totals:
    size_bytes: int
    file_count: int
    dir_count: int
    state: str  # exact, pending, stale or rebuilding
    last_calculated_at: float | None  # seconds since the epoch


# -- folding --------------------------------------------------------------------------------
_FOLD = """
WITH batch AS (
    DELETE FROM filestore.rollup_deltas WHERE id IN (
        SELECT id FROM filestore.rollup_deltas ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
    RETURNING dirs, size_bytes, file_count, dir_count),
agg AS (
    SELECT u.dir, sum(b.size_bytes)::bigint AS s, sum(b.file_count)::bigint AS f, sum(b.dir_count)::bigint AS d
      FROM batch b, unnest(b.dirs) AS u(dir) GROUP BY u.dir)
INSERT INTO filestore.rollups AS r (node_id, backend_id, size_bytes, file_count, dir_count,
                                    last_calculated_at, consistency_state)
SELECT agg.dir, n.backend_id, agg.s, agg.f, agg.d, now(), 'stale'
  FROM agg JOIN filestore.nodes n ON n.id = agg.dir ORDER BY agg.dir
ON CONFLICT (node_id) DO UPDATE SET size_bytes = r.size_bytes + excluded.size_bytes,
       file_count = r.file_count + excluded.file_count, dir_count = r.dir_count + excluded.dir_count,
       last_calculated_at = now()
RETURNING r.node_id, r.backend_id, (r.xmax = 0) AS inserted,  -- xmax 0: a new row, not an update
          (SELECT count(*) FROM batch) AS folded
"""


def fold(conn: psycopg.Connection, limit: int = FOLD_BATCH) -> tuple[list[tuple[int, int, bool]], int]:
    """Fold one batch of pending deltas into the rows: (directory, backend, created) for each row
    changed, and how many deltas were folded. A row that did not exist is created `stale`: only
    a recount can make it exact, so the caller queues one. One round trip: the shared lock and
    the fold are one implicit transaction (an autocommit connection, two statements)."""
    if conn.autocommit:
        cur = conn.execute(f"SELECT pg_advisory_xact_lock_shared({FOLD_LOCK:d});\n"
                           + _FOLD % {"limit": int(limit)})
        cur.nextset()  # the first result is the lock's
        rows = cur.fetchall()
    else:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (FOLD_LOCK,))
            rows = conn.execute(_FOLD, {"limit": limit}).fetchall()
    return [row[:3] for row in rows], (rows[0][3] if rows else 0)


def fold_all(conn: psycopg.Connection) -> list[tuple[int, int, bool]]:
    """Fold what is pending now. Deltas committed meanwhile wait for the next call: while
    writers go on, looping until none is left would fold without end (measured: 300 round trips
    a second beside a create burst)."""
    changed: list[tuple[int, int, bool]] = []
    while True:
        batch, folded = fold(conn)
        changed.extend(batch)
        if folded < FOLD_BATCH:
            return changed


def oldest_pending_age(conn: psycopg.Connection) -> tuple[int, float]:
    """Pending deltas and the age in seconds of the oldest (the rollup lag)."""
    count, age = conn.execute(
        "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)"
        " FROM filestore.rollup_deltas").fetchone()
    return count, float(age)


# -- recounting -------------------------------------------------------------------------------
# Every directory of the subtree with the path of directory ids from the subtree's top, then
# each entry counted once for every directory on its parent's path: one pass, set-based.
_RECOUNT = """
WITH RECURSIVE tree(node_id, path) AS (
    SELECT %(top)s::bigint, ARRAY[%(top)s::bigint]
    UNION ALL
    SELECT e.node_id, t.path || e.node_id FROM tree t
      JOIN filestore.entries e ON e.parent_id = t.node_id AND e.is_dir),
counted AS (
    SELECT u.dir,
           sum(CASE WHEN n.kind <> 'dir' THEN n.size ELSE 0 END)::bigint AS s,
           count(*) FILTER (WHERE n.kind <> 'dir') AS f,
           count(*) FILTER (WHERE n.kind = 'dir') AS d
      FROM tree t JOIN filestore.entries e ON e.parent_id = t.node_id
      JOIN filestore.nodes n ON n.id = e.node_id, unnest(t.path) AS u(dir)
     GROUP BY u.dir)
SELECT t.node_id, coalesce(c.s, 0), coalesce(c.f, 0), coalesce(c.d, 0)
  FROM tree t LEFT JOIN counted c ON c.dir = t.node_id
"""


def recount(conn: psycopg.Connection, top: int) -> dict[int, tuple[int, int, int]]:
    """What the rollups of a subtree should be, counted from nodes and entries now."""
    return {row[0]: tuple(row[1:]) for row in conn.execute(_RECOUNT, {"top": top}).fetchall()}


RECALC_BATCH = 5000  # rows written a statement: the unit `progress` counts


def recalculate(db: Database, top: int, who: Principal | None = None, reason: str = "repair",
                progress: Callback | None = None) -> dict[str, int]:
    """Rebuild the rollups of a subtree from a recount and move the difference up to its
    ancestors. Every delta visible in the snapshot is folded first; deltas committed later
    stay pending and fold on top, so nothing is counted twice or lost. Journaled (command
    `rollups.recalculate`, in the same transaction), so it is an event like any command.

    `progress` (core.observe.progress): directories written of the subtree's, batch by batch; the
    recount before is one set-based statement with nothing to count (a note says it runs).
    The result also says how many directories `differed` from the recount."""
    started = time.monotonic()
    meter = Meter(progress, "directories recounted")
    with db.pool.connection() as conn:
        conn.autocommit = True
        conn.execute("SELECT pg_advisory_lock(%s)", (FOLD_LOCK,))
        try:
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                meter.note("folding pending deltas")
                conn.execute(_FOLD, {"limit": 2**62}).fetchall()
                meter.note("recounting the subtree (one statement)")
                fresh = recount(conn, top)
                rows = {r[0]: tuple(r[1:]) for r in conn.execute(
                    "SELECT node_id, size_bytes, file_count, dir_count FROM filestore.rollups"
                    " WHERE node_id = ANY(%s)", (list(fresh),)).fetchall()}
                differed = sum(1 for d, v in fresh.items() if rows.get(d, (0, 0, 0)) != v)
                old = rows.get(top, (0, 0, 0))
                backend_id = conn.execute("SELECT backend_id FROM filestore.nodes WHERE id = %s",
                                          (top,)).fetchone()[0]
                ordered = sorted(fresh.items())
                meter.update(0, len(ordered))
                for at in range(0, len(ordered), RECALC_BATCH):
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO filestore.rollups AS r (node_id, backend_id, size_bytes, file_count,"
                            " dir_count, last_calculated_at, consistency_state)"
                            " VALUES (%s, %s, %s, %s, %s, now(), 'exact') ON CONFLICT (node_id) DO UPDATE SET"
                            " size_bytes = excluded.size_bytes, file_count = excluded.file_count,"
                            " dir_count = excluded.dir_count, last_calculated_at = now(), consistency_state = 'exact'",
                            [(d, backend_id, *v) for d, v in ordered[at:at + RECALC_BATCH]])
                    meter.update(min(at + RECALC_BATCH, len(ordered)), len(ordered))
                diff = [new - prior for new, prior in zip(fresh[top], old)]
                # Each ancestor again from its direct entries and its subdirectories' rows, nearest
                # first: right whether the subtree's row or the ancestors held the error.
                for ancestor in _ancestors_in_db(conn, top):
                    conn.execute(_FROM_CHILDREN, {"dir": ancestor})
                result = {"directories": len(fresh), "size_delta": diff[0], "file_delta": diff[1],
                          "dir_delta": diff[2]}
                records.record_in(conn, [records.Record(records.Journal(
                    "rollups.recalculate", "committed", who or Principal.system("rollups"), uuid.uuid4(),
                    backend_id, top, None, {"reason": reason}, result=result))])
        finally:
            conn.isolation_level = None
            conn.autocommit = True
            conn.execute("SELECT pg_advisory_unlock(%s)", (FOLD_LOCK,))
    metrics.ROLLUP_RECALC_SECONDS.observe(time.monotonic() - started)
    meter.finish()
    return {**result, "differed": differed, "milliseconds": int((time.monotonic() - started) * 1000)}


_FROM_CHILDREN = """
UPDATE filestore.rollups AS r SET size_bytes = c.s, file_count = c.f, dir_count = c.d, last_calculated_at = now()
  FROM (SELECT coalesce(sum(CASE WHEN n.kind = 'dir' THEN coalesce(cr.size_bytes, 0) ELSE n.size END), 0) AS s,
               coalesce(sum(CASE WHEN n.kind = 'dir' THEN coalesce(cr.file_count, 0) ELSE 1 END), 0) AS f,
               coalesce(sum(CASE WHEN n.kind = 'dir' THEN coalesce(cr.dir_count, 0) + 1 ELSE 0 END), 0) AS d
          FROM filestore.entries e JOIN filestore.nodes n ON n.id = e.node_id
          LEFT JOIN filestore.rollups cr ON cr.node_id = n.id
         WHERE e.parent_id = %(dir)s) AS c
 WHERE r.node_id = %(dir)s
"""


def _ancestors_in_db(conn: psycopg.Connection, node_id: int) -> list[int]:
    rows = conn.execute("""
        WITH RECURSIVE up(id, depth) AS (
            SELECT parent_id, 1 FROM filestore.entries WHERE node_id = %s
            UNION ALL
            SELECT e.parent_id, up.depth + 1 FROM up JOIN filestore.entries e ON e.node_id = up.id
             WHERE up.depth < 4096)
        SELECT id FROM up ORDER BY depth""", (node_id,)).fetchall()
    return [r[0] for r in rows]


# -- reading ------------------------------------------------------------------------------------
def totals(conn: psycopg.Connection, dir_ids: list[int]) -> dict[int, Totals]:
    """Exact totals now (rows plus pending deltas) of some directories, in one query."""
    rows = conn.execute("""
        SELECT d.id, t.size_bytes, t.file_count, t.dir_count, t.pending,
               r.consistency_state, extract(epoch FROM r.last_calculated_at)
          FROM unnest(%s::bigint[]) AS d(id)
          CROSS JOIN LATERAL filestore.rollup_totals(d.id) AS t
          LEFT JOIN filestore.rollups r ON r.node_id = d.id""", (dir_ids,)).fetchall()
    return {row[0]: _totals(*row[1:]) for row in rows}


def children_totals(conn: psycopg.Connection, parent_id: int) -> dict[int, Totals]:
    """Exact totals now of every subdirectory of a directory, in one query."""
    rows = conn.execute("""
        WITH kids AS (
            SELECT e.node_id FROM filestore.entries e WHERE e.parent_id = %(parent)s AND e.is_dir),
        pending AS (
            SELECT u.dir, sum(d.size_bytes)::bigint AS s, sum(d.file_count)::bigint AS f,
                   sum(d.dir_count)::bigint AS dc, count(*) AS n
              FROM filestore.rollup_deltas d, unnest(d.dirs) AS u(dir)
             WHERE u.dir IN (SELECT node_id FROM kids) GROUP BY u.dir)
        SELECT k.node_id, coalesce(r.size_bytes, 0) + coalesce(p.s, 0), coalesce(r.file_count, 0) + coalesce(p.f, 0),
               coalesce(r.dir_count, 0) + coalesce(p.dc, 0), coalesce(p.n, 0), r.consistency_state,
               extract(epoch FROM r.last_calculated_at)
          FROM kids k LEFT JOIN filestore.rollups r ON r.node_id = k.node_id
          LEFT JOIN pending p ON p.dir = k.node_id""", {"parent": parent_id}).fetchall()
    return {row[0]: _totals(*row[1:]) for row in rows}


def _totals(size, files, dirs, pending, state, calculated) -> Totals:
    state = state or "stale"
    if pending and state == "exact":
        state = "pending"
    return Totals(size, files, dirs, state, float(calculated) if calculated is not None else None)


def verify(db: Database, top: int) -> list[dict]:
    """Directories of a subtree whose exact totals differ from a recount: [] when all agree."""
    with db.pool.connection() as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            fresh = recount(conn, top)
            have = totals(conn, list(fresh))
        conn.isolation_level = None
    out = []
    for dir_id, (size, files, dirs) in sorted(fresh.items()):
        got = have.get(dir_id)
        if got is None or (got.size_bytes, got.file_count, got.dir_count) != (size, files, dirs):
            out.append({"node_id": dir_id, "expected": {"size_bytes": size, "file_count": files, "dir_count": dirs},
                        "recorded": None if got is None else
                        {"size_bytes": got.size_bytes, "file_count": got.file_count, "dir_count": got.dir_count}})
    return out


def directories_below(conn: psycopg.Connection, top: int, depth: int) -> list[tuple[int, bytes]]:
    """The directories of a subtree down to `depth` levels below `top`, with their relative paths."""
    rows = conn.execute("""
        WITH RECURSIVE t(node_id, path, depth) AS (
            SELECT %(top)s::bigint, ''::bytea, 0
            UNION ALL
            SELECT e.node_id, CASE WHEN t.depth = 0 THEN e.name ELSE t.path || '\\x2f'::bytea || e.name END,
                   t.depth + 1
              FROM t JOIN filestore.entries e ON e.parent_id = t.node_id AND e.is_dir
             WHERE t.depth < %(depth)s)
        SELECT node_id, path FROM t""", {"top": top, "depth": depth}).fetchall()
    return [(r[0], bytes(r[1])) for r in rows]


def backends(db: Database) -> list[tuple[str, int, Totals]]:
    """`filestore du MOUNTPOINT`: (name, root node, exact totals) of every active backend, one snapshot."""
    with db.pool.connection() as conn:
        roots = conn.execute("SELECT name, root_node_id FROM filestore.backend_mounts"
                             " WHERE state = 'active' AND root_node_id IS NOT NULL ORDER BY name").fetchall()
        values = totals(conn, [root for _, root in roots])
    return [(name, root, values[root]) for name, root in roots]


def subtree(db: Database, top: int, depth: int) -> tuple[list[tuple[int, bytes]], dict[int, Totals]]:
    """`filestore du`: the directories down to `depth` below `top` (with their relative paths)
    and their exact totals, in one snapshot."""
    with db.pool.connection() as conn:
        dirs = directories_below(conn, top, depth) if depth else [(top, b"")]
        if not any(d == top for d, _ in dirs):
            dirs.append((top, b""))
        return dirs, totals(conn, [d for d, _ in dirs])
