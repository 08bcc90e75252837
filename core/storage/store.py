"""The SQL of nodes, entries, journal and snapshots: loading rows and building statements.

Statements are returned, not run: the orchestrator sends a command's one statement through
core.db.Database.transaction.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from core.model import Backend, Node, Principal
from core.storage.db import Database, Statement

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


def count_entries(db: Database, dir_id: int, *, up_to: int) -> int:
    """How many entries a directory has, counting no further than up_to."""
    return db.query("SELECT count(*) FROM (SELECT 1 FROM filestore.entries WHERE parent_id = %s LIMIT %s) e",
                    (dir_id, up_to))[0][0]


def load_parent(db: Database, node_id: int) -> tuple[int, bytes] | None:
    rows = db.query("SELECT parent_id, name FROM filestore.entries WHERE node_id = %s ORDER BY id LIMIT 1",
                    (node_id,))
    return (rows[0][0], bytes(rows[0][1])) if rows else None


def load_parents(db: Database, node_id: int) -> list[int]:
    """The directory of every name of a node (several for a hard-linked file)."""
    return [r[0] for r in db.query("SELECT parent_id FROM filestore.entries WHERE node_id = %s", (node_id,))]


def find_by_idempotency_key(db: Database, key: str) -> dict | None:
    rows = db.query_dicts(
        "SELECT id, command, status, node_id, result, errno, error FROM filestore.journal_entries"
        " WHERE idempotency_key = %s", (key,))
    return rows[0] if rows else None


# -- recording a command ----------------------------------------------------------------
@dataclass
class Change:
    """Everything one command changes in the database, recorded atomically with its journal row."""
    new_nodes: list[Node] = field(default_factory=list)
    updates: list[tuple[Node, int]] = field(default_factory=list)  # (node after, expected version)
    unlinks: list[tuple[int, bytes, int]] = field(default_factory=list)  # (parent, name, node)
    links: list[tuple] = field(default_factory=list)  # (parent, name, node[, entry id])
    touches: list[tuple[int, int]] = field(default_factory=list)  # (directory, time ns)
    snapshots: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # (node, version, data)
    xattrs: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)  # (node, name, value; None: remove)
    rollup: dict[int, list[int]] = field(default_factory=dict)  # directory -> [bytes, files, dirs] delta
    moves: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (dir, from chain, to chain)
    # Further statements of the same transaction, sent after the journal row (a write-back
    # upload's row in filestore.uploads: core.commands.writeback)
    statements: list[Statement] = field(default_factory=list)

    def add_delta(self, dirs: list[int], size: int, files: int, subdirs: int) -> None:
        for d in dirs:
            acc = self.rollup.setdefault(d, [0, 0, 0])
            acc[0] += size
            acc[1] += files
            acc[2] += subdirs

    def add_move(self, dir_id: int, old_chain: list[int], new_chain: list[int]) -> None:
        # Ancestors both chains share keep the subtree: only the others change.
        while old_chain and new_chain and old_chain[-1] == new_chain[-1]:
            old_chain, new_chain = old_chain[:-1], new_chain[:-1]
        if old_chain or new_chain:
            self.moves.append((dir_id, old_chain, new_chain))

    def delta_rows(self) -> list[dict[str, Any]]:
        """Directories with the same delta share one row: a create is one row for its whole chain."""
        grouped: dict[tuple[int, int, int], list[int]] = {}
        for d, acc in self.rollup.items():
            if any(acc):
                grouped.setdefault(tuple(acc), []).append(d)
        return [{"dirs": dirs, "size": v[0], "files": v[1], "dirs_count": v[2]} for v, dirs in grouped.items()]

    def update(self, after: Node, expected: int, **snapshot_extra: Any) -> None:
        self.updates.append((after, expected))
        self.snapshots.append((after.id, after.version, after.snapshot(**snapshot_extra)))

    def insert(self, node: Node, **snapshot_extra: Any) -> None:
        self.new_nodes.append(node)
        self.snapshots.append((node.id, node.version, node.snapshot(**snapshot_extra)))


@dataclass(frozen=True)
class Journal:
    command: str
    status: str
    who: Principal
    request_id: uuid.UUID
    backend_id: int | None
    node_id: int | None
    path: str | None
    args: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    errno: int | None = None
    idempotency_key: str | None = None


def _node_json(node: Node) -> dict[str, Any]:
    return {"id": node.id, "backend_id": node.backend_id, "kind": node.kind, "size": node.size,
            "mode": node.mode, "uid": node.uid, "gid": node.gid, "rdev": node.rdev,
            "atime_ns": node.atime_ns, "mtime_ns": node.mtime_ns, "ctime_ns": node.ctime_ns,
            "symlink_target": node.target.hex() if node.target is not None else None,
            "checksum": node.checksum, "state": node.state, "version": node.version}


def record(journal: Journal, change: Change | None = None) -> Statement:
    """The one statement that records a command; returns (journal id, ids of the entries added)."""
    change = change or Change()
    entry = {k: v for k, v in (
        ("command", journal.command), ("status", journal.status), ("backend_id", journal.backend_id),
        ("node_id", journal.node_id), ("path", journal.path), ("args", journal.args),
        ("result", journal.result), ("error", journal.error), ("errno", journal.errno),
        ("actor", journal.who.actor), ("uid", journal.who.uid), ("gid", journal.who.gid),
        ("pid", journal.who.pid), ("request_id", str(journal.request_id)),
        ("idempotency_key", journal.idempotency_key)) if v is not None}
    dumps = json.dumps
    return ("SELECT journal_id, entry_ids FROM filestore.record_command(%s, %s, %s, %s, %s, %s, %s, %s, %s)", (
        dumps(entry),
        dumps([_node_json(n) for n in change.new_nodes]),
        dumps([{"node": _node_json(n), "expected": v} for n, v in change.updates]),
        dumps([{"parent_id": p, "name": name.hex(), "node_id": n} for p, name, n in change.unlinks]),
        dumps([{"parent_id": link[0], "name": link[1].hex(), "node_id": link[2],
                "entry_id": link[3] if len(link) > 3 else None} for link in change.links]),
        dumps([{"id": d, "time_ns": t} for d, t in change.touches]),
        dumps([{"node_id": n, "version": v, "data": d} for n, v, d in change.snapshots]),
        dumps(change.delta_rows()),
        dumps([{"node_id": n, "from": old, "to": new} for n, old, new in change.moves]),
    ))


def xattr_statements(change: Change) -> list[Statement]:
    """The extended-attribute writes of a command, sent in the transaction of its journal row
    (after `record`, so a failed version check there rolls them back too)."""
    out: list[Statement] = []
    for node_id, name, value in change.xattrs:
        if value is None:
            out.append(("DELETE FROM filestore.xattrs WHERE node_id = %s AND name = %s", (node_id, name)))
        else:
            out.append(("INSERT INTO filestore.xattrs (node_id, name, value) VALUES (%s, %s, %s)"
                        " ON CONFLICT (node_id, name) DO UPDATE SET value = EXCLUDED.value",
                        (node_id, name, value)))
    return out


def atime(node_id: int, atime_ns: int) -> Statement:
    """A read's relatime update of a node's atime, outside any command (see Orchestrator.record_atime)."""
    return "UPDATE filestore.nodes SET atime_ns = %s WHERE id = %s AND atime_ns < %s", (atime_ns, node_id, atime_ns)


def load_child(db: Database, parent_id: int, name: bytes) -> tuple[int, Node] | None:
    """One named entry of a directory with its node: (entry id, node), without loading the listing."""
    rows = db.query(
        f"SELECT e.id, {_NODE_COLS}, {_NLINK} FROM filestore.entries e"
        " JOIN filestore.nodes n ON n.id = e.node_id WHERE e.parent_id = %s AND e.name = %s", (parent_id, name))
    return (rows[0][0], _node(rows[0][1:])) if rows else None

