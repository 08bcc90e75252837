"""The SQL of nodes, entries, journal and snapshots: loading rows and building statements.

Statements are returned, not run: the orchestrator sends a command's statements as one
pipelined transaction through core.db.Database.transaction.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from .db import Database, Statement
from .model import Backend, Node, Principal

_NODE_COLS = ("n.id, n.backend_id, n.kind, n.size, n.mode, n.uid, n.gid, n.rdev, n.atime_ns, n.mtime_ns,"
              " n.ctime_ns, n.version, n.state, n.symlink_target, n.checksum")

# Link count as POSIX reports it: files count their names, directories 2 + subdirectories.
_NLINK = ("CASE WHEN n.kind = 'dir' THEN 2 + (SELECT count(*) FROM filestore.entries c"
          " JOIN filestore.nodes cn ON cn.id = c.node_id WHERE c.parent_id = n.id AND cn.kind = 'dir')"
          " ELSE (SELECT count(*) FROM filestore.entries l WHERE l.node_id = n.id) END")


def _node(row: tuple) -> Node:
    (nid, backend_id, kind, size, mode, uid, gid, rdev, atime, mtime, ctime, version, state,
     target, checksum, nlink) = row
    return Node(nid, backend_id, kind, size, mode, uid, gid, rdev, atime, mtime, ctime, version,
                state, bytes(target) if target is not None else None, checksum, nlink)


# -- loading --------------------------------------------------------------------------
def load_backends(db: Database) -> list[Backend]:
    rows = db.query(
        "SELECT id, name, kind, root, read_only, root_node_id, options FROM filestore.backend_mounts"
        " WHERE state = 'active' ORDER BY name")
    return [Backend(*row) for row in rows]


def load_node(db: Database, node_id: int) -> Node | None:
    rows = db.query(f"SELECT {_NODE_COLS}, {_NLINK} FROM filestore.nodes n WHERE n.id = %s", (node_id,))
    return _node(rows[0]) if rows else None


def load_listing(db: Database, dir_id: int) -> list[tuple[int, bytes, Node]]:
    """Every entry of a directory with its node: (entry id, name, node)."""
    rows = db.query(
        f"SELECT e.id, e.name, {_NODE_COLS}, {_NLINK} FROM filestore.entries e"
        " JOIN filestore.nodes n ON n.id = e.node_id WHERE e.parent_id = %s ORDER BY e.id", (dir_id,))
    return [(row[0], bytes(row[1]), _node(row[2:])) for row in rows]


def load_parent(db: Database, node_id: int) -> tuple[int, bytes] | None:
    rows = db.query("SELECT parent_id, name FROM filestore.entries WHERE node_id = %s ORDER BY id LIMIT 1",
                    (node_id,))
    return (rows[0][0], bytes(rows[0][1])) if rows else None


def find_by_idempotency_key(db: Database, key: str) -> dict | None:
    rows = db.query_dicts(
        "SELECT id, status, node_id, result, errno, error FROM filestore.journal_entries"
        " WHERE idempotency_key = %s", (key,))
    return rows[0] if rows else None


# -- statements -----------------------------------------------------------------------
def insert_node(node: Node) -> Statement:
    return ("INSERT INTO filestore.nodes (id, backend_id, kind, size, mode, uid, gid, rdev, atime_ns,"
            " mtime_ns, ctime_ns, symlink_target, checksum, state, version)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (node.id, node.backend_id, node.kind, node.size, node.mode, node.uid, node.gid, node.rdev,
             node.atime_ns, node.mtime_ns, node.ctime_ns, node.target, node.checksum, node.state,
             node.version))


def update_node(node: Node, expected_version: int) -> Statement:
    """Write every mutable column; abort the transaction unless the row is still at expected_version."""
    return ("WITH u AS (UPDATE filestore.nodes SET size = %s, mode = %s, uid = %s, gid = %s, rdev = %s,"
            " atime_ns = %s, mtime_ns = %s, ctime_ns = %s, checksum = %s, state = %s, version = %s,"
            " updated_at = now() WHERE id = %s AND version = %s RETURNING 1)"
            " SELECT filestore.expect_rows((SELECT count(*) FROM u), 1, %s)",
            (node.size, node.mode, node.uid, node.gid, node.rdev, node.atime_ns, node.mtime_ns,
             node.ctime_ns, node.checksum, node.state, node.version, node.id, expected_version,
             f"node {node.id} changed since version {expected_version}"))


def touch_dir(dir_id: int, mtime_ns: int, ctime_ns: int) -> Statement:
    """Directory times changed by a change of its entries (no new version: the journal has it)."""
    return ("UPDATE filestore.nodes SET mtime_ns = %s, ctime_ns = %s, updated_at = now() WHERE id = %s",
            (mtime_ns, ctime_ns, dir_id))


def insert_entry(parent_id: int, name: bytes, node_id: int) -> Statement:
    return ("INSERT INTO filestore.entries (parent_id, name, node_id) VALUES (%s, %s, %s) RETURNING id",
            (parent_id, name, node_id))


def delete_entry(parent_id: int, name: bytes, node_id: int) -> Statement:
    return ("WITH d AS (DELETE FROM filestore.entries WHERE parent_id = %s AND name = %s AND node_id = %s"
            " RETURNING 1) SELECT filestore.expect_rows((SELECT count(*) FROM d), 1, %s)",
            (parent_id, name, node_id, f"entry {name!r} in {parent_id} changed"))


def journal(command: str, status: str, who: Principal, request_id: uuid.UUID, *,
            backend_id: int | None, node_id: int | None, path: str | None, args: dict[str, Any],
            result: dict[str, Any] | None = None, error: str | None = None, errno: int | None = None,
            idempotency_key: str | None = None,
            snapshots: list[tuple[int, int, dict[str, Any]]] = ()) -> Statement:
    """The journal row and the snapshots it produced; returns the journal id."""
    values = (command, status, backend_id, node_id, path, json.dumps(args),
              json.dumps(result) if result is not None else None, error, errno, who.actor, who.uid,
              who.gid, who.pid, request_id, idempotency_key)
    insert = ("INSERT INTO filestore.journal_entries (command, status, backend_id, node_id, path, args,"
              " result, error, errno, actor, uid, gid, pid, request_id, idempotency_key)"
              " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id")
    if not snapshots:
        return insert, values
    rows = ", ".join(["(%s::bigint, %s::bigint, %s::jsonb)"] * len(snapshots))
    params: list[Any] = list(values)
    for node_id_, version, data in snapshots:
        params += [node_id_, version, json.dumps(data)]
    return (f"WITH j AS ({insert}) INSERT INTO filestore.snapshots (node_id, version, journal_id, data)"
            f" SELECT v.node_id, v.version, j.id, v.data FROM j, (VALUES {rows}) AS v(node_id, version, data)"
            " RETURNING journal_id", params)
