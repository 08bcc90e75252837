"""Time travel over the journal: what a tree looked like, what changed, and who did it.

Every command leaves a snapshot of each node it changed, keyed by its journal row, and the
snapshots of name changes say which entry (parent, name) they bound or freed. So the tree
as of journal row J is: for each directory, the latest binding of each name up to J
(`filestore.entries_as_of`), and for each node its latest snapshot up to J
(`filestore.node_as_of`). A TIME is turned into such a journal id once (`resolve_time`);
everything else works on ids. Directory sizes as of J are today's exact rollup totals less
the rollup deltas the journal recorded after J; a directory's mtime as of J is its own
snapshot's, or the time of the last name change in it after that (directory times are set by
the commands that change their entries, which snapshot the child, not the directory).
"""
from __future__ import annotations

import datetime as dt
import errno
import functools
import os
import re
from dataclasses import dataclass, field

from core.errors import ConfigError, FsError
from core.storage.db import Database

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# == TIME =====================================================================================
def parse_time(text: str, now: dt.datetime | None = None) -> int | dt.datetime:
    """A TIME as the user wrote it: `@JOURNAL_ID` (an int), an age (`90s`, `2h`, `3d`, `1w`:
    that long ago) or ISO 8601 (a date, or date and time; without a zone, local time)."""
    text = text.strip()
    if text.startswith("@"):
        try:
            value = int(text[1:])
        except ValueError:
            raise ConfigError(f"{text!r}: a journal id is @ followed by a number") from None
        if value < 0:
            raise ConfigError(f"{text!r}: journal ids are positive")
        return value
    now = now or dt.datetime.now(dt.timezone.utc)
    age = _AGE.match(text)
    if age:
        return now - dt.timedelta(seconds=float(age.group(1)) * _UNITS[age.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a time: use ISO 8601 (2026-12-07T10:30), an age (2h, 3d) "
                          f"or @JOURNAL_ID") from None
    return when if when.tzinfo is not None else when.astimezone()


def resolve_time(db: Database, text: str) -> int:
    """The journal id a TIME stands for: the last row written at or before it (0: before any)."""
    value = parse_time(text)
    if isinstance(value, int):
        return value
    rows = db.query("SELECT id FROM filestore.journal_entries WHERE created_at <= %s"
                    " ORDER BY created_at DESC, id DESC LIMIT 1", (value,))
    return rows[0][0] if rows else 0


def last_id(db: Database) -> int:
    return db.query("SELECT coalesce(max(id), 0) FROM filestore.journal_entries")[0][0]


# == resolving a path as of a journal id ======================================================
def backend_root(db: Database, backend: str) -> tuple[int, int]:
    """(backend id, root node id) of a backend, active or not (history outlives removal)."""
    rows = db.query("SELECT id, root_node_id FROM filestore.backend_mounts WHERE name = %s"
                    " ORDER BY state = 'active' DESC LIMIT 1", (backend,))
    if not rows:
        raise ConfigError(f"no backend named {backend!r}")
    return rows[0]


def resolve_as_of(db: Database, backend: str, rel: bytes, at: int) -> int:
    """The node that `rel` named after journal row `at`."""
    node_id = backend_root(db, backend)[1]
    for part in filter(None, rel.split(b"/")):
        found = db.query("SELECT node_id FROM filestore.entries_as_of(%s, %s) WHERE name = %s", (node_id, at, part))
        if not found:
            raise FsError(errno.ENOENT, f"{backend}:/{os.fsdecode(rel)}: no such file or directory as of "
                                        f"journal row {at}")
        node_id = found[0][0]
    return node_id


# == ls --as-of ===============================================================================
@dataclass
class Entry:
    name: bytes
    node_id: int
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    nlink: int | None = None
    target: str | None = None

    def as_dict(self) -> dict:
        return {"name": os.fsdecode(self.name), "node_id": self.node_id, "kind": self.kind, "size": self.size,
                "mode": oct(self.mode), "uid": self.uid, "gid": self.gid, "mtime_ns": self.mtime_ns,
                **({"target": self.target} if self.target is not None else {})}


_LISTING = """
SELECT e.name, e.node_id, n.data FROM filestore.entries_as_of(%(dir)s, %(at)s) e
  CROSS JOIN LATERAL filestore.node_as_of(e.node_id, %(at)s) n
 ORDER BY e.name
"""

# Directory sizes then: the exact totals now, less what the journal recorded after `at`.
_DIR_SIZES_LATER = """
SELECT d.dir, coalesce(sum((x->>'size_bytes')::bigint), 0)::bigint
  FROM filestore.journal_entries j, jsonb_array_elements(j.rollup) x,
       LATERAL (SELECT (v #>> '{}')::bigint AS dir FROM jsonb_array_elements(x->'dirs') v) d
 WHERE j.id > %(at)s AND j.rollup IS NOT NULL AND d.dir = ANY(%(dirs)s)
 GROUP BY d.dir
"""

# A directory's mtime then: its own snapshot's, unless a name changed in it later (up to `at`):
# the command that changed it set the directory's times to the changed node's ctime.
_DIR_TIMES = """
SELECT d.id, s.journal_id, (s.data->>'ctime_ns')::bigint
  FROM unnest(%(dirs)s::bigint[]) AS d(id)
  CROSS JOIN LATERAL (
      SELECT journal_id, data FROM (
          SELECT s.journal_id, s.data FROM filestore.snapshots s
           WHERE (s.data->>'parent_id')::bigint = d.id AND s.data ? 'parent_id' AND s.journal_id <= %(at)s
           ORDER BY (s.data->>'parent_id')::bigint DESC, s.journal_id DESC LIMIT 1) a
      UNION ALL
      SELECT journal_id, data FROM (
          SELECT s.journal_id, s.data FROM filestore.snapshots s
           WHERE (s.data->>'from_parent_id')::bigint = d.id AND s.data ? 'from_parent_id' AND s.journal_id <= %(at)s
           ORDER BY (s.data->>'from_parent_id')::bigint DESC, s.journal_id DESC LIMIT 1) b
      ORDER BY journal_id DESC LIMIT 1) s
"""


def _entry(name: bytes, node_id: int, data: dict) -> Entry:
    return Entry(name, node_id, data["kind"], data.get("size", 0), data["mode"], data["uid"], data["gid"],
                 data["mtime_ns"], data.get("nlink"), data.get("target"))


def listing(db: Database, backend: str, rel: bytes, at: int, *, sizes_by: str | None = None) -> list[Entry]:
    """The directory `rel` as it was after journal row `at` (a file: itself alone).
    `sizes_by`: how subdirectory sizes are found, "journal" or "walk" (default: the cheaper)."""
    node_id = resolve_as_of(db, backend, rel, at)
    with db.pool.connection() as conn:
        own = conn.execute("SELECT data FROM filestore.node_as_of(%s, %s)", (node_id, at)).fetchone()
        kind = own[0]["kind"] if own else conn.execute("SELECT kind FROM filestore.nodes WHERE id = %s",
                                                       (node_id,)).fetchone()[0]
        if kind != "dir":
            return [_entry(os.path.basename(rel), node_id, own[0])]
        entries = [_entry(bytes(name), nid, data)
                   for name, nid, data in conn.execute(_LISTING, {"dir": node_id, "at": at}).fetchall()]
        dirs = {e.node_id: e for e in entries if e.kind == "dir"}
        if dirs:
            _directories_then(conn, dirs, at, sizes_by)
    return entries


# Or counted from the subtrees as they were: cost by their size instead of the journal's length.
_DIR_SIZES_WALKED = """
SELECT d.id, (SELECT coalesce(sum((t.data->>'size')::bigint), 0)::bigint FROM filestore.tree_as_of(d.id, %(at)s) t
               WHERE t.depth > 0 AND t.data->>'kind' <> 'dir')
  FROM unnest(%(dirs)s::bigint[]) AS d(id)
"""

# A journal row costs about as much to scan as a tree entry to rebuild times this.
WALK_COST = 20


def _directories_then(conn, dirs: dict[int, Entry], at: int, by: str | None = None) -> None:
    ids = list(dirs)
    now = {row[0]: row[1:] for row in conn.execute(
        "SELECT d.id, t.size_bytes, t.file_count + t.dir_count FROM unnest(%s::bigint[]) AS d(id)"
        " CROSS JOIN LATERAL filestore.rollup_totals(d.id) t", (ids,)).fetchall()}
    if by is None:  # the cheaper way: the journal after `at`, or the subtrees (their size now as a guess)
        later_rows = conn.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0] - at
        by = "journal" if later_rows <= WALK_COST * sum(n for _, n in now.values()) else "walk"
    if by == "journal":
        later = dict(conn.execute(_DIR_SIZES_LATER, {"at": at, "dirs": ids}).fetchall())
        for node_id, entry in dirs.items():
            entry.size = max(0, now.get(node_id, (0, 0))[0] - later.get(node_id, 0))
    else:
        for node_id, size in conn.execute(_DIR_SIZES_WALKED, {"at": at, "dirs": ids}).fetchall():
            dirs[node_id].size = size
    for node_id, mtime_ns in _directory_times(conn, ids, at).items():
        dirs[node_id].mtime_ns = mtime_ns


