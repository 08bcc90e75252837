"""Events: derivation through a real mount, the relay over a real Redis (outage, out-of-order
commits, two relays, republish after a crash) and the reference consumers (resume, dedupe)."""
from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import jsonschema
import psycopg
import pytest
import redis
from conftest import run_cli, wait_until

from core import config
from core.events import outbox as events
from core.events.consumers import Consumer, JournalSource, RedisStreamSource
from core.events.consumers.activity import Activity
from core.events.consumers.activity import connect as duck_connect
from core.events.consumers.metadata_sync import MetadataSync
from core.events.relay import Relay
from core.events.settings import EventSettings
from core.storage import schema
from core.storage.db import Database

VALIDATOR = jsonschema.Draft202012Validator(events.load_schema(),
                                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def valid(batch: list[dict]) -> list[dict]:
    """Every event a test sees is checked against docs/events.schema.json."""
    for event in batch:
        VALIDATOR.validate(event)
    return batch


def conf(redis_url: str = "inline", tmp: Path | None = None, **overrides) -> EventSettings:
    tmp = tmp or Path("/nonexistent")
    values = dict(redis_url=redis_url, channel="apphub:filestore", stream="filestore:events", stream_maxlen=100_000,
                  poll_seconds=0.02, batch_rows=50, relay_in_mount=True, metadata_sync=False,
                  metadata_sync_path=tmp / "meta.sqlite3", activity=False, activity_path=tmp / "activity.duckdb")
    values.update(overrides)
    return EventSettings(**values)


def stream_events(url: str, stream: str = "filestore:events") -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return valid([json.loads(fields[b"event"]) for _, fields in client.xrange(stream)])
    finally:
        client.close()


def tail(env: dict, *args: str) -> list[dict]:
    out = run_cli(env, "events", "tail", "--json", *args).stdout
    return valid([json.loads(line) for line in out.splitlines() if line.strip()])


def publish_committed(relay: Relay, tracked) -> None:
    """Run the relay until it has published every row the mount committed. A row is published
    only once every transaction that began before it has ended (outbox.final_rows), so one
    pass right after a commit may stop short of it while another transaction is still open."""
    tracked.settle()
    last = tracked.db.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0]

    def published() -> bool:
        while relay.run_once():
            pass
        row = tracked.db.execute("SELECT last_journal_id FROM filestore.relay_positions WHERE stream = %s",
                                 (relay.key,)).fetchone()
        return row is not None and row[0] >= last

    wait_until(published, timeout=20, message=f"the relay to publish journal rows up to {last}")


