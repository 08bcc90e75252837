"""Event and metadata counters (the scalable-stats design): global, per backend and per path.

Commands write nothing for them. The folder reads the committed journal in transaction-id
windows: every transaction below `pg_snapshot_xmin` of a fresh snapshot has ended, so rows
below that watermark are final and none can appear later, whatever order ids committed in.
Each window is aggregated set-based and added to the counters in one transaction with the
new watermark, so a crash neither loses nor double-counts a window.

Counters: `commands.<command>.<status>` and `bytes.written` per scope; `nodes.<kind>`
(nodes alive by type, from the snapshots: +1 when a node appears, -1 when it is deleted).
Path scopes are `<backend>:/<dir>` for every directory above the node the command touched.
"""
from __future__ import annotations

import psycopg

from core.storage.db import Database

_FOLD = """
WITH window_rows AS (
    SELECT j.id, j.command, j.status, coalesce(b.name, '-') AS backend, coalesce(j.path, '') AS path,
           coalesce((j.args->>'bytes')::bigint, 0) AS bytes
      FROM filestore.journal_entries j LEFT JOIN filestore.backend_mounts b ON b.id = j.backend_id
     WHERE j.txid >= %(low)s AND j.txid < %(high)s),
scoped AS (
    SELECT 'global' AS scope, '' AS scope_key, w.* FROM window_rows w
    UNION ALL SELECT 'backend', w.backend, w.* FROM window_rows w WHERE w.backend <> '-'
    UNION ALL
    -- every directory above the node: '' (the backend root), 'a', 'a/b' for a path 'a/b/c'
    SELECT 'path', w.backend || ':/' || array_to_string((string_to_array(w.path, '/'))[1:k], '/'), w.*
      FROM window_rows w, generate_series(0, greatest(cardinality(string_to_array(w.path, '/')) - 1, 0)) AS k
     WHERE w.backend <> '-'),
node_changes AS (
    SELECT coalesce(b.name, '-') AS backend, s.data->>'kind' AS kind,
           CASE WHEN s.version = 1 AND s.data->>'state' <> 'DELETED' THEN 1
                WHEN s.data->>'state' = 'DELETED' AND (s.data->>'nlink')::int = 0 THEN -1 ELSE 0 END AS delta
      FROM window_rows w JOIN filestore.snapshots s ON s.journal_id = w.id
      JOIN filestore.journal_entries j ON j.id = w.id
      LEFT JOIN filestore.backend_mounts b ON b.id = j.backend_id),
increments AS (
    SELECT scope, scope_key, 'commands.' || command || '.' || status AS counter, count(*) AS value
      FROM scoped GROUP BY 1, 2, 3
    UNION ALL
    SELECT scope, scope_key, 'bytes.written', sum(bytes) FROM scoped WHERE command = 'write' AND status = 'committed'
     GROUP BY 1, 2
    UNION ALL
    SELECT 'global', '', 'nodes.' || kind, sum(delta) FROM node_changes WHERE delta <> 0 GROUP BY 1, 2, 3
    UNION ALL
    SELECT 'backend', backend, 'nodes.' || kind, sum(delta) FROM node_changes WHERE delta <> 0 GROUP BY 1, 2, 3)
INSERT INTO filestore.counters AS c (scope, scope_key, counter, value)
SELECT scope, scope_key, counter, sum(value)::bigint FROM increments GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
ON CONFLICT (scope, scope_key, counter) DO UPDATE SET value = c.value + excluded.value
"""


def fold(conn: psycopg.Connection) -> bool:
    """Fold the journal rows of ended transactions not counted yet; True when there were any."""
    with conn.transaction():
        conn.execute("INSERT INTO filestore.counter_watermark (txid) VALUES ('0'::xid8) ON CONFLICT DO NOTHING")
        low = conn.execute("SELECT txid FROM filestore.counter_watermark FOR UPDATE").fetchone()[0]
        high = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()[0]
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM filestore.journal_entries WHERE txid >= %s AND txid < %s)",
                            (low, high)).fetchone()[0]:
            return False
        conn.execute(_FOLD, {"low": low, "high": high})
        conn.execute("UPDATE filestore.counter_watermark SET txid = %s, updated_at = now()", (high,))
        return True


def read(db: Database, scope: str, scope_key: str) -> dict[str, int]:
    rows = db.query("SELECT counter, value FROM filestore.counters WHERE scope = %s AND scope_key = %s"
                    " ORDER BY counter", (scope, scope_key))
    return {name: value for name, value in rows}


def backends_summary(db: Database) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, name, value in db.query(
            "SELECT scope_key, counter, value FROM filestore.counters WHERE scope = 'backend' ORDER BY 1, 2"):
        out.setdefault(key, {})[name] = value
    return out
