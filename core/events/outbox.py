"""Events derived from the journal (docs/design.md section 6): one journal row -> its events.

A committed row gives one node event per snapshot it wrote (the node state after the
command), then one `filestore.command.completed`; a failed row gives the
`command.completed` alone, with its errno. The mapping, by whose command it is:

- the mount, the CLI and recovery: a node at version 1 was created, a node left DELETED was
  deleted, any other change (content, attributes, a rename, a link added or removed) is an
  update; a rename's event has the old path in `previous_path`.
- drift (command `drift`, actor `watcher`, `audit` or `writeback`: a difference found between
  a backend and the journal): `drift.detected`, one per row, also when the path has no node
  yet (a file made behind Filestore's back: `node_id` null, `kind` and `size` as observed).
- the reconciler (actor `reconciler`): a node it left MISSING is `node.missing`, anything else
  it did is `node.reconciled` (a node it left INCONSISTENT, from rows written before drift
  had its own command, is `drift.detected`).
- `backend.add` (the import of a tree) and `backend.remove` write no snapshots: only their
  `command.completed`, whose `result` has the counts imported.

Every event has an `id` unique in the journal: "<journal id>.<index>", and the cursor
(txid, journal_id, index) consumers resume from. `seq` is set by the relay when it publishes
(its contiguous publication number) and is None for events derived directly from the journal.
"""
from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.storage.db import Database

CREATED = "filestore.node.created"
UPDATED = "filestore.node.updated"
DELETED = "filestore.node.deleted"
COMPLETED = "filestore.command.completed"
DRIFT = "filestore.drift.detected"
RECONCILED = "filestore.node.reconciled"
MISSING = "filestore.node.missing"
THRESHOLD = "filestore.threshold.crossed"  # a watch's threshold crossed by a rollup fold (D41)
TYPES = (CREATED, UPDATED, DELETED, COMPLETED, DRIFT, RECONCILED, MISSING, THRESHOLD)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "events.schema.json"

# One journal row with its backend name and snapshots, as the relay and `events tail` read it.
ROWS_SQL = """
SELECT j.id, j.txid::text AS txid, j.command, j.status, j.backend_id, b.name AS backend, j.node_id, j.path,
       j.args, j.result, j.error, j.errno, j.actor, j.uid, j.gid, j.pid, j.completed_at, j.rollup,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('node_id', s.node_id, 'version', s.version, 'data', s.data)
                                  ORDER BY s.node_id, s.version), '[]'::jsonb)
          FROM filestore.snapshots s WHERE s.journal_id = j.id) AS snapshots
  FROM filestore.journal_entries j LEFT JOIN filestore.backend_mounts b ON b.id = j.backend_id
 WHERE (j.txid, j.id) > (%(txid)s::xid8, %(id)s)
   AND j.txid < pg_snapshot_xmin(pg_current_snapshot())
   {extra}
 ORDER BY j.txid, j.id
 LIMIT %(limit)s"""


# The same rows, only how many events each gives: for a publisher nobody listens to.
COUNTS_SQL = """
SELECT j.id, j.txid::text AS txid, j.completed_at,
       1 + CASE WHEN j.status = 'committed'
                THEN (SELECT count(*) FROM filestore.snapshots s WHERE s.journal_id = j.id) ELSE 0 END AS events
  FROM filestore.journal_entries j
 WHERE (j.txid, j.id) > (%(txid)s::xid8, %(id)s)
   AND j.txid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY j.txid, j.id
 LIMIT %(limit)s"""


def final_row_counts(conn, after: tuple[str, int], limit: int) -> list[dict]:
    """Like final_rows, with each row's number of events instead of its content."""
    from psycopg.rows import dict_row
    return conn.cursor(row_factory=dict_row).execute(
        COUNTS_SQL, {"txid": after[0], "id": after[1], "limit": limit}).fetchall()


def final_rows(db_or_conn, after: tuple[str, int] = ("0", 0), limit: int = 1000,
               min_journal_id: int | None = None) -> list[dict]:
    """Journal rows after the (txid, id) cursor whose transactions have all ended, in cursor order.

    A row whose txid is below the snapshot's xmin belongs to a transaction that has ended, so
    no row can later appear before it: the cursor never passes a row that is still to commit.
    """
    extra = "AND j.id > %(min_id)s" if min_journal_id is not None else ""
    params = {"txid": after[0], "id": after[1], "limit": limit, "min_id": min_journal_id}
    sql = ROWS_SQL.format(extra=extra)
    if isinstance(db_or_conn, Database):
        return db_or_conn.query_dicts(sql, params)
    from psycopg.rows import dict_row
    return db_or_conn.cursor(row_factory=dict_row).execute(sql, params).fetchall()


