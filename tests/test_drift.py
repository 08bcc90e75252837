"""Drift you can see and act on (issue 15; seed 001's node lifecycle and rollout phase 1).

The events of drift from rows as the watcher, the audit and the reconciler journal them, and
from real out-of-band changes (a local root through the inline watcher, a moto bucket through
the audit) read from the Redis stream with `filestore events tail --json`; `filestore drift ls`,
`purge` (MISSING -> DELETED) and an observe-only backend with `drift adopt`, through real mounts;
the state of a node through the mount (user.filestore.state) and in `history`.
"""
from __future__ import annotations

import json
import uuid

import jsonschema
import psycopg
import pytest

from core.events import outbox as events
from core.storage import schema

VALIDATOR = jsonschema.Draft202012Validator(events.load_schema(),
                                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def valid(batch: list[dict]) -> list[dict]:
    for event in batch:
        VALIDATOR.validate(event)
    return batch


@pytest.fixture
def journal_db(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        schema.apply(conn)
        yield conn


def test_drift_rows_of_the_watcher_and_the_audit_give_drift_detected(journal_db):
    """Drift is journaled with actor watcher or audit (never reconciler): each drift row is one
    drift.detected, also on a path that has no node yet; the reconcile rows that follow give
    node.reconciled or node.missing."""
    backend = journal_db.execute("INSERT INTO filestore.backend_mounts (name, kind, root) VALUES ('b', 'local', '/x')"
                                 " RETURNING id").fetchone()[0]
    node = {"id": 900, "backend_id": backend, "kind": "file", "size": 5, "mode": 420, "uid": 0, "gid": 0, "rdev": 0,
            "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "symlink_target": None, "checksum": None,
            "state": "ACTIVE", "version": 1}

    def record(command: str, actor: str, state: str | None, version: int, *, new: bool = False,
               path: str = "f.txt", observed: dict | None = None) -> None:
        entry = {"command": command, "status": "committed", "actor": actor, "backend_id": backend,
                 "node_id": 900 if state else None, "path": path, "request_id": str(uuid.uuid4()),
                 "args": {"observed": observed}}
        item: dict = {"j": entry}
        if state is not None:
            n = dict(node, state=state, version=version)
            item["s"] = [{"node_id": 900, "version": version, "data": {"kind": "file", "size": 5, "state": state}}]
            item["n" if new else "u"] = [n] if new else [{"node": n, "expected": version - 1}]
        journal_db.execute("SELECT filestore.record_commands(%s)", (json.dumps([item]),))

    record("create", "fuse", "ACTIVE", 1, new=True)
    record("drift", "watcher", "INCONSISTENT", 2, observed={"kind": "file", "size": 9})
    record("reconcile", "reconciler", "ACTIVE", 3)
    record("drift", "audit", "INCONSISTENT", 4, observed=None)
    record("reconcile", "reconciler", "MISSING", 5)
    record("drift", "watcher", None, 0, path="new.txt", observed={"kind": "file", "size": 3})
    got = valid([e for row in events.final_rows(journal_db) for e in events.derive(row)])
    assert [(e["type"], e["path"], e["principal"]["actor"]) for e in got if e["type"] != events.COMPLETED] == [
        (events.CREATED, "f.txt", "fuse"),
        (events.DRIFT, "f.txt", "watcher"), (events.RECONCILED, "f.txt", "reconciler"),
        (events.DRIFT, "f.txt", "audit"), (events.MISSING, "f.txt", "reconciler"),
        (events.DRIFT, "new.txt", "watcher")]
    unknown = [e for e in got if e["path"] == "new.txt" and e["type"] == events.DRIFT][0]
    assert unknown["node_id"] is None and unknown["kind"] == "file" and unknown["size"] == 3
    assert unknown["state"] is None and unknown["version"] is None
