"""Drift you can see and act on (issue 15; seed 001's node lifecycle and rollout phase 1).

The events of drift from rows as the watcher, the audit and the reconciler journal them, and
from real out-of-band changes (a local root through the inline watcher, a moto bucket through
the audit) read from the Redis stream with `filestore events tail --json`; `filestore drift ls`,
`purge` (MISSING -> DELETED) and an observe-only backend with `drift adopt`, through real mounts;
the state of a node through the mount (user.filestore.state) and in `history`.
"""
from __future__ import annotations

import json
import os
import uuid

import jsonschema
import psycopg
import pytest
from conftest import Mount, assert_consistent, run_cli, wait_until
from fixtures_s3 import start_s3_mount, stop_and_check, wait_uploaded
from test_sidecar import BOUND, queue_empty

from core.events import outbox as events
from core.storage import schema

VALIDATOR = jsonschema.Draft202012Validator(events.load_schema(),
                                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def settle(mount: Mount) -> None:
    fd = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    unknown = next(e for e in got if e["path"] == "new.txt" and e["type"] == events.DRIFT)
    assert unknown["node_id"] is None and unknown["kind"] == "file" and unknown["size"] == 3
    assert unknown["state"] is None and unknown["version"] is None


# == real out-of-band changes, their events on the Redis stream =========================
def tail(env: dict, *args: str) -> list[dict]:
    out = run_cli(env, "events", "tail", "--json", *args).stdout
    return valid([json.loads(line) for line in out.splitlines() if line.strip()])


def drift_events(env: dict, since: int, paths: set[str]) -> dict[str, list[tuple[str, str]]]:
    """(type, actor) of the drift, reconciled and missing events of each path, in stream order."""
    out: dict[str, list[tuple[str, str]]] = {p: [] for p in paths}
    for e in tail(env, "--from", str(since + 1)):
        if e["path"] in paths and e["type"] in (events.DRIFT, events.RECONCILED, events.MISSING):
            out[e["path"]].append((e["type"], e["principal"]["actor"]))
    return out


def last_id(db) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0]


def test_local_drift_reaches_the_redis_stream_as_drift_then_reconciled_or_missing(tmp_path, env, db, redis_server,
                                                                                 sidecars):
    """A mount and a sidecar sharing a Redis: files changed, created and deleted directly in the
    backend directory are found by the sidecar's watcher; the relay publishes, per path,
    filestore.drift.detected (actor watcher) then node.reconciled or node.missing."""
    env["REDIS_URL"] = redis_server.url
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "mount.log").start()
    try:
        (mount.mountpoint / "local" / "kept.txt").write_bytes(b"through the mount")
        (mount.mountpoint / "local" / "changed.txt").write_bytes(b"v1")
        (mount.mountpoint / "local" / "gone.txt").write_bytes(b"bye")
        settle(mount)
        sidecars()
        since = last_id(db)
        with open(root / "changed.txt", "ab") as f:
            f.write(b" and more, behind the mount's back")
        (root / "new.txt").write_bytes(b"made outside")
        os.unlink(root / "gone.txt")
        paths = {"changed.txt", "new.txt", "gone.txt"}
        want = {"changed.txt": [(events.DRIFT, "watcher"), (events.RECONCILED, "reconciler")],
                "new.txt": [(events.DRIFT, "watcher"), (events.RECONCILED, "reconciler")],
                "gone.txt": [(events.DRIFT, "watcher"), (events.MISSING, "reconciler")]}
        try:
            wait_until(lambda: drift_events(env, since, paths) == want, timeout=BOUND, interval=0.3,
                       message="the drift events on the stream")
        except AssertionError:
            raise AssertionError(f"events: {drift_events(env, since, paths)}") from None
        new = [e for e in tail(env, "--from", str(since + 1)) if e["path"] == "new.txt" and e["type"] != events.COMPLETED]
        assert new[0]["node_id"] is None and new[0]["kind"] == "file" and new[0]["size"] == 12
        assert new[1]["node_id"] is not None and new[1]["state"] == "ACTIVE"
        assert "kept.txt" not in {e["path"] for e in tail(env, "--from", str(since + 1))}  # own writes: no drift
    finally:
        mount.stop()
    wait_until(lambda: queue_empty(db), BOUND, message="the queue drained")
    assert_consistent(db, "local", root)


