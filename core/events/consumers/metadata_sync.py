"""metadata-sync: a record per node, kept aligned with create, update, move and delete.

It stands for a downstream metadata service: the records live in a SQLite file of their own
(FILESTORE_METADATA_SYNC_PATH), with the consumer's checkpoint in the same file and the same
transaction. A move rewrites the record's path and the paths of the records below it.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from core.events import outbox as events
from core.events.consumers.base import Checkpoint

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    node_id     INTEGER PRIMARY KEY,
    backend     TEXT,
    path        TEXT,
    kind        TEXT,
    size        INTEGER,
    version     INTEGER NOT NULL,
    state       TEXT,
    journal_id  INTEGER NOT NULL,   -- the last event applied to this record
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_path ON records (backend, path);
CREATE TABLE IF NOT EXISTS checkpoint (
    consumer TEXT PRIMARY KEY, txid INTEGER NOT NULL, journal_id INTEGER NOT NULL,
    idx INTEGER NOT NULL, seq INTEGER
);
"""

_KEEP = {events.CREATED, events.UPDATED, events.RECONCILED, events.DRIFT, events.MISSING}


class MetadataSync:
    name = "metadata-sync"

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def load_checkpoint(self) -> Checkpoint:
        row = self.db.execute("SELECT txid, journal_id, idx, seq FROM checkpoint WHERE consumer = ?",
                              (self.name,)).fetchone()
        return Checkpoint(*row) if row else Checkpoint()

    def apply(self, batch: list[dict], checkpoint: Checkpoint) -> None:
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for event in batch:
                self._apply_one(cur, event)
            cur.execute("INSERT INTO checkpoint (consumer, txid, journal_id, idx, seq) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (consumer) DO UPDATE SET txid = excluded.txid,"
                        " journal_id = excluded.journal_id, idx = excluded.idx, seq = excluded.seq",
                        (self.name, checkpoint.txid, checkpoint.journal_id, checkpoint.index, checkpoint.seq))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    @staticmethod
    def _apply_one(cur: sqlite3.Cursor, event: dict) -> None:
        kind = event["type"]
        if kind == events.DELETED:
            cur.execute("DELETE FROM records WHERE node_id = ?", (event["node_id"],))
            return
        if kind not in _KEEP or event["node_id"] is None:
            return  # (drift on a path with no node yet: nothing to keep until it is adopted)
        old = cur.execute("SELECT path FROM records WHERE node_id = ?", (event["node_id"],)).fetchone()
        cur.execute(
            "INSERT INTO records (node_id, backend, path, kind, size, version, state, journal_id, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET backend = excluded.backend,"
            " path = excluded.path, kind = excluded.kind, size = excluded.size, version = excluded.version,"
            " state = excluded.state, journal_id = excluded.journal_id, updated_at = excluded.updated_at"
            " WHERE excluded.version >= records.version",
            (event["node_id"], event["backend"], event["path"], event["kind"], event["size"], event["version"],
             event["state"], event["journal_id"], event["time"]))
        moved_from = event.get("previous_path") or (old[0] if old and old[0] != event["path"] else None)
        if event["kind"] == "dir" and moved_from and moved_from != event["path"]:
            # A directory moved: the records below it follow (their own events name no new path).
            cur.execute("UPDATE records SET path = ? || substr(path, ?) WHERE backend = ? AND path LIKE ?"
                        " ESCAPE '\\'", (event["path"], len(moved_from) + 1, event["backend"],
                                         _like_prefix(moved_from) + "/%"))

    def records(self) -> dict[int, dict]:
        cur = self.db.execute("SELECT node_id, backend, path, kind, size, version, state, journal_id FROM records")
        cols = [d[0] for d in cur.description]
        return {row[0]: dict(zip(cols, row)) for row in cur.fetchall()}

    def close(self) -> None:
        self.db.close()


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