# -- derivation through a real mount ----------------------------------------------------
def test_every_command_through_the_mount_gives_its_events(tracked):
    start = tracked.last_journal_id() + 1
    d = tracked.path / "docs"
    d.mkdir()                                               # mkdir
    (d / "a.txt").write_bytes(b"hello")                     # create + write (one transaction)
    with open(d / "a.txt", "ab") as f:                      # in-place write
        f.write(b" world")
    os.chmod(d / "a.txt", 0o600)                            # setattr
    os.rename(d / "a.txt", d / "b.txt")                     # rename
    os.link(d / "b.txt", d / "c.txt")                       # link
    os.symlink("b.txt", d / "s")                            # symlink
    os.mkfifo(d / "p")                                      # mknod
    os.unlink(d / "c.txt")                                  # unlink of one of two names
    os.unlink(d / "b.txt")                                  # unlink of the last name
    with pytest.raises(OSError):
        os.rmdir(d)                                         # refused: ENOTEMPTY, journaled as failed
    os.unlink(d / "s")
    os.unlink(d / "p")
    os.rmdir(d)                                             # rmdir

    got = tail(tracked.env, "--from", str(start))
    node_events = [(e["command"], e["type"], e["path"]) for e in got if e["type"] != events.COMPLETED]
    assert node_events == [
        ("mkdir", events.CREATED, "docs"),
        ("create", events.CREATED, "docs/a.txt"),
        ("write", events.UPDATED, "docs/a.txt"),
        ("write", events.UPDATED, "docs/a.txt"),
        ("setattr", events.UPDATED, "docs/a.txt"),
        ("rename", events.UPDATED, "docs/b.txt"),
        ("link", events.UPDATED, "docs/c.txt"),
        ("symlink", events.CREATED, "docs/s"),
        ("mknod", events.CREATED, "docs/p"),
        ("unlink", events.UPDATED, "docs/c.txt"),
        ("unlink", events.DELETED, "docs/b.txt"),
        ("unlink", events.DELETED, "docs/s"),
        ("unlink", events.DELETED, "docs/p"),
        ("rmdir", events.DELETED, "docs"),
    ]
    by_command = {e["command"]: e for e in got if e["type"] != events.COMPLETED}
    assert by_command["rename"]["previous_path"] == "docs/a.txt"
    assert by_command["setattr"]["size"] == 11 and by_command["setattr"]["state"] == "ACTIVE"
    assert by_command["mknod"]["kind"] == "fifo" and by_command["symlink"]["kind"] == "symlink"
    assert by_command["rmdir"]["state"] == "DELETED"
    assert all(e["principal"]["actor"] == "fuse" and e["principal"]["uid"] == os.getuid() for e in got)
    assert all(e["backend"] == "local" for e in got)
    # each event carries its command's rollup deltas: the create counts one file in docs and above
    docs = by_command["mkdir"]["node_id"]
    [create_delta] = by_command["create"]["rollup"]["deltas"]
    assert create_delta["dirs"][0] == docs and create_delta["file_count"] == 1
    assert by_command["setattr"]["rollup"] is None  # a mode change moves no directory totals

    # One command.completed per journal row, committed or failed, last among its row's events.
    completed = [e for e in got if e["type"] == events.COMPLETED]
    rows = tracked.journal(start - 1)
    assert [e["journal_id"] for e in completed] == [r["id"] for r in rows]
    failed = [e for e in completed if e["status"] == "failed"]
    assert [(e["command"], e["errno"]) for e in failed] == [("rmdir", 39)]
    assert not [e for e in got if e["journal_id"] == failed[0]["journal_id"] and e["type"] != events.COMPLETED]
    # Versions follow the snapshots: the file's node went 1 (create) .. 6 (last unlink).
    file_versions = [e["version"] for e in got if e["node_id"] == by_command["create"]["node_id"]
                     and e["type"] != events.COMPLETED]
    assert file_versions == [1, 2, 3, 4, 5, 6, 7, 8]

    # Filters: --type keeps only that type.
    deleted = tail(tracked.env, "--from", str(start), "--type", events.DELETED)
    assert [e["path"] for e in deleted] == ["docs/b.txt", "docs/s", "docs/p", "docs"]


def test_the_inline_mount_runs_the_relay(tracked):
    (tracked.path / "x").write_bytes(b"1")
    last = tracked.last_journal_id()
    wait_until(lambda: tracked.db.execute(
        "SELECT last_journal_id FROM filestore.relay_positions WHERE stream = 'inline:apphub:filestore'"
    ).fetchone() == (last,), message="the mount's relay to publish the last journal row")
    published = tracked.db.execute(
        "SELECT seq FROM filestore.relay_positions WHERE stream = 'inline:apphub:filestore'").fetchone()[0]
    derived = len(tail(tracked.env, "--from", "1"))
    assert published == derived


