"""What a journal writer records: a command's journal row and everything it changes.

A `Record` is one journal row (`Journal`) with its effect (`Change`): new and updated nodes,
entries removed and added, directory times, snapshots, xattrs, rollup deltas and write-back
rows. Its `payload` is one JSON object of `filestore.record_one` (schema.sql), built once when
the command is answered: the same bytes go to the intent log (so a crashed mount replays the
command as itself) and, in a group, to the one statement that records them
(`statement`, run by core.journal.pipeline).
"""
from __future__ import annotations

import json
import time
import uuid

import orjson
from dataclasses import dataclass, field
from typing import Any

from core.model import Node, Principal
from core.storage.db import Statement


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

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in (
            ("command", self.command), ("status", self.status), ("backend_id", self.backend_id),
            ("node_id", self.node_id), ("path", self.path), ("args", self.args),
            ("result", self.result), ("error", self.error), ("errno", self.errno),
            ("actor", self.who.actor), ("uid", self.who.uid), ("gid", self.who.gid),
            ("pid", self.who.pid), ("request_id", str(self.request_id)),
            ("idempotency_key", self.idempotency_key)) if v is not None}


@dataclass
class Upload:
    """A write-back row (filestore.uploads): content recorded, not in S3 yet (core.commands.writeback)."""
    node_id: int
    backend_id: int
    spool: str
    owner: str
    path: bytes
    size: int
    mtime_ns: int
    request_id: uuid.UUID


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
    uploads_added: list[Upload] = field(default_factory=list)
    uploads_landed: list[tuple[int, str]] = field(default_factory=list)  # (node, spool)
    # Names a conflict's adoption read from the backend, and when (see filestore.name_adoptions)
    adopted_names: list[tuple[int, bytes]] = field(default_factory=list)
    adopted_at_ns: int = 0
    # What the moves changed as this process's served rollups computed it when answering (not
    # recorded: the commit computes the same in SQL; core.rollups.folder.RollupView)
    view_moves: dict[int, list[int]] = field(default_factory=dict)

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

    # -- what it touched, for the effects after commit --------------------------------
    def nodes_touched(self) -> set[int]:
        out = {n.id for n in self.new_nodes}
        out.update(n.id for n, _ in self.updates)
        return out

    def dirs_touched(self) -> set[int]:
        out = {link[0] for link in self.links}
        out.update(parent for parent, _, _ in self.unlinks)
        out.update(d for d, _ in self.touches)
        return out

    def names_removed(self) -> set[tuple[int, bytes]]:
        return {(parent, name) for parent, name, _ in self.unlinks}

    def names_changed(self) -> set[tuple[int, bytes]]:
        """Names removed or added: other mounts' kernels drop their entries (a negative one too)."""
        return self.names_removed() | {(link[0], link[1]) for link in self.links}


@dataclass
class Record:
    """One journal row and its change."""
    journal: Journal
    change: Change = field(default_factory=Change)

    @property
    def request_id(self) -> uuid.UUID:
        return self.journal.request_id

    def payload(self) -> str:
        """This record as one command object of filestore.record_commands."""
        c = self.change
        out: dict[str, Any] = {"j": self.journal.row()}
        if self.journal.who.actor == "fuse":
            # When it was carried out: its names must not have been adopted from the backend
            # since (another mount's conflict read them later: filestore.name_adoptions).
            out["at"] = time.time_ns()
        if c.new_nodes:
            out["n"] = [_node_json(n) for n in c.new_nodes]
        if c.updates:
            out["u"] = [{"node": _node_json(n), "expected": v} for n, v in c.updates]
        if c.unlinks:
            out["ul"] = [{"parent_id": p, "name": name.hex(), "node_id": n} for p, name, n in c.unlinks]
        if c.links:
            out["l"] = [{"parent_id": link[0], "name": link[1].hex(), "node_id": link[2],
                         "entry_id": link[3] if len(link) > 3 else None} for link in c.links]
        if c.touches:
            out["t"] = [{"id": d, "time_ns": t} for d, t in c.touches]
        if c.snapshots:
            out["s"] = [{"node_id": n, "version": v, "data": d} for n, v, d in c.snapshots]
        deltas = c.delta_rows()
        if deltas:
            out["d"] = deltas
        if c.moves:
            out["m"] = [{"node_id": n, "from": old, "to": new} for n, old, new in c.moves]
        if c.xattrs:
            out["x"] = [{"node_id": n, "name": name.hex(), "value": None if v is None else v.hex()}
                        for n, name, v in c.xattrs]
        if c.uploads_added:
            out["up"] = [{"node_id": u.node_id, "backend_id": u.backend_id, "spool": u.spool, "owner": u.owner,
                          "path": u.path.hex(), "size": u.size, "mtime_ns": u.mtime_ns,
                          "request_id": str(u.request_id)} for u in c.uploads_added]
        if c.adopted_names:
            out["an"] = [{"parent_id": p, "name": name.hex(), "at": c.adopted_at_ns} for p, name in c.adopted_names]
        if c.uploads_landed:
            out["upd"] = [{"node_id": n, "spool": s} for n, s in c.uploads_landed]
        return orjson.dumps(out).decode()  # on every command's path: 12x the standard json here


def _node_json(node: Node) -> dict[str, Any]:
    return {"id": node.id, "backend_id": node.backend_id, "kind": node.kind, "size": node.size,
            "mode": node.mode, "uid": node.uid, "gid": node.gid, "rdev": node.rdev,
            "atime_ns": node.atime_ns, "mtime_ns": node.mtime_ns, "ctime_ns": node.ctime_ns,
            "symlink_target": node.target.hex() if node.target is not None else None,
            "checksum": node.checksum, "state": node.state, "version": node.version}


RECORD_SQL = "SELECT request_id, journal_id FROM filestore.record_commands(%s::jsonb, %s::jsonb, %s)"


def statement(payloads: list[str], atimes: list[tuple[int, int]] = (), *, sync: bool = False) -> Statement:
    """The one statement that records commands in order (returns request id, journal id of
    each). Every journal row is written by it: in the pipeline's group commits, and inside
    the few transactions that do set-based work of their own (a rollup recalculation, an
    import), which send it on their own connection."""
    return RECORD_SQL, ("[" + ",".join(payloads) + "]", json.dumps(list(atimes)), sync)


def record_in(conn, records: list[Record]) -> list[tuple]:
    """Record inside a transaction of the caller's own (set-based work: a rollup
    recalculation, an import, a backend removal), with the one statement; returns (request id,
    journal id) of each. The pipeline's group commits send the same statement."""
    return conn.execute(*statement([r.payload() for r in records])).fetchall()
