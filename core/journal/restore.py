"""What `filestore restore PATH --as-of TIME` does, decided from the journal (D41).

The plan compares the subtree as of journal row `at` with the subtree now (both from
`timetravel.tree`, by node id) and lists, in the order they must run:

  move    a node that is still there under another name goes back to its old path
  mkdir   a directory that was deleted is made again (a new node; its old content is listed)
  symlink a deleted symbolic link is made again (its target is in its snapshot)
  create  a deleted empty file is made again (no content to lose)
  chmod / chown / utime   modes, owners and times as they were

and what it cannot do, said plainly: content deleted (a file whose data is gone with its node),
content overwritten since (the file is kept as it is now, its name, mode and owner restored),
a name now taken by a newer node (left alone). Nodes created since are left in place and
counted. The plan is carried out through a running mount by the caller (fsmount.cli), so every
step is an ordinary journaled command with the operator as principal, and disk = database holds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.errors import FsError
from core.journal import timetravel
from core.storage.db import Database


@dataclass
class Step:
    action: str  # move, mkdir, symlink, create, chmod, chown, utime
    path: str  # below the restored directory (for move: the destination)
    node_id: int
    source: str | None = None  # move: where the node is now
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    target: str | None = None  # symlink

    def as_dict(self) -> dict:
        return {k: (oct(v) if k == "mode" and v is not None else v) for k, v in self.__dict__.items()
                if v is not None}


@dataclass
class Plan:
    at: int
    steps: list[Step] = field(default_factory=list)
    cannot: list[dict] = field(default_factory=list)  # {"path", "node_id", "why"}
    left_in_place: list[str] = field(default_factory=list)  # created since: not touched

    def as_dict(self) -> dict:
        return {"as_of_journal_id": self.at, "steps": [s.as_dict() for s in self.steps], "cannot_restore": self.cannot,
                "created_since_left_in_place": self.left_in_place}


def _text(path: bytes) -> str:
    return os.fsdecode(path)


def plan(db: Database, backend: str, rel: bytes, at: int) -> Plan:
    top_then = timetravel.resolve_as_of(db, backend, rel, at)
    last = timetravel.last_id(db)
    try:
        top_now = timetravel.resolve_as_of(db, backend, rel, last)
    except FsError:
        top_now = None
    if top_now is not None and top_now != top_then:
        raise FsError(17, f"{backend}:/{_text(rel)} names another node now than then: restore its parent instead")
    if top_now is None:
        raise FsError(2, f"{backend}:/{_text(rel)} does not exist now: restore its parent instead")
    then = timetravel.tree(db, top_then, at)
    dir_times = timetravel.directory_times(db, [n for n, (_, d) in then.items() if d["kind"] == "dir"], at)
    for node_id, mtime_ns in dir_times.items():
        then[node_id][1]["mtime_ns"] = mtime_ns
    now = timetravel.tree(db, top_now, last)
    out = Plan(at)
    where = {node_id: path for node_id, (path, _) in now.items()}  # current paths, kept up to date by moves
    taken = {path: node_id for node_id, path in where.items()}
    order = sorted(then.items(), key=lambda item: (item[1][0].count(b"/"), item[1][0]))
    content_ok: dict[int, bool] = {}
    for node_id, (path, data) in order:
        kind = data["kind"]
        current = where.get(node_id)
        if current is None:  # gone
            if taken.get(path) is not None:
                out.cannot.append({"path": _text(path), "node_id": node_id,
                                   "why": "deleted, and its name is taken by a newer node (left alone)"})
                continue
            if kind == "dir":
                out.steps.append(Step("mkdir", _text(path), node_id, mode=data["mode"]))
            elif kind == "symlink" and data.get("target") is not None:
                out.steps.append(Step("symlink", _text(path), node_id, target=data["target"]))
            elif kind == "file" and int(data.get("size") or 0) == 0:
                out.steps.append(Step("create", _text(path), node_id, mode=data["mode"]))
            else:
                out.cannot.append({"path": _text(path), "node_id": node_id,
                                   "why": f"{kind} deleted: its content is gone"})
                continue
            taken[path] = node_id
            where[node_id] = path
            content_ok[node_id] = True
            continue
        if current != path:
            holder = taken.get(path)
            if holder is not None and holder != node_id:
                out.cannot.append({"path": _text(path), "node_id": node_id,
                                   "why": f"moved to {_text(current)}, and its old name is taken by a newer node"})
                continue
            out.steps.append(Step("move", _text(path), node_id, source=_text(current)))
            _moved(where, taken, current, path)
        old = data
        new = now[node_id][1]
        same_content = kind == "dir" or all(old.get(k) == new.get(k) for k in ("size", "checksum", "target", "mtime_ns"))
        content_ok[node_id] = same_content
        if not same_content:
            out.cannot.append({"path": _text(path), "node_id": node_id,
                               "why": "content changed since: kept as it is now (name, mode and owner restored)"})
    # Attributes, once every name is in place: modes and owners, then times deepest first (a
    # change inside a directory sets the directory's mtime).
    for node_id, (path, data) in order:
        if node_id not in where or where[node_id] != path:
            continue
        new = now.get(node_id, (None, {}))[1]
        if data["kind"] != "symlink" and data.get("mode") != new.get("mode"):
            out.steps.append(Step("chmod", _text(path), node_id, mode=data["mode"]))
        if (data.get("uid"), data.get("gid")) != (new.get("uid"), new.get("gid")):
            out.steps.append(Step("chown", _text(path), node_id, uid=data["uid"], gid=data["gid"]))
    for node_id, (path, data) in sorted(order, key=lambda item: -item[1][0].count(b"/")):
        if node_id not in where or where[node_id] != path or not content_ok.get(node_id):
            continue
        new = now.get(node_id, (None, {}))[1]
        if data["kind"] != "symlink" and (data["kind"] == "dir" or data.get("mtime_ns") != new.get("mtime_ns")):
            out.steps.append(Step("utime", _text(path), node_id, mtime_ns=data["mtime_ns"]))
    out.left_in_place = sorted(_text(where[n]) for n in now if n not in then)
    return out


def _moved(where: dict[int, bytes], taken: dict[bytes, int], source: bytes, dest: bytes) -> None:
    """A node moved from `source` to `dest`: it and everything below it have new paths."""
    prefix = source + b"/"
    for node_id, path in list(where.items()):
        if path == source or path.startswith(prefix):
            new = dest + path[len(source):]
            del taken[path]
            where[node_id] = new
    for node_id, path in where.items():
        if path == dest or path.startswith(dest + b"/"):
            taken[path] = node_id