# -- the relay over a real Redis ----------------------------------------------------------
@pytest.fixture
def journal_db(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        schema.apply(conn)
        yield conn


def journal_row(conn: psycopg.Connection, path: str = "x") -> int:
    """A failed-command journal row written by the real record_commands (no node needed)."""
    entry = {"command": "mkdir", "status": "failed", "actor": "cli", "path": path, "errno": 17,
             "error": "EEXIST", "request_id": str(uuid.uuid4())}
    return conn.execute("SELECT journal_id FROM filestore.record_commands(%s)",
                        (json.dumps([{"j": entry}]),)).fetchone()[0]


def test_rows_that_commit_out_of_id_order_are_not_skipped(database_url, journal_db, redis_server):
    relay = Relay(database_url, conf=conf(redis_server.url))
    journal_row(journal_db, "before")
    assert relay.run_once() == 1
    # Since the journal chain (schema 11, D41) ids are handed out under the chain lock, held to
    # commit: a second writer waits for the first to commit, so ids follow commit order.
    slow = psycopg.connect(database_url)
    fast = psycopg.connect(database_url)
    try:
        slow_id = journal_row(slow, "slow")
        got: list[int] = []
        waiting = threading.Thread(target=lambda: got.append(journal_row(fast, "fast")))
        waiting.start()
        wait_until(lambda: journal_db.execute(
            "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = %s", (fast.info.backend_pid,)
        ).fetchone()[0], message="the second writer waits for the chain lock")
        assert relay.run_once() == 0
        slow.commit()
        waiting.join(30)
        assert got and got[0] > slow_id
        assert relay.run_once() == 1  # slow (fast is not committed yet)
        fast.commit()
        assert relay.run_once() == 1
    finally:
        slow.close()
        fast.close()
    # Transaction ids can still run against journal ids: the older transaction takes the larger id.
    # The relay follows (txid, id) and waits for the older transaction.
    older, newer = psycopg.connect(database_url), psycopg.connect(database_url)
    try:
        older.execute("SELECT pg_current_xact_id()")   # older transaction id, no row yet
        newer_id = journal_row(newer, "newer")
        newer.commit()
        assert relay.run_once() == 0
        older_id = journal_row(older, "older")
        assert newer_id < older_id
        older.commit()
        assert relay.run_once() == 2
    finally:
        older.close()
        newer.close()
    relay.close()
    published = stream_events(redis_server.url)
    assert sorted(e["journal_id"] for e in published) == sorted({e["journal_id"] for e in published})
    assert [e["path"] for e in published] == ["before", "slow", "fast", "older", "newer"]
    assert [e["seq"] for e in published] == [1, 2, 3, 4, 5]


def test_redis_outage_delays_events_and_loses_none(tracked, redis_server):
    relay = Relay(tracked.env["DATABASE_URL"], conf=conf(redis_server.url))
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for i in range(10):
            (tracked.path / f"before-{i}").write_bytes(b"x" * i)
        wait_until(lambda: len(stream_events(redis_server.url)) >= 30, message="events before the outage")
        redis_server.kill()
        for i in range(10):
            (tracked.path / f"during-{i}").write_bytes(b"y" * i)
        os.rename(tracked.path / "before-1", tracked.path / "renamed")
        os.unlink(tracked.path / "before-2")
        position = tracked.db.execute("SELECT last_journal_id FROM filestore.relay_positions"
                                      " WHERE stream = 'filestore:events'").fetchone()[0]
        assert position < tracked.last_journal_id()  # nothing could be published, the position waits
        redis_server.start()
        last = tracked.last_journal_id()
        wait_until(lambda: tracked.db.execute("SELECT last_journal_id FROM filestore.relay_positions"
                                              " WHERE stream = 'filestore:events'").fetchone()[0] == last,
                   timeout=30, message="the relay to catch up after Redis came back")
    finally:
        stop.set()
        relay.wake()
        thread.join(10)
    published = stream_events(redis_server.url)
    expected = [e for e in tail(tracked.env, "--from", "1")]
    assert [e["id"] for e in published] == [e["id"] for e in expected]  # each once, in journal order
    ids = [e["journal_id"] for e in published]
    assert ids == sorted(ids)
    assert [e["seq"] for e in published] == list(range(1, len(published) + 1))
    assert {e["path"] for e in published} >= {f"during-{i}" for i in range(10)} | {"renamed"}
    # With REDIS_URL set, `events tail` reads the stream: the same events, seq included.
    redis_env = dict(tracked.env, REDIS_URL=redis_server.url)
    assert tail(redis_env, "--from", "1") == published
    assert tail(redis_env) == published[-50:]

    # A consumer reading the stream after the outage applies every event once.
    sync = MetadataSync(tracked.tmp / "meta.sqlite3")
    consumer = Consumer(sync, RedisStreamSource(redis_server.url, "filestore:events"), wait=0.1)
    while consumer.step():
        pass
    assert consumer.applied == len(published)
    live = {r["path"] for r in sync.records().values() if r["backend"] == "local"}
    assert live == {os.fsdecode(p) for p in os.listdir(tracked.backend_root) if p != b".filestore.staging"
                    and p != ".filestore.staging"}
    sync.close()


def test_two_relays_publish_each_event_once(database_url, journal_db, redis_server, tmp_path):
    subscriber = redis.Redis.from_url(redis_server.url).pubsub()
    subscriber.subscribe("apphub:filestore")
    subscriber.get_message(timeout=2)  # the subscribe confirmation
    # One built as the sidecar builds it, from Settings (the environment); one from a URL.
    settings = config.load({"FILESTORE_HOME": str(tmp_path / "home"), "DATABASE_URL": database_url,
                            "REDIS_URL": redis_server.url})
    relays = [Relay(settings), Relay(database_url, conf=conf(redis_server.url))]
    assert relays[0].conf.stream == "filestore:events" and relays[0].conf.poll_seconds == 0.025
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in relays]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            journal_row(journal_db, f"row-{i}")
        wait_until(lambda: len(stream_events(redis_server.url)) == 300, timeout=30, message="300 events")
    finally:
        stop.set()
        for r in relays:
            r.wake()
        for t in threads:
            t.join(10)
    received = []
    while (message := subscriber.get_message(timeout=0.5)) is not None:
        if message["type"] == "message":
            received.append(json.loads(message["data"]))
    subscriber.close()
    assert sorted(e["id"] for e in valid(received)) == sorted(e["id"] for e in stream_events(redis_server.url))
    assert len({e["id"] for e in received}) == 300 == len(received)
    assert sorted(r.published for r in relays)[0] == 0  # one leads, the other stands by