def test_s3_drift_found_by_the_audit_reaches_the_redis_stream(tmp_path, env, db, s3_endpoint, bucket, s3,
                                                             redis_server, sidecars):
    """Objects put, overwritten and deleted directly in the bucket are found by the sidecar's list
    audit (every second here): drift.detected (actor audit) then reconciled or missing."""
    env["REDIS_URL"] = redis_server.url
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        (t.path / "changed.txt").write_bytes(b"v1")
        (t.path / "gone.txt").write_bytes(b"bye")
        wait_uploaded(t)
        since = last_id(db)
        sidecars(FILESTORE_S3_AUDIT_SECONDS="1")
        s3.put_object(Bucket=bucket, Key="data/changed.txt", Body=b"v2, longer, put by another tool")
        s3.put_object(Bucket=bucket, Key="data/new.txt", Body=b"new")
        s3.delete_object(Bucket=bucket, Key="data/gone.txt")
        paths = {"changed.txt", "new.txt", "gone.txt"}
        want = {"changed.txt": [(events.DRIFT, "audit"), (events.RECONCILED, "reconciler")],
                "new.txt": [(events.DRIFT, "audit"), (events.RECONCILED, "reconciler")],
                "gone.txt": [(events.DRIFT, "audit"), (events.MISSING, "reconciler")]}
        wait_until(lambda: drift_events(env, since, paths) == want, timeout=30, interval=0.3,
                   message="the drift events of the audit on the stream")
    finally:
        stop_and_check(t, s3)


# == drift ls, purge, history and the state through the mount ==========================
def drift_ls(env: dict, *path: str) -> list[dict]:
    return json.loads(run_cli(env, "drift", "ls", *path, "--json").stdout)["drift"]


def test_missing_nodes_are_listed_with_their_history_and_purged(tracked):
    """A file and a directory (with its subtree) deleted behind the mount become MISSING: `drift
    ls` shows when and by whom they were found, `history` follows the vanished path to the node
    and shows its state, `drift purge` makes them DELETED (journaled), leaving the rest alone."""
    base, root = tracked.path, tracked.backend_root
    os.makedirs(base / "old" / "sub")
    (base / "old" / "sub" / "a.txt").write_bytes(b"a")
    (base / "old" / "b.txt").write_bytes(b"b")
    (base / "gone.txt").write_bytes(b"gone")
    (base / "kept.txt").write_bytes(b"kept")
    assert os.getxattr(base / "kept.txt", "user.filestore.state") == b"ACTIVE"
    tracked.settle()
    import shutil
    shutil.rmtree(root / "old")
    os.unlink(root / "gone.txt")
    wait_until(lambda: {d["path"] for d in drift_ls(tracked.env)} >= {"gone.txt", "old"}, timeout=BOUND,
               message="the deletions reconciled")
    listed = {d["path"]: d for d in drift_ls(tracked.env)}
    assert set(listed) == {"gone.txt", "old", "old/sub", "old/sub/a.txt", "old/b.txt"}
    assert all(d["state"] == "MISSING" for d in listed.values())
    assert listed["gone.txt"]["found_by"] == "watcher" and listed["gone.txt"]["found_at"]
    assert listed["gone.txt"]["observed"] is None and listed["gone.txt"]["recorded"]["size"] == 4
    assert [d["path"] for d in drift_ls(tracked.env, "local:/old")] == ["old", "old/b.txt", "old/sub",
                                                                        "old/sub/a.txt"]
    text = run_cli(tracked.env, "drift", "ls", "local").stdout
    assert "MISSING" in text and "local:/gone.txt" in text and "by watcher" in text

    story = json.loads(tracked.cli("history", "local:/gone.txt", "--json").stdout)
    assert story["state"] == "MISSING"
    assert [(r["command"], r["actor"], r["state"]) for r in story["entries"]][-2:] == [
        ("drift", "watcher", "INCONSISTENT"), ("reconcile", "reconciler", "MISSING")]

    since = tracked.last_journal_id()
    done = tracked.cli("drift", "purge", "local:/old")
    assert "4 node(s) MISSING -> DELETED" in done.stdout
    assert [d["path"] for d in drift_ls(tracked.env)] == ["gone.txt"]  # not asked for: still MISSING
    purge = [r for r in tracked.journal(since) if r["command"] == "purge"]
    assert len(purge) == 1 and purge[0]["actor"] == "cli" and purge[0]["uid"] == os.getuid()
    assert purge[0]["args"]["paths"] == ["old", "old/b.txt", "old/sub", "old/sub/a.txt"]
    tracked.cli("drift", "purge", str(base / "gone.txt"))
    assert drift_ls(tracked.env) == []
    story = json.loads(tracked.cli("history", "local:/gone.txt", "--json").stdout)
    assert story["state"] == "DELETED" and story["entries"][-1]["command"] == "purge"
    deleted = [e for e in tail(tracked.env, "--from", str(since + 1)) if e["type"] == events.DELETED]
    assert len(deleted) == 5 and {e["command"] for e in deleted} == {"purge"}
    refused = tracked.cli("drift", "purge", "local:/kept.txt", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("filestore: nothing MISSING")
    assert (base / "kept.txt").read_bytes() == b"kept"


@pytest.fixture
def observed(tmp_path, env, db, request):
    """A mount (inline loops) of a backend added with --observe-only (and --xattrs)."""
    from conftest import Tracked, assert_clean_log

    root = tmp_path / "backend"
    root.mkdir()
    (root / "x.txt").write_bytes(b"12345")
    (root / "gone.txt").write_bytes(b"gone")
    done = run_cli(env, "backend", "add", "local", str(root), "--observe-only", "--xattrs")
    assert "(observe-only)" in done.stdout
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "test-mount.log").start()
    t = Tracked(env, db, tmp_path, mount, root, {"local": root})
    try:
        yield t
    finally:
        if mount.process is not None:
            mount.stop()
    assert_clean_log(mount.log_path, request)


