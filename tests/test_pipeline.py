"""The commit pipeline through real mounts (docs/design.md section 4; docs/architecture.md D36).

A command is answered once it is carried out and in the intent log; its journal rows follow
in a group commit. These tests hold the group back with a long FILESTORE_COMMIT_DELAY_MS, so
that "answered, not committed" is a state they can look at, and check every guarantee:
fsync waits for the commit; a mount killed between answer and commit commits every answered
command at its next start, as itself, in order, exactly once; two mounts racing on one node
both get journaled with nothing lost; a PostgreSQL outage is ridden out up to the backlog
bound, then callers wait, then EIO, and the backlog lands in order when the server is back.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time

import psycopg
import pytest
from conftest import Mount, assert_consistent, run_cli, wait_until

ME = (os.getuid(), os.getgid(), os.getpid())


def mounted(tmp_path, env, name: str = "mnt", **settings: str) -> Mount:
    env = dict(env, **settings)
    return Mount(env, tmp_path / name, tmp_path / "home" / "logs" / f"{name}.log").start()


def rows(db: psycopg.Connection, since: int = 0) -> list[tuple]:
    return db.execute("SELECT command, status, path, actor, uid, gid, pid FROM filestore.journal_entries"
                      " WHERE id > %s ORDER BY id", (since,)).fetchall()


def last_id(db: psycopg.Connection) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0]


@pytest.fixture
def backend(tmp_path, env):
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    return root


def test_close_answers_before_the_commit_and_fsync_waits_for_it(tmp_path, env, db, backend):
    """With groups held back 2 s, a closed file is on the backend and in the mount at once but
    not in the journal; fsync returns only once its rows are committed."""
    mount = mounted(tmp_path, env, FILESTORE_COMMIT_DELAY_MS="2000")
    base = mount.mountpoint / "local"
    try:
        since = last_id(db)
        (base / "closed.txt").write_bytes(b"answered")
        assert (backend / "closed.txt").read_bytes() == b"answered"  # carried out
        assert os.stat(base / "closed.txt").st_size == 8  # and shown
        assert rows(db, since) == []  # but not committed yet: close did not wait

        fd = os.open(base / "synced.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"durable")
        os.fsync(fd)  # the commit and its WAL flush, before fsync returns
        got = rows(db, since)
        os.close(fd)
        assert [(c, s, p) for c, s, p, *_ in got] == [
            ("create", "committed", "closed.txt"), ("write", "committed", "closed.txt"),
            ("create", "committed", "synced.txt"), ("write", "committed", "synced.txt")]
        assert all(tuple(r[4:]) == ME for r in got)
        size = db.execute("SELECT n.size FROM filestore.nodes n JOIN filestore.entries e ON e.node_id = n.id"
                          " WHERE e.name = 'synced.txt'").fetchone()[0]
        assert size == 7
    finally:
        mount.stop()
    assert_consistent(db, "local", backend, home=tmp_path / "home")


def test_o_sync_writes_and_fsyncdir_wait_for_the_commit(tmp_path, env, db, backend):
    mount = mounted(tmp_path, env, FILESTORE_COMMIT_DELAY_MS="2000")
    base = mount.mountpoint / "local"
    try:
        since = last_id(db)
        fd = os.open(base / "log", os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
        os.write(fd, b"one line\n")  # recorded and committed before write(2) returns
        assert [r[:2] for r in rows(db, since)] == [("create", "committed"), ("write", "committed")]
        os.close(fd)
        os.mkdir(base / "d")
        assert [r[0] for r in rows(db, since)][-1] != "mkdir"
        dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)  # a directory's entries durable: everything answered so far
        os.close(dfd)
        assert [r[0] for r in rows(db, since)][-1] == "mkdir"
    finally:
        mount.stop()
    assert_consistent(db, "local", backend, home=tmp_path / "home")


def test_a_mount_killed_between_answer_and_commit_commits_every_command_as_itself(tmp_path, env, db, backend):
    """SIGKILL while a group is held back: the next start commits each answered command from
    the intent log with its own principal and request id, in order, once; no `recover` row."""
    mount = mounted(tmp_path, env, FILESTORE_COMMIT_DELAY_MS="30000")
    base = mount.mountpoint / "local"
    since = last_id(db)
    os.mkdir(base / "dir")
    (base / "dir" / "a.txt").write_bytes(b"alpha")
    os.rename(base / "dir" / "a.txt", base / "dir" / "b.txt")
    os.chmod(base / "dir" / "b.txt", 0o600)
    os.symlink("b.txt", base / "dir" / "link")
    (base / "gone.txt").write_bytes(b"x")
    os.unlink(base / "gone.txt")
    with pytest.raises(OSError) as refused:
        os.rmdir(base / "dir")  # refused by the mount, journaled as failed: replayed too
    assert refused.value.errno == errno.ENOTEMPTY
    assert rows(db, since) == []  # all answered, none committed
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(30)
    mount.process = None
    os.system(f"fusermount3 -uz {mount.mountpoint} >/dev/null 2>&1")

    restarted = mounted(tmp_path, env, "again")
    try:
        got = rows(db, since)
        assert [(c, s, p) for c, s, p, *_ in got] == [
            ("mkdir", "committed", "dir"),
            ("create", "committed", "dir/a.txt"), ("write", "committed", "dir/a.txt"),
            ("rename", "committed", "dir/a.txt"),
            ("setattr", "committed", "dir/b.txt"),
            ("symlink", "committed", "dir/link"),
            ("create", "committed", "gone.txt"), ("write", "committed", "gone.txt"),
            ("unlink", "committed", "gone.txt"),
            ("rmdir", "failed", "dir")]
        assert all(r[3] == "fuse" and tuple(r[4:]) == ME for r in got), got
        ids = db.execute("SELECT request_id FROM filestore.journal_entries WHERE id > %s", (since,)).fetchall()
        assert len(set(ids)) == len(ids)
        assert sorted(os.listdir(restarted.mountpoint / "local" / "dir")) == ["b.txt", "link"]
        assert (restarted.mountpoint / "local" / "dir" / "b.txt").read_bytes() == b"alpha"
    finally:
        restarted.stop()
    assert_consistent(db, "local", backend, home=tmp_path / "home")


def test_two_mounts_racing_on_one_node_lose_no_update(tmp_path, env, db, backend):
    """Two mounts of one database and backend change one file in turn, each from a stale view
    (no Redis between them): the loser of each version race is resolved by adopting the disk,
    journaled with its own principal; every chmod is journaled and the node ends as the disk."""
    env_b = dict(env, FILESTORE_HOME=str(tmp_path / "home-b"))
    a = mounted(tmp_path, env, "a", FILESTORE_INLINE_LOOPS="0")
    (a.mountpoint / "local" / "shared.txt").write_bytes(b"both")
    fd = os.open(a.mountpoint / "local", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    b = Mount(dict(env_b, FILESTORE_INLINE_LOOPS="0"), tmp_path / "b", tmp_path / "home-b" / "logs" / "b.log").start()
    try:
        since = last_id(db)
        modes = []
        for i in range(6):
            mode = 0o600 | (i << 3)
            side = a if i % 2 == 0 else b
            os.chmod(side.mountpoint / "local" / "shared.txt", mode)
            modes.append(mode)
            for m in (a, b):  # make each group commit before the next chmod
                fd = os.open(m.mountpoint / "local", os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
                os.close(fd)
        setattrs = db.execute("SELECT result FROM filestore.journal_entries WHERE id > %s AND command = 'setattr'"
                              " ORDER BY id", (since,)).fetchall()
        assert len(setattrs) == 6  # every command journaled, none dropped
        assert any(r[0] and "adopted" in r[0] for r in setattrs)  # the stale side lost a race
        node_mode = db.execute("SELECT n.mode FROM filestore.nodes n JOIN filestore.entries e ON e.node_id = n.id"
                               " WHERE e.name = 'shared.txt'").fetchone()[0]
        assert node_mode == os.stat(backend / "shared.txt").st_mode & 0o7777 == modes[-1]
    finally:
        a.stop()
        b.stop()
    assert_consistent(db, "local", backend)


@pytest.fixture
def own_server(tmp_path):
    """A PostgreSQL of this test's own, so that stopping it disturbs no other test."""
    from core.storage.embedded_pg import load_pgserver

    server = load_pgserver(tmp_path / "pg-run").get_server(tmp_path / "pg-data", cleanup_mode=None)
    yield server
    server.stop()