def test_a_batch_republished_after_a_crash_is_not_duplicated(database_url, journal_db, redis_server):
    relay = Relay(database_url, conf=conf(redis_server.url))
    for i in range(5):
        journal_row(journal_db, f"r{i}")
    assert relay.run_once() == 5
    relay.close()
    # The relay died after Redis took the batch but before its position moved; another starts.
    journal_db.execute("UPDATE filestore.relay_positions SET last_txid = '0', last_journal_id = 0, seq = 0")
    journal_row(journal_db, "r5")
    relay = Relay(database_url, conf=conf(redis_server.url))
    assert relay.run_once() == 6
    relay.close()
    assert [e["path"] for e in stream_events(redis_server.url)] == [f"r{i}" for i in range(6)]


# -- consumers ------------------------------------------------------------------------
def _live_paths(tracked) -> dict[int, str]:
    rows = tracked.db.execute("""
        WITH RECURSIVE t(node_id, path) AS (
            SELECT e.node_id, convert_from(e.name, 'UTF8') FROM filestore.entries e
              JOIN filestore.backend_mounts b ON b.root_node_id = e.parent_id WHERE b.name = 'local'
            UNION ALL
            SELECT e.node_id, t.path || '/' || convert_from(e.name, 'UTF8') FROM filestore.entries e
              JOIN t ON e.parent_id = t.node_id)
        SELECT node_id, path FROM t""").fetchall()
    return dict(rows)