def test_observe_only_marks_drift_without_adopting_it_until_adopt(observed):
    t = observed
    base, root = t.path, t.backend_root
    since = t.last_journal_id()
    with open(root / "x.txt", "ab") as f:
        f.write(b"678")
    (root / "new.txt").write_bytes(b"made outside")
    os.unlink(root / "gone.txt")
    want = {"x.txt": "INCONSISTENT", "new.txt": "UNTRACKED", "gone.txt": "INCONSISTENT"}
    wait_until(lambda: {d["path"]: d["state"] for d in drift_ls(t.env)} == want, timeout=BOUND,
               message="three drifts observed")
    listed = {d["path"]: d for d in drift_ls(t.env)}
    assert all(d["observe_only"] for d in listed.values())
    assert listed["x.txt"]["observed"]["size"] == 8 and listed["x.txt"]["recorded"]["size"] == 5
    assert listed["new.txt"]["node_id"] is None and listed["new.txt"]["found_by"] == "watcher"
    # the mount still shows what was recorded, and says it is not in step
    assert os.getxattr(base / "x.txt", "user.filestore.state") == b"INCONSISTENT"
    assert os.stat(base / "x.txt").st_size == 5
    assert sorted(os.listdir(base)) == ["gone.txt", "x.txt"]
    # journaled and published, nothing adopted
    got = [(e["path"], e["type"]) for e in tail(t.env, "--from", str(since + 1)) if e["type"] != events.COMPLETED]
    assert sorted(got) == [("gone.txt", events.DRIFT), ("new.txt", events.DRIFT), ("x.txt", events.DRIFT)]
    assert not [r for r in t.journal(since) if r["command"] == "reconcile"]
    (root / "new.txt").write_bytes(b"made outside, again")  # seen again: no second drift row
    (root / "late.txt").write_bytes(b"sentinel")
    wait_until(lambda: "late.txt" in {d["path"] for d in drift_ls(t.env)}, timeout=BOUND, message="late drift")
    assert len([r for r in t.journal(since) if r["command"] == "drift" and r["path"] == "new.txt"]) == 1

    done = t.cli("drift", "adopt", "local:/")
    assert "4 path(s) adopted" in done.stdout
    assert {d["path"]: d["state"] for d in drift_ls(t.env)} == {"gone.txt": "MISSING"}
    assert sorted(os.listdir(base)) == ["late.txt", "new.txt", "x.txt"]
    assert (base / "new.txt").read_bytes() == b"made outside, again"
    assert os.stat(base / "x.txt").st_size == 8
    assert os.getxattr(base / "x.txt", "user.filestore.state") == b"ACTIVE"
    reconciled = [r for r in t.journal(since) if r["command"] == "reconcile"]
    assert {r["path"]: r["args"]["outcome"] for r in reconciled} == {
        "x.txt": "updated", "new.txt": "created", "gone.txt": "missing", "late.txt": "created"}
    assert all(r["args"]["adopted_by"]["uid"] == os.getuid() for r in reconciled)
    t.cli("drift", "purge", "local:/gone.txt")
    assert drift_ls(t.env) == []
    t.settle()
    assert_consistent(t.db, "local", root, home=t.tmp / "home")


def test_adopt_runs_the_jobs_itself_when_no_mount_or_sidecar_runs(observed):
    t = observed
    (t.backend_root / "new.txt").write_bytes(b"n")
    wait_until(lambda: [d["state"] for d in drift_ls(t.env)] == ["UNTRACKED"], timeout=BOUND,
               message="the drift observed")
    t.mount.stop()
    done = t.cli("drift", "adopt", "local")
    assert "1 path(s) adopted" in done.stdout
    assert drift_ls(t.env) == []
    assert_consistent(t.db, "local", t.backend_root, home=t.tmp / "home")
