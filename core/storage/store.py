"""Loading rows: backends, nodes, listings, names (what commands record is core.journal.records)."""
from __future__ import annotations

from core.model import Backend, Node
from core.storage.db import Database

_NODE_COLS = ("n.id, n.backend_id, n.kind, n.size, n.mode, n.uid, n.gid, n.rdev, n.atime_ns, n.mtime_ns,"
              " n.ctime_ns, n.version, n.state, n.symlink_target, n.checksum")

# Link count as POSIX reports it: files count their names, directories 2 + subdirectories, read
# from the partial index of entries naming directories (entries.is_dir): what a directory costs is
# its subdirectories, whatever the tree's size or the files below (issue 17: counted through each
# entry's node, a backend root of 1,000 directories of 1,000 files probed 1,000,000 nodes at mount).
_NLINK = ("CASE WHEN n.kind = 'dir' THEN 2 + (SELECT count(*) FROM filestore.entries c WHERE c.parent_id = n.id"
          " AND c.is_dir)"
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
    rows = db.query(LISTING_SQL, (dir_id,))
    rows.sort(key=lambda row: row[0])  # in entry-id order (see LISTING_SQL for why not ORDER BY)
    return [(row[0], bytes(row[1]), _node(row[2:])) for row in rows]


# Each entry's node by primary key: OFFSET 0 keeps the LATERAL subquery from being flattened
# into a join, which PostgreSQL made a hash join over a sequential scan of every node of the
# database (issue 17: 205 ms for a 1,000-entry directory at 160,000 nodes, growing with the
# tree); probed per entry it costs what the directory holds. No ORDER BY: with it, the plan walked
# the primary key of every entry of the database in id order, filtering on parent_id (the subquery's
# estimated cost drowns the difference, within the planner's fuzz); the caller sorts.
LISTING_SQL = (f"SELECT e.id, e.name, n.* FROM filestore.entries e CROSS JOIN LATERAL"
               f" (SELECT {_NODE_COLS}, {_NLINK} FROM filestore.nodes n WHERE n.id = e.node_id OFFSET 0) n"
               f" WHERE e.parent_id = %s")


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


def load_child(db: Database, parent_id: int, name: bytes) -> tuple[int, Node] | None:
    """One named entry of a directory with its node: (entry id, node), without loading the listing."""
    rows = db.query(
        f"SELECT e.id, {_NODE_COLS}, {_NLINK} FROM filestore.entries e"
        " JOIN filestore.nodes n ON n.id = e.node_id WHERE e.parent_id = %s AND e.name = %s", (parent_id, name))
    return (rows[0][0], _node(rows[0][1:])) if rows else None