def directory_times(db: Database, ids: list[int], at: int) -> dict[int, int]:
    """The mtimes directories had after journal row `at` where a name change in them set it
    later than their own snapshot (the others: their snapshot's)."""
    with db.pool.connection() as conn:
        return _directory_times(conn, ids, at)


def _directory_times(conn, ids: list[int], at: int) -> dict[int, int]:
    own_journal = dict(conn.execute(
        "SELECT d.id, n.journal_id FROM unnest(%s::bigint[]) AS d(id)"
        " CROSS JOIN LATERAL filestore.node_as_of(d.id, %s) n", (ids, at)).fetchall())
    return {node_id: ctime_ns for node_id, journal_id, ctime_ns in
            conn.execute(_DIR_TIMES, {"dirs": ids, "at": at}).fetchall()
            if journal_id > own_journal.get(node_id, 0)}


# == history filters ==========================================================================
@dataclass
class HistoryFilter:
    since: int | None = None  # journal ids, inclusive bounds
    until: int | None = None
    uid: int | None = None
    commands: tuple[str, ...] = ()
    limit: int = 1000


_COLUMNS = ("j.id, j.command, j.status, j.node_id, j.path, j.args, j.result, j.errno, j.error, j.actor, j.uid,"
            " j.gid, j.pid, j.request_id::text AS request_id, j.idempotency_key, j.created_at")