def test_consumers_resume_after_a_restart_and_apply_each_event_once(tracked):
    db = Database(tracked.env["DATABASE_URL"])
    meta_path, duck_path = tracked.tmp / "meta.sqlite3", tracked.tmp / "activity.duckdb"

    def catch_up() -> tuple[int, int]:
        consumers = [Consumer(MetadataSync(meta_path), JournalSource(db), batch=7, wait=0),
                     Consumer(Activity(duck_path), JournalSource(db), batch=7, wait=0)]
        for c in consumers:
            while c.step():
                pass
            c.applier.close()
        return consumers[0].applied, consumers[1].applied

    (tracked.path / "proj").mkdir()
    (tracked.path / "proj" / "sub").mkdir()
    (tracked.path / "proj" / "sub" / "f.bin").write_bytes(b"a" * 1000)
    (tracked.path / "gone.txt").write_bytes(b"b" * 10)
    first = catch_up()
    assert first[0] == first[1] > 0
    # Changes while the consumers are down: a directory move, a delete, a rewrite.
    os.rename(tracked.path / "proj", tracked.path / "project")
    os.unlink(tracked.path / "gone.txt")
    (tracked.path / "project" / "sub" / "f.bin").write_bytes(b"c" * 300)
    second = catch_up()
    assert second[0] == second[1] > 0
    third = catch_up()
    assert third == (0, 0)  # nothing is applied twice

    sync = MetadataSync(meta_path)
    records = {nid: r["path"] for nid, r in sync.records().items() if r["backend"] == "local" and r["path"]}
    sync.close()
    assert records == _live_paths(tracked)
    assert "project/sub/f.bin" in records.values()

    derived = [e for e in tail(tracked.env, "--from", "1")]
    with duck_connect(duck_path, read_only=True) as con:
        count, distinct = con.execute("SELECT count(*), count(DISTINCT (journal_id, idx)) FROM activity").fetchone()
        net = con.execute("SELECT sum(size_delta) FROM activity WHERE backend = 'local'").fetchone()[0]
    assert count == distinct == len(derived)
    assert net == 300  # 1000 + 10 written, 10 deleted, 1000 rewritten to 300

    # The CLI reads the same file: growth and churn under a path, as JSON.
    env = dict(tracked.env, FILESTORE_ACTIVITY_PATH=str(duck_path))
    growth = json.loads(run_cli(env, "activity", "growth", "local", "--json").stdout)
    assert sum(r["bytes_added"] for r in growth) == 300
    churn = json.loads(run_cli(env, "activity", "churn", "local:/project", "--json").stdout)
    top = {r["path"]: r for r in churn}
    assert top["project/sub/f.bin"]["writes"] == 1 and top["project/sub/f.bin"]["bytes_churned"] == 700
    table = run_cli(env, "activity", "growth", "local").stdout
    assert "bytes_added" in table.splitlines()[0]
    db.close()


