"""No lost update between two mounts (issue 15; docs/design.md optimistic versions, D36).

Two mounts of one database and one local backend, each with a FILESTORE_HOME of its own, are
made to race: a thread in each writes, chmods, renames and unlinks the same few names at once. Run
with a Redis between them (each drops what the other changed) and with REDIS_URL=inline (no
announcements: each works from a view the other made stale, so version races are lost often).
Afterwards:

- the backend equals the database, and the database equals its journal replayed: every node's
  row is its last journaled snapshot, no snapshot is ahead of its node;
- every command a caller saw succeed is journaled exactly once (counted per command);
- the loser of each race (a commit refused: another mount changed the node or the entry first,
  FS409, or took the name) is journaled as carried out, with the conflict and what it saw (the
  versions, entries and free names it expected), and the disk's state adopted after it.
"""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from conftest import Mount, assert_consistent, assert_intents_resolved, run_cli

NAMES = ["a", "b", "c"]
ROUNDS = 150
# What a caller may see when the other mount removed or renamed the name a moment before.
RACED = {errno.ENOENT}


class Racer(threading.Thread):
    def __init__(self, base, seed: int, tag: str):
        super().__init__(daemon=True)
        self.base, self.rng, self.tag = base, random.Random(seed), tag
        self.ok = {"setattr": 0, "rename": 0, "unlink": 0, "write": 0}
        self.unexpected: list[str] = []

    def run(self) -> None:
        for i in range(ROUNDS):
            name = self.base / self.rng.choice(NAMES)
            op = self.rng.choice(["write", "write", "setattr", "rename", "unlink"])
            try:
                if op == "write":  # no O_TRUNC: an open that truncates is a setattr too
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
                    try:
                        os.write(fd, f"{self.tag}-{i}".encode())
                    except OSError:
                        os.close(fd)
                        raise
                    os.close(fd)  # a create lands here: it takes the name over (no O_EXCL)
                elif op == "setattr":
                    os.chmod(name, 0o600 | self.rng.choice([0o00, 0o40, 0o44]))
                elif op == "rename":  # (to itself: the kernel answers alone, nothing to journal)
                    os.rename(name, self.base / self.rng.choice([n for n in NAMES if n != name.name]))
                else:
                    os.unlink(name)
                self.ok[op] += 1
            except OSError as exc:
                if exc.errno not in RACED:
                    self.unexpected.append(f"{op} {name.name}: {exc!r}")


def committed(db, command: str) -> int:
    return db.execute("SELECT count(*) FROM filestore.journal_entries WHERE actor = 'fuse' AND command = %s"
                      " AND status = 'committed'", (command,)).fetchone()[0]


def assert_journal_replays(db, backend: str) -> None:
    """Every node of the backend is its last journaled snapshot; none is behind a snapshot."""
    backend_id = db.execute("SELECT id FROM filestore.backend_mounts WHERE name = %s", (backend,)).fetchone()[0]
    rows = db.execute("""
        SELECT n.id, n.version, n.kind, n.size, n.mode, n.state, s.version, s.data
          FROM filestore.nodes n
          LEFT JOIN LATERAL (SELECT version, data FROM filestore.snapshots WHERE node_id = n.id
                              ORDER BY version DESC LIMIT 1) s ON true
         WHERE n.backend_id = %s AND n.version > 1""", (backend_id,)).fetchall()
    wrong = [r for r in rows if r[6] != r[1] or (r[7]["kind"], r[7]["size"], r[7]["mode"], r[7]["state"])
             != (r[2], r[3], r[4], r[5])]
    assert not wrong, f"nodes that are not their last journaled state: {wrong[:5]}"