def _where(f: HistoryFilter, params: dict) -> str:
    clauses = []
    if f.since is not None:
        clauses.append("j.id >= %(since)s")
        params["since"] = f.since
    if f.until is not None:
        clauses.append("j.id <= %(until)s")
        params["until"] = f.until
    if f.uid is not None:
        clauses.append("j.uid = %(uid)s")
        params["uid"] = f.uid
    if f.commands:
        clauses.append("j.command = ANY(%(commands)s)")
        params["commands"] = list(f.commands)
    return "".join(f" AND {c}" for c in clauses)


def node_history(db: Database, node_id: int, f: HistoryFilter) -> list[dict]:
    params = {"node": node_id, "limit": f.limit}
    return db.query_dicts(
        f"SELECT {_COLUMNS}, (SELECT s.data->>'state' FROM filestore.snapshots s"
        f" WHERE s.journal_id = j.id AND s.node_id = j.node_id) AS state"
        f" FROM filestore.journal_entries j WHERE j.node_id = %(node)s{_where(f, params)} ORDER BY j.id LIMIT %(limit)s",
        params)


def subtree_history(db: Database, backend: str, rel: bytes, f: HistoryFilter) -> list[dict]:
    """Every journal row of the backend whose path was `rel` or below it when it ran (nodes
    that were moved in or out count where they were when the command ran: a rename counts
    under both names)."""
    backend_id = backend_root(db, backend)[0]
    prefix = os.fsdecode(rel).strip("/")
    params = {"backend": backend_id, "prefix": prefix, "like": _like(prefix) + "/%", "limit": f.limit}
    under = "TRUE" if not prefix else "(j.path = %(prefix)s OR j.path LIKE %(like)s OR j.args->>'to' = %(prefix)s" \
                                      " OR j.args->>'to' LIKE %(like)s)"
    return db.query_dicts(
        f"SELECT {_COLUMNS}, (SELECT s.data->>'state' FROM filestore.snapshots s"
        f" WHERE s.journal_id = j.id AND s.node_id = j.node_id) AS state"
        f" FROM filestore.journal_entries j WHERE j.backend_id = %(backend)s AND {under}{_where(f, params)}"
        f" ORDER BY j.id LIMIT %(limit)s", params)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def uid_of(user: str) -> int:
    """A user as a uid: a number, or a name from the password database."""
    if user.isdigit():
        return int(user)
    import pwd
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"no user named {user!r}") from None


# == diff =====================================================================================
@dataclass
class Change:
    kind: str  # created, deleted, modified, moved
    node_id: int
    path: str  # where it is at the later time (deleted: where it was)
    old_path: str | None = None  # moved: where it was
    node_kind: str = "file"
    size_delta: int = 0
    principals: list[str] = field(default_factory=list)
    what: list[str] = field(default_factory=list)  # modified: which attributes

    def as_dict(self) -> dict:
        out = {"change": self.kind, "path": self.path, "node_id": self.node_id, "kind": self.node_kind,
               "size_delta": self.size_delta, "principals": self.principals}
        if self.old_path is not None:
            out["old_path"] = self.old_path
        if self.what:
            out["what"] = self.what
        return out