def test_events_tail_follows_new_events(tracked):
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.Popen([sys.executable, "-m", "fsmount.cli", "events", "tail", "--json", "--follow",
                             "--type", events.CREATED], env=tracked.env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        (tracked.path / "late.txt").write_bytes(b"z")
        line = proc.stdout.readline()
        event = valid([json.loads(line)])[0]
        assert event["type"] == events.CREATED and event["path"] == "late.txt"
    finally:
        proc.terminate()
        proc.wait(10)


def test_admin_errors_are_one_line(tracked):
    done = run_cli(tracked.env, "activity", "growth", check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("filestore: no activity data") and len(done.stderr.strip().splitlines()) == 1
    done = run_cli(dict(tracked.env, REDIS_URL="redis://127.0.0.1:1/0"), "events", "tail", "--from", "1", check=False)
    assert done.returncode == 1 and done.stderr.startswith("filestore: Redis unreachable")


def test_reconciler_rows_give_drift_missing_and_reconciled(journal_db):
    """The reconciler (issue 7, other half) journals with actor `reconciler` and a snapshot per node."""
    backend = journal_db.execute("INSERT INTO filestore.backend_mounts (name, kind, root) VALUES ('b', 'local', '/x')"
                                 " RETURNING id").fetchone()[0]
    node = {"id": 900, "backend_id": backend, "kind": "file", "size": 5, "mode": 420, "uid": 0, "gid": 0, "rdev": 0,
            "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "symlink_target": None, "checksum": None,
            "state": "ACTIVE", "version": 1}

    def record(command: str, state: str, version: int, new: bool = False) -> None:
        n = dict(node, state=state, version=version)
        entry = {"command": command, "status": "committed", "actor": "reconciler", "backend_id": backend,
                 "node_id": 900, "path": "f.txt", "request_id": str(uuid.uuid4())}
        command = {"j": entry, "s": [{"node_id": 900, "version": version,
                                      "data": {"kind": "file", "size": 5, "state": state}}]}
        if new:
            command["n"] = [n]
        else:
            command["u"] = [{"node": n, "expected": version - 1}]
        journal_db.execute("SELECT filestore.record_commands(%s)", (json.dumps([command]),))

    record("reconcile", "ACTIVE", 1, new=True)      # a file found on disk
    record("drift", "INCONSISTENT", 2)              # a change seen behind Filestore's back
    record("reconcile", "MISSING", 3)               # gone from the backend
    record("reconcile", "ACTIVE", 4)                # back again
    got = valid([e for row in events.final_rows(journal_db) for e in events.derive(row)])
    assert [(e["type"], e["version"]) for e in got if e["type"] != events.COMPLETED] == [
        (events.RECONCILED, 1), (events.DRIFT, 2), (events.MISSING, 3), (events.RECONCILED, 4)]
    assert {e["principal"]["actor"] for e in got} == {"reconciler"}
    assert all(e["backend"] == "b" and e["path"] == "f.txt" for e in got)


def test_inline_mount_runs_the_consumers_switched_on(tracked):
    tracked.mount.env.update(FILESTORE_METADATA_SYNC="on", FILESTORE_ACTIVITY="on")
    tracked.restart()
    (tracked.path / "d").mkdir()
    (tracked.path / "d" / "f").write_bytes(b"12345")
    home = Path(tracked.env["FILESTORE_HOME"]) / "consumers"
    wanted = _live_paths(tracked)

    def synced() -> bool:
        if not (home / "metadata-sync.sqlite3").exists():
            return False
        sync = MetadataSync(home / "metadata-sync.sqlite3")
        try:
            return {n: r["path"] for n, r in sync.records().items()
                    if r["backend"] == "local" and r["path"]} == wanted
        finally:
            sync.close()
    wait_until(synced, timeout=20, message="metadata-sync in the mount to apply the new nodes")

    def grown() -> bool:
        with duck_connect(home / "activity.duckdb", read_only=True) as con:  # waits out a batch being written
            return con.execute("SELECT sum(size_delta) FROM activity WHERE path = 'd/f'").fetchone()[0] == 5
    wait_until(grown, timeout=20, message="the activity consumer in the mount to record the write")
    tracked.mount.stop()
    tracked.mount.env.update(FILESTORE_METADATA_SYNC="off", FILESTORE_ACTIVITY="off")
    tracked.mount.start()


def test_a_consumer_fills_a_gap_in_the_stream_from_the_journal(tracked, redis_server):
    """Events trimmed from the stream (or lost by a Redis without persistence) before a consumer
    read them are derived again from the journal: the consumer still applies every event once."""

    relay = Relay(tracked.env["DATABASE_URL"], conf=conf(redis_server.url))
    db = Database(tracked.env["DATABASE_URL"])
    activity_path = tracked.tmp / "activity.duckdb"

    def consumer() -> Consumer:
        return Consumer(Activity(activity_path), RedisStreamSource(redis_server.url, "filestore:events"),
                        wait=0.05, backfill=JournalSource(db))

    (tracked.path / "a").write_bytes(b"a")
    publish_committed(relay, tracked)  # events come from committed rows
    first = consumer()
    while first.step():
        pass
    for name in "bcd":
        (tracked.path / name).write_bytes(name.encode() * 3)
    publish_committed(relay, tracked)
    client = redis.Redis.from_url(redis_server.url)
    client.xtrim("filestore:events", maxlen=0)  # gone before the consumer read them
    (tracked.path / "e").write_bytes(b"eeee")
    publish_committed(relay, tracked)
    client.close()
    second = consumer()
    while second.step():
        pass
    relay.close()
    db.close()
    derived = tail(tracked.env, "--from", "1")
    with duck_connect(activity_path, read_only=True) as con:
        applied = [f"{j}.{i}" for j, i in con.execute("SELECT journal_id, idx FROM activity ORDER BY journal_id, idx").fetchall()]
        net = con.execute("SELECT sum(size_delta) FROM activity").fetchone()[0]
    assert applied == [e["id"] for e in derived]
    assert net == 1 + 9 + 4


def test_the_inline_publisher_delivers_to_subscribers_in_the_process(database_url, journal_db):
    from core.events.relay import InlineBus

    bus = InlineBus(100)
    relay = Relay(database_url, publisher=bus, conf=conf())
    journal_row(journal_db, "unheard")
    assert relay.run_once() == 1  # nobody listens: counted, not built
    assert not bus.backlog
    inbox = bus.subscribe()
    journal_row(journal_db, "heard")
    assert relay.run_once() == 1
    event = valid([inbox.get(timeout=5)])[0]
    assert (event["path"], event["seq"]) == ("heard", 2)
    relay.close()