@pytest.mark.log_errors
def test_database_outage_answers_up_to_the_bound_then_waits_then_lands_in_order(tmp_path, own_server):
    url = own_server.get_uri()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL"))}
    env.update(FILESTORE_HOME=str(tmp_path / "home"), DATABASE_URL=url, REDIS_URL="inline",
               FILESTORE_COMMIT_BACKLOG="20", FILESTORE_COMMIT_WAIT_SECONDS="8", FILESTORE_INLINE_LOOPS="0")
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    mount = Mount(env, tmp_path / "mnt", tmp_path / "mount.log").start()
    base = tmp_path / "mnt" / "local"
    try:
        (base / "before.txt").write_bytes(b"committed before the outage")
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        own_server.stop()

        for i in range(20):  # answered while the server is away: the backlog holds them
            os.mkdir(base / f"d{i:02}")
        assert (base / "before.txt").read_bytes() == b"committed before the outage"  # reads go on
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.mkdir(base / "one-too-many")  # the bound: waits, then EIO
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started >= 7.5
        assert not (root / "one-too-many").exists()

        # A caller waiting at the bound goes on as soon as the server is back.
        result = {}

        def late_mkdir():
            try:
                os.mkdir(base / "late")
                result["ok"] = True
            except OSError as err:
                result["errno"] = err.errno
        waiter = threading.Thread(target=late_mkdir)
        waiter.start()
        time.sleep(0.5)
        own_server.start()
        waiter.join(30)
        assert result == {"ok": True}

        with psycopg.connect(url, autocommit=True) as conn:
            def mkdirs():
                return [p for (p,) in conn.execute(
                    "SELECT path FROM filestore.journal_entries WHERE command = 'mkdir' AND status = 'committed'"
                    " ORDER BY id").fetchall()]
            wait_until(lambda: len(mkdirs()) == 21, timeout=30, message="the backlog committed")
            assert mkdirs() == [f"d{i:02}" for i in range(20)] + ["late"]
            assert conn.execute("SELECT count(*) FROM filestore.journal_entries WHERE command = 'recover'"
                                ).fetchone()[0] == 0
    finally:
        mount.stop()
    with psycopg.connect(url, autocommit=True) as db:
        assert_consistent(db, "local", root, home=tmp_path / "home")