_TREE = "SELECT node_id, parent_id, path, data FROM filestore.tree_as_of(%s, %s) WHERE depth > 0"
_COMPARED = ("size", "mode", "uid", "gid", "mtime_ns", "checksum", "target", "kind")


def tree(db: Database, top: int, at: int) -> dict[int, tuple[bytes, dict]]:
    """node id -> (path below top, snapshot data) for a subtree as of journal row `at`.
    A node with several names (hard links) appears under its first path."""
    out: dict[int, tuple[bytes, dict]] = {}
    for node_id, _, path, data in db.query(_TREE, (top, at)):
        out.setdefault(node_id, (bytes(path), data))
    return out


def diff(db: Database, backend: str, rel: bytes, start: int, end: int) -> list[Change]:
    """What changed below `rel` between journal rows `start` and `end` (exclusive, inclusive)."""
    try:
        top_then = resolve_as_of(db, backend, rel, start)
    except FsError:
        top_then = None
    top_now = resolve_as_of(db, backend, rel, end)
    before = tree(db, top_then, start) if top_then is not None else {}
    after = tree(db, top_now, end)
    changes: list[Change] = []
    for node_id, (path, data) in after.items():
        if node_id not in before:
            changes.append(Change("created", node_id, os.fsdecode(path), node_kind=data["kind"],
                                  size_delta=_size(data)))
            continue
        old_path, old = before[node_id]
        if old_path != path:
            changes.append(Change("moved", node_id, os.fsdecode(path), os.fsdecode(old_path), data["kind"],
                                  _size(data) - _size(old)))
        what = [k for k in _COMPARED if old.get(k) != data.get(k) and not (k == "mtime_ns" and data["kind"] == "dir")]
        if what:
            changes.append(Change("modified", node_id, os.fsdecode(path), node_kind=data["kind"],
                                  size_delta=_size(data) - _size(old) if old_path == path else 0, what=what))
    for node_id, (path, data) in before.items():
        if node_id not in after:
            changes.append(Change("deleted", node_id, os.fsdecode(path), node_kind=data["kind"],
                                  size_delta=-_size(data)))
    _principals(db, changes, start, end)
    changes.sort(key=lambda c: (c.path, c.kind))
    return changes


def _size(data: dict) -> int:
    return 0 if data.get("kind") == "dir" else int(data.get("size") or 0)


def _principals(db: Database, changes: list[Change], start: int, end: int) -> None:
    ids = sorted({c.node_id for c in changes})
    if not ids:
        return
    who: dict[int, list[str]] = {}
    # Node by node through the snapshots' primary key (a journal id range would be most of the
    # journal for a wide window: measured 6.9 s at 10 M rows, against one index probe per node).
    for node_id, actor, uid in db.query(
            "SELECT DISTINCT n.id, j.actor, j.uid FROM unnest(%s::bigint[]) AS n(id)"
            " CROSS JOIN LATERAL (SELECT s.journal_id FROM filestore.snapshots s WHERE s.node_id = n.id"
            "                      AND s.journal_id > %s AND s.journal_id <= %s OFFSET 0) AS s"  # not flattened
            " JOIN filestore.journal_entries j ON j.id = s.journal_id ORDER BY 1, 2, 3",
            (ids, start, end)):
        who.setdefault(node_id, []).append(principal_name(actor, uid))
    for change in changes:
        change.principals = sorted(who.get(change.node_id, []))


@functools.lru_cache(maxsize=1024)
def principal_name(actor: str, uid: int | None) -> str:
    if uid is None:
        return actor
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except KeyError:
        return f"uid {uid}"


def summary(changes: list[Change]) -> list[dict]:
    """Per directory (of the later path): counts of each kind of change, size delta, principals."""
    dirs: dict[str, dict] = {}
    for c in changes:
        parent = os.path.dirname(c.path)
        row = dirs.setdefault(parent, {"directory": parent or ".", "created": 0, "deleted": 0, "modified": 0,
                                       "moved": 0, "size_delta": 0, "principals": set()})
        row[c.kind] += 1
        row["size_delta"] += c.size_delta
        row["principals"].update(c.principals)
    return [{**row, "principals": sorted(row["principals"])} for _, row in sorted(dirs.items())]