def derive(row: dict) -> list[dict[str, Any]]:
    """The events of one journal row (as `final_rows` returns it), in order."""
    base = {
        "journal_id": row["id"], "txid": str(row["txid"]), "seq": None,
        "time": _iso(row["completed_at"]), "backend": row["backend"], "command": row["command"],
        "status": row["status"],
        "principal": {"actor": row["actor"], "uid": row["uid"], "gid": row["gid"], "pid": row["pid"]},
        # the directory totals the command changed: {"deltas": [{"dirs": [nearest first, ...], ...}]}
        "rollup": {"deltas": row["rollup"]} if row.get("rollup") else None,
    }
    events: list[dict[str, Any]] = []
    args = row["args"] or {}
    if row["status"] == "committed":
        snapshots = row["snapshots"] or []
        for snap in snapshots:
            events.append(_node_event(base, row, snap, len(snapshots)))
        if row["command"] == "drift" and not snapshots:
            observed = args.get("observed") or {}
            events.append({**base, "type": DRIFT, "node_id": row["node_id"], "path": row["path"],
                           "previous_path": None, "kind": observed.get("kind"), "size": observed.get("size"),
                           "version": None, "state": None, "errno": None, "error": None, "result": None})
        if row["command"] == "threshold.crossed":  # written by a rollup fold (schema 11, D41)
            events.append({**base, "type": THRESHOLD, "node_id": row["node_id"], "path": row["path"],
                           "previous_path": None, "kind": "dir", "size": None, "version": None, "state": None,
                           "errno": None, "error": None, "result": {**args, **(row["result"] or {})}})
    events.append({**base, "type": COMPLETED, "node_id": row["node_id"], "path": row["path"],
                   "previous_path": args.get("from") if row["command"] == "rename" else None,
                   "kind": None, "size": None, "version": None, "state": None,
                   "errno": row["errno"], "error": row["error"], "result": row["result"]})
    for index, event in enumerate(events):
        event["index"] = index
        event["id"] = f"{row['id']}.{index}"
    return [_ordered(e) for e in events]


def _node_event(base: dict, row: dict, snap: dict, count: int) -> dict[str, Any]:
    data = snap["data"]
    node_id = snap["node_id"]
    path, previous = _paths(row, node_id, data, count)
    if row["command"] == "drift":
        kind = DRIFT
    elif row["actor"] == "reconciler":
        kind = {"INCONSISTENT": DRIFT, "MISSING": MISSING}.get(data.get("state"), RECONCILED)
    elif data.get("state") == "DELETED":
        kind = DELETED
    elif snap["version"] == 1:
        kind = CREATED
    else:
        kind = UPDATED
    return {**base, "type": kind, "node_id": node_id, "path": path, "previous_path": previous,
            "kind": data.get("kind"), "size": data.get("size"), "version": snap["version"],
            "state": data.get("state"), "errno": None, "error": None, "result": None}


def _paths(row: dict, node_id: int, data: dict, count: int) -> tuple[str | None, str | None]:
    """The backend-relative path of a node a command changed, and its previous one for a move."""
    args = row["args"] or {}
    if row["command"] == "rename":
        if data.get("exchanged"):  # both names exist still, swapped
            return (args.get("to"), args.get("from")) if node_id == row["node_id"] else \
                (args.get("from"), args.get("to"))
        if node_id == row["node_id"]:
            return args.get("to"), args.get("from")
        return args.get("to"), None  # the node the rename replaced
    if node_id == row["node_id"] or count == 1:
        return row["path"], None  # for a link, the new name
    # Several nodes (recover, reconciler): the path in the command's list that ends in its name.
    name = data.get("name")
    for candidate in args.get("paths") or []:
        if isinstance(name, str) and posixpath.basename(candidate) == name:
            return candidate, None
    return row["path"], None


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


_ORDER = ("id", "type", "journal_id", "index", "seq", "txid", "time", "backend", "node_id", "path",
          "previous_path", "kind", "size", "version", "state", "rollup", "principal", "command", "status",
          "errno", "error", "result")


def _ordered(event: dict) -> dict:
    return {k: event[k] for k in _ORDER}


def cursor(event: dict) -> tuple[int, int, int]:
    """Where an event sits in the relay's order: (txid, journal id, index)."""
    return int(event["txid"]), event["journal_id"], event["index"]


def dumps(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), default=str)


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())