@pytest.mark.parametrize("announced", ["redis", "inline"])
def test_two_mounts_racing_on_the_same_nodes_lose_no_update(tmp_path, env, db, announced, request):
    if announced == "redis":
        env = dict(env, REDIS_URL=request.getfixturevalue("redis_server").url)
    root = tmp_path / "backend"
    (root / "shared").mkdir(parents=True)
    run_cli(env, "backend", "add", "local", str(root))
    home_b = tmp_path / "home-b"
    a = Mount(env, tmp_path / "a", tmp_path / "home" / "logs" / "a.log").start()
    b = Mount(dict(env, FILESTORE_HOME=str(home_b)), tmp_path / "b", home_b / "logs" / "b.log").start()
    racers = []
    try:
        for mount, tag in ((a, "a"), (b, "b")):
            # One racer per mount: a chmod of a file its own mount holds open (or has not put
            # on the backend yet) is absorbed into that file's close, not journaled alone.
            racers.append(Racer(mount.mountpoint / "local" / "shared", seed=tag, tag=tag))
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(300)
        assert not any(r.is_alive() for r in racers)
        for mount in (a, b):  # every answered command committed
            fd = os.open(mount.mountpoint / "local", os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    finally:
        a.stop()
        b.stop()
    unexpected = [u for r in racers for u in r.unexpected]
    assert not unexpected, unexpected[:20]
    done = {op: sum(r.ok[op] for r in racers) for op in ("setattr", "rename", "unlink")}
    assert all(done.values()), done  # each kind of command succeeded somewhere
    assert {op: committed(db, op) for op in done} == done  # journaled once each, none dropped

    losers = db.execute("SELECT command, result FROM filestore.journal_entries WHERE actor = 'fuse'"
                        " AND result ? 'adopted'").fetchall()
    for command, result in losers:
        # a version or an entry changed (FS409), or a name it took as free was taken (a constraint)
        assert result["adopted"].startswith(("filestore conflict", "duplicate key value")), result
        saw = result["saw"]
        assert saw["versions"] or saw["entries"] or saw["free_names"], result  # what it expected
    if losers:  # each followed by the adoption of the disk, journaled as recovery
        assert db.execute("SELECT count(*) FROM filestore.journal_entries WHERE command = 'recover'"
                          " AND args ? 'conflict'").fetchone()[0] >= 1

    assert_consistent(db, "local", root)  # the tree, snapshots, staging, then the rollups
    assert_intents_resolved(db, tmp_path / "home")
    assert_intents_resolved(db, home_b)
    assert_journal_replays(db, "local")


def test_a_create_racing_another_mount_lands_at_close(tmp_path, env, db):
    """O_CREAT without O_EXCL on a name that does not exist yet, in two mounts at once: both
    opens succeed (as natively, both would have the same file); each close must succeed too.
    A's file reaches the backend at its close (content.create_deferred), after B's: it takes
    the name over, and the database adopts what the backend then holds."""
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    home_b = tmp_path / "home-b"
    a = Mount(env, tmp_path / "a", tmp_path / "home" / "logs" / "a.log").start()
    b = Mount(dict(env, FILESTORE_HOME=str(home_b)), tmp_path / "b", home_b / "logs" / "b.log").start()
    try:
        fd = os.open(a.mountpoint / "local" / "x", os.O_WRONLY | os.O_CREAT, 0o644)
        (b.mountpoint / "local" / "x").write_bytes(b"from b")
        os.write(fd, b"from a")
        os.close(fd)
        assert (root / "x").read_bytes() == b"from a"  # the last close wins, as natively
        assert (b.mountpoint / "local" / "x").read_bytes() == b"from a"
    finally:
        a.stop()
        b.stop()
    assert_consistent(db, "local", root)
    assert_intents_resolved(db, tmp_path / "home")
    assert_intents_resolved(db, home_b)
    creates = db.execute("SELECT count(*) FROM filestore.journal_entries WHERE command = 'create'"
                         " AND path = 'x' AND status = 'committed'").fetchone()[0]
    assert creates == 2  # each mount's create journaled, A's with the conflict it met
