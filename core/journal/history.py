"""Reading the journal: one node's history, the recent log, and path resolution for the CLI."""
from __future__ import annotations

import errno
import os

from core.errors import ConfigError, FsError
from core.storage.db import Database

_COLUMNS = ("id, command, status, node_id, path, args, result, errno, error, actor, uid, gid, pid,"
            " request_id::text AS request_id, idempotency_key, created_at")


def resolve(db: Database, backend_name: str, rel: bytes) -> int:
    """The node id at `rel` (backend-relative, bytes) in the named backend."""
    rows = db.query("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                    (backend_name,))
    if not rows:
        raise ConfigError(f"no backend named {backend_name!r}")
    node_id = rows[0][0]
    for part in filter(None, rel.split(b"/")):
        found = db.query("SELECT node_id FROM filestore.entries WHERE parent_id = %s AND name = %s",
                         (node_id, part))
        if not found:
            raise FsError(errno.ENOENT, f"{backend_name}:/{rel.decode(errors='replace')}: no such file or directory")
        node_id = found[0][0]
    return node_id


def resolve_any(db: Database, backend_name: str, rel: bytes) -> int:
    """Like `resolve`, and a node that lost its name (MISSING, or DELETED by a purge) is found by
    the path it went with (its drift, reconcile or purge rows)."""
    try:
        return resolve(db, backend_name, rel)
    except FsError:
        rows = db.query(
            "SELECT j.node_id FROM filestore.journal_entries j JOIN filestore.backend_mounts b ON b.id = j.backend_id"
            " WHERE b.name = %s AND b.state = 'active' AND j.path = %s AND j.node_id IS NOT NULL"
            " AND j.command IN ('drift', 'reconcile', 'purge')"
            " AND NOT EXISTS (SELECT 1 FROM filestore.entries e WHERE e.node_id = j.node_id)"
            " ORDER BY j.id DESC LIMIT 1", (backend_name, os.fsdecode(rel).strip("/")))
        if not rows:
            raise
        return rows[0][0]


def split_target(target: str, mounts: list[str]) -> tuple[str, bytes]:
    """`backend:/path`, or a path inside one of the given filestore mountpoints."""
    if ":" in target and not target.startswith("/") and not os.path.exists(target):
        backend, _, rel = target.partition(":")
        return backend, os.fsencode(rel.strip("/"))
    path = os.path.abspath(target)
    for mountpoint in sorted(mounts, key=len, reverse=True):
        if path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/"):
            rest = path[len(mountpoint):].strip("/")
            if not rest:
                raise ConfigError("the mount root itself has no history; name a backend or a path in one")
            backend, _, rel = rest.partition("/")
            return backend, os.fsencode(rel)
    raise ConfigError(f"{target} is neither inside a filestore mount nor of the form backend:/path")


def history(db: Database, node_id: int, limit: int = 1000) -> list[dict]:
    """The node's journal rows, each with the node's state after it (`state`: from its snapshot;
    None for a row that did not change the node, a refused command say)."""
    return db.query_dicts(
        f"SELECT {_COLUMNS}, (SELECT s.data->>'state' FROM filestore.snapshots s"
        f" WHERE s.journal_id = j.id AND s.node_id = j.node_id) AS state"
        f" FROM filestore.journal_entries j WHERE node_id = %s ORDER BY id LIMIT %s", (node_id, limit))


def node_state(db: Database, node_id: int) -> str | None:
    rows = db.query("SELECT state FROM filestore.nodes WHERE id = %s", (node_id,))
    return rows[0][0] if rows else None


def recent(db: Database, since: int | None, limit: int, *, uid: int | None = None,
           gid: int | None = None) -> list[dict]:
    """The latest rows, or those after `since`; of one principal's uid and/or gid if given."""
    who = " AND (%(uid)s::int IS NULL OR uid = %(uid)s) AND (%(gid)s::int IS NULL OR gid = %(gid)s)"
    params = {"since": since, "limit": limit, "uid": uid, "gid": gid}
    if since is None:
        rows = db.query_dicts(
            f"SELECT {_COLUMNS} FROM filestore.journal_entries WHERE true{who} ORDER BY id DESC LIMIT %(limit)s",
            params)
        return list(reversed(rows))
    return db.query_dicts(
        f"SELECT {_COLUMNS} FROM filestore.journal_entries WHERE id > %(since)s{who} ORDER BY id LIMIT %(limit)s",
        params)


def last_id(db: Database) -> int:
    return db.query("SELECT coalesce(max(id), 0) FROM filestore.journal_entries")[0][0]
