"""The sidecar against real parts: `filestore sidecar` subprocesses, a real PostgreSQL, real
watchdog observers on a real backend directory, and real mounts.

Bound stated (docs/architecture.md, the drift decision): a change made on the backend disk is
in the nodes and the journal within about one second while a sidecar runs (debounce 0.3 s +
queue poll <= 0.25 s + the job); the tests wait up to 20 s so that a loaded machine does not
fail them, and scripts/bench_sidecar measures the real p50/p99.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import psycopg
import pytest
from conftest import assert_consistent, run_cli, wait_until

BOUND = 20.0


@pytest.fixture
def backend(tmp_path, env, db):
    root = tmp_path / "backend"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha")
    (root / "gone.txt").write_bytes(b"soon deleted")
    (root / "d").mkdir()
    (root / "d" / "b.txt").write_bytes(b"bravo")
    (root / "old").mkdir()
    (root / "old" / "x.txt").write_bytes(b"x")
    run_cli(env, "backend", "add", "local", str(root))
    return root


def node_at(db, rel: str, backend: str = "local") -> dict | None:
    node_id = db.execute("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s", (backend,)).fetchone()[0]
    for part in filter(None, rel.split("/")):
        row = db.execute("SELECT node_id FROM filestore.entries WHERE parent_id = %s AND name = %s",
                         (node_id, os.fsencode(part))).fetchone()
        if row is None:
            return None
        node_id = row[0]
    cur = db.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM filestore.nodes WHERE id = %s", (node_id,)).fetchone()


def node_by_id(db, node_id: int) -> dict:
    return db.cursor(row_factory=psycopg.rows.dict_row).execute(
        "SELECT * FROM filestore.nodes WHERE id = %s", (node_id,)).fetchone()


def journal(db, command: str | None = None) -> list[dict]:
    cur = db.cursor(row_factory=psycopg.rows.dict_row)
    if command:
        return cur.execute("SELECT * FROM filestore.journal_entries WHERE command = %s ORDER BY id", (command,)).fetchall()
    return cur.execute("SELECT * FROM filestore.journal_entries ORDER BY id").fetchall()


def queue_empty(db) -> bool:
    return db.execute("SELECT count(*) FROM filestore.jobs WHERE state <> 'failed'").fetchone()[0] == 0


def settled(db, root, backend="local") -> bool:
    """The queue is drained and the database tree equals the disk."""
    if not queue_empty(db):
        return False
    try:
        assert_consistent(db, backend, root)
        return True
    except AssertionError:
        return False


def test_changes_on_the_backend_disk_are_reconciled_and_journaled(backend, db, sidecars):
    car = sidecars()
    # the start audit's own jobs done first: what follows is the watchers' work alone
    wait_until(lambda: settled(db, backend), BOUND, message="the start audit")
    a_id = node_at(db, "a.txt")["id"]
    b_id = node_at(db, "d/b.txt")["id"]
    gone_id = node_at(db, "gone.txt")["id"]
    old_ids = {node_at(db, "old")["id"], node_at(db, "old/x.txt")["id"]}

    (backend / "new.txt").write_bytes(b"created outside")
    with open(backend / "a.txt", "ab") as f:
        f.write(b" and more")
    os.rename(backend / "d" / "b.txt", backend / "d" / "c.txt")
    os.unlink(backend / "gone.txt")
    (backend / "tree" / "sub").mkdir(parents=True)
    (backend / "tree" / "sub" / "deep.txt").write_bytes(b"deep")
    os.symlink("a.txt", backend / "link")
    os.chmod(backend / "d", 0o700)
    shutil.rmtree(backend / "old")

    wait_until(lambda: settled(db, backend), BOUND, message="the database to match the disk")
    assert node_at(db, "a.txt")["id"] == a_id and node_at(db, "a.txt")["size"] == len(b"alpha and more")
    assert node_at(db, "d/c.txt")["id"] == b_id  # a rename keeps the node
    assert node_at(db, "new.txt")["state"] == "ACTIVE"
    assert node_at(db, "tree/sub/deep.txt")["size"] == 4
    assert bytes(node_at(db, "link")["symlink_target"]) == b"a.txt"
    assert node_at(db, "d")["mode"] == 0o700
    assert node_by_id(db, gone_id)["state"] == "MISSING"
    assert {node_by_id(db, i)["state"] for i in old_ids} == {"MISSING"}

    reconciled = {(r["path"], r["args"]["outcome"]) for r in journal(db, "reconcile")}
    assert {("a.txt", "updated"), ("d/c.txt", "moved"), ("gone.txt", "missing"), ("new.txt", "created"),
            ("tree", "created"), ("old", "missing"), ("d", "updated")} <= reconciled
    assert {r["actor"] for r in journal(db, "reconcile")} == {"reconciler"}
    drifts = journal(db, "drift")
    assert drifts and {r["actor"] for r in drifts} <= {"watcher", "audit"}
    # Every state change left a snapshot and a journal row; each drift came before its healing.
    assert len(drifts) == len(journal(db, "reconcile"))

    # A vanished file that comes back is the same node again.
    (backend / "gone.txt").write_bytes(b"back again")
    wait_until(lambda: node_by_id(db, gone_id)["state"] == "ACTIVE", BOUND, message="gone.txt restored")
    assert node_at(db, "gone.txt")["id"] == gone_id
    assert journal(db, "reconcile")[-1]["args"]["outcome"] == "restored"

    code, body = car.ready()
    assert code == 200 and body["ready"], body
    assert car.stop() == 0  # SIGTERM: a clean stop


def test_the_start_audit_finds_changes_made_while_no_sidecar_ran(backend, db, sidecars):
    (backend / "offline.txt").write_bytes(b"made while nobody watched")
    with open(backend / "d" / "b.txt", "wb") as f:
        f.write(b"rewritten")
    sidecars()
    wait_until(lambda: settled(db, backend), BOUND, message="the audit to reconcile")
    sources = {r["args"]["source"] for r in journal(db, "reconcile")}
    assert sources == {"audit"}
    assert node_at(db, "d/b.txt")["size"] == len(b"rewritten")


def test_a_sidecar_killed_mid_reconciliation_leaves_the_job_to_the_next(backend, db, sidecars):
    # The crash point is the one fault a real part cannot produce on demand: SIGKILL between
    # the drift transaction and the healing one.
    first = sidecars(FILESTORE_CRASH_AT="reconcile:after_drift", FILESTORE_JOB_LEASE_SECONDS="2")
    with open(backend / "a.txt", "ab") as f:
        f.write(b"!")
    first.process.wait(BOUND)
    assert first.process.returncode == -signal.SIGKILL
    first.process = None
    assert node_at(db, "a.txt")["state"] == "INCONSISTENT"
    leased = db.execute("SELECT state, leased_by FROM filestore.jobs").fetchall()
    assert ("running",) == tuple({row[0] for row in leased})

    sidecars(FILESTORE_JOB_LEASE_SECONDS="2")
    wait_until(lambda: settled(db, backend), BOUND, message="the job to be taken over")
    node = node_at(db, "a.txt")
    assert node["state"] == "ACTIVE" and node["size"] == len(b"alpha!")
    assert [r["path"] for r in journal(db, "drift")] == ["a.txt"]  # journaled once, healed once
    assert [r["path"] for r in journal(db, "reconcile")] == ["a.txt"]


def test_two_sidecars_share_the_work_without_running_a_job_twice(backend, db, sidecars):
    cars = [sidecars(), sidecars()]
    for i in range(120):
        (backend / f"f{i:03}.txt").write_bytes(b"x" * i)
    wait_until(lambda: settled(db, backend), BOUND * 2, message="both sidecars to drain the queue")
    paths = [r["path"] for r in journal(db, "reconcile")]
    assert sorted(paths) == sorted(f"f{i:03}.txt" for i in range(120))  # each exactly once
    assert len(journal(db, "drift")) == 120
    for car in cars:
        assert car.stop() == 0
    done = [row[0]["jobs_done"] for row in db.execute(
        "SELECT info FROM filestore.processes WHERE role = 'sidecar'").fetchall()]
    assert sum(done) >= 120


def test_ready_names_an_unreachable_backend_and_metrics_count_drift(backend, db, sidecars):
    car = sidecars()
    (backend / "n.txt").write_bytes(b"n")
    wait_until(lambda: settled(db, backend), BOUND, message="reconciled")
    from fixtures_sidecar import http_get
    code, text = http_get(car.port, "/metrics")
    assert code == 200
    drift = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith('filestore_drift_events_total{backend="local"')]
    assert sum(drift) == 1.0, text
    assert "filestore_queue_depth" in text and "filestore_reconcile_backlog" in text

    moved = backend.with_name("elsewhere")
    os.rename(backend, moved)
    try:
        code, body = car.ready()
        assert code == 503 and body["failed"] == ["backend:local"], body
    finally:
        os.rename(moved, backend)
    # back: taken back by the sidecar's backend monitor (which audits it) at its next probe
    wait_until(lambda: car.ready()[0] == 200, 20, message="the backend back in /ready")


def test_status_shows_the_sidecar_queues_and_backends(backend, db, env, sidecars):
    car = sidecars()
    done = run_cli(env, "status", "--json")
    report = json.loads(done.stdout)
    assert report["healthy"] and report["postgres"]["ok"]
    assert [b["name"] for b in report["backends"]] == ["local"]
    assert [s["pid"] for s in report["sidecars"]] == [car.process.pid]
    assert report["sidecars"][0]["state"] == "alive"
    assert set(report["queues"]) == {"filestore_reconcile_queue", "filestore_rollup_queue"}
    text = run_cli(env, "status").stdout
    assert "sidecars" in text and "filestore_reconcile_queue" in text

    shutil.rmtree(backend)
    failed = run_cli(env, "status", check=False)
    assert failed.returncode == 1 and "NOT healthy" in failed.stdout


def test_ready_reports_a_stopped_postgres(tmp_path, sidecars):
    from core.storage.embedded_pg import load_pgserver
    server = load_pgserver(tmp_path / "pg-run").get_server(tmp_path / "pg-data", cleanup_mode=None)
    try:
        url = server.get_uri()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL"))}
        env.update(FILESTORE_HOME=str(tmp_path / "home2"), DATABASE_URL=url, REDIS_URL="inline")
        root = tmp_path / "b2"
        root.mkdir()
        run_cli(env, "backend", "add", "local", str(root))
        car = sidecars(**env)
        assert car.ready()[0] == 200
        server.stop()
        code, body = car.ready()
        assert code == 503 and body["failed"] == ["postgres"], body
        status = run_cli(env, "status", "--json", check=False)
        assert status.returncode == 1
        assert json.loads(status.stdout)["postgres"]["ok"] is False
        server.start() if hasattr(server, "start") else None
        server = load_pgserver(tmp_path / "pg-run").get_server(tmp_path / "pg-data", cleanup_mode=None)
        wait_until(lambda: car.ready()[0] == 200, BOUND, message="ready again")
        assert car.stop() == 0
    finally:
        server.stop()


def test_a_backend_unreachable_at_start_is_named_and_the_others_still_work(backend, db, env, tmp_path, sidecars):
    other = tmp_path / "other"
    other.mkdir()
    run_cli(env, "backend", "add", "other", str(other))
    other.rmdir()
    car = sidecars()
    code, body = car.ready()
    assert code == 503 and body["failed"] == ["backend:other"], body
    (backend / "still.txt").write_bytes(b"watched")
    wait_until(lambda: settled(db, backend), BOUND, message="the reachable backend reconciled")
    assert car.stop() == 0


def test_sigterm_mid_backlog_finishes_or_gives_back_every_job(backend, db, sidecars):
    car = sidecars()
    for i in range(300):
        (backend / f"b{i:03}.txt").write_bytes(b"b")
    wait_until(lambda: journal(db, "reconcile"), BOUND, message="the first jobs to run")
    assert car.stop() == 0
    assert len(journal(db, "reconcile")) < 300  # it was stopped with work left
    held = db.execute("SELECT key, leased_by FROM filestore.jobs WHERE state = 'running'").fetchall()
    assert held == []  # nothing waits for a lease to expire
    # What was left is done by the next sidecar, exactly once per path.
    sidecars()
    wait_until(lambda: settled(db, backend), BOUND * 2, message="the rest of the backlog")
    paths = [r["path"] for r in journal(db, "reconcile")]
    assert sorted(paths) == sorted(f"b{i:03}.txt" for i in range(300))


def test_ready_names_an_unreachable_redis(backend, db, sidecars):
    from fixtures_sidecar import free_port
    car = sidecars(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    code, body = car.ready()
    assert code == 503 and body["failed"] == ["redis"], body
    assert body["checks"]["postgres"]["ok"] and body["checks"]["backend:local"]["ok"]


def test_a_directory_renamed_on_disk_keeps_its_nodes(backend, db, sidecars):
    sidecars()
    wait_until(lambda: settled(db, backend), BOUND, message="the start audit")
    dir_id, child_id = node_at(db, "old")["id"], node_at(db, "old/x.txt")["id"]
    os.rename(backend / "old", backend / "d" / "new")
    wait_until(lambda: settled(db, backend), BOUND, message="the move reconciled")
    assert node_at(db, "d/new")["id"] == dir_id
    assert node_at(db, "d/new/x.txt")["id"] == child_id
    assert node_by_id(db, child_id)["state"] == "ACTIVE"
    moves = [(r["path"], r["args"]["outcome"], r["args"].get("from")) for r in journal(db, "reconcile")]
    assert ("d/new", "moved", "old") in moves


@pytest.mark.log_errors  # the backend that cannot be opened at start is logged as an ERROR
def test_a_backend_away_when_the_sidecar_starts_is_watched_once_it_is_back(tmp_path, env, db, sidecars):
    """Issue 15: a sidecar retries a backend it could not open at start (as a mount does), then
    watches it: a change made behind everyone's back afterwards is reconciled."""
    root = tmp_path / "late"
    root.mkdir()
    run_cli(env, "backend", "add", "late", str(root))
    away = tmp_path / "late-away"
    os.rename(root, away)
    car = sidecars(FILESTORE_BACKEND_PROBE_SECONDS="0.2")
    code, body = car.ready()
    assert code == 503 and "backend:late" in body["failed"], body
    os.rename(away, root)
    wait_until(lambda: car.ready()[0] == 200, timeout=20, message="the backend opened")
    (root / "behind.txt").write_bytes(b"behind its back")
    wait_until(lambda: db.execute("SELECT count(*) FROM filestore.entries WHERE name = 'behind.txt'::bytea")
               .fetchone()[0] == 1, timeout=30, message="the change reconciled")
    assert car.stop() == 0
    assert_consistent(db, "late", root)
