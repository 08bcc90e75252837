"""Fixtures: a real PostgreSQL (embedded server, one per session, a fresh database per test)
and real FUSE mounts served by `filestore mount --foreground` subprocesses.

Every test that mounts gets, after it, the invariant check of `assert_consistent`: the
database tree equals the backend disk (names, kinds, sizes, modes, symlink targets), every
changed node has a snapshot of its current version, no deleted node keeps a name, no staging
file is left behind, every command of the mount's intent log is journaled (the log is
resolved), every directory's rollup equals a recount; and the mount's log holds no traceback
and no ERROR line unless the test declares them (`@pytest.mark.log_errors`).
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

pytest_plugins = ["fixtures_posix", "fixtures_redis", "fixtures_s3", "fixtures_sidecar"]  # tests/fixtures_*.py

REPO = Path(__file__).resolve().parent.parent
FILESTORE = [sys.executable, "-m", "fsmount.cli"]
STAGING = ".filestore.staging"


# -- PostgreSQL ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real PostgreSQL for the session: DATABASE_URL if given, else an embedded server."""
    if os.environ.get("FILESTORE_TEST_DATABASE_URL"):
        yield os.environ["FILESTORE_TEST_DATABASE_URL"]
        return
    from core.storage.embedded_pg import load_pgserver

    base = tmp_path_factory.mktemp("pg")
    server = load_pgserver(base / "run").get_server(base / "data", cleanup_mode=None)
    yield server.get_uri()
    server.stop()


@pytest.fixture
def database_url(pg_server):
    """A new, empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(pg_server, name)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _with_dbname(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture
def db(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


# -- the filestore environment and CLI -------------------------------------------------
@pytest.fixture
def env(tmp_path, database_url) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL", "REDIS_URL"))}
    out.update(FILESTORE_HOME=str(tmp_path / "home"), DATABASE_URL=database_url, REDIS_URL="inline",
               PYTHONPATH=str(REPO))
    return out


def run_cli(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([*FILESTORE, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"filestore {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


@pytest.fixture
def cli(env):
    def call(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(env, *args, check=check)
    return call


# -- mounts ----------------------------------------------------------------------------
def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@dataclass
class Mount:
    env: dict[str, str]
    mountpoint: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Mount":
        require_fuse()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*FILESTORE, "mount", "--foreground", str(self.mountpoint)],
                                        env=self.env, stdout=log, stderr=log, cwd=REPO,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.process.poll() is not None:
                pytest.fail(f"mount exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mount not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mount did not exit after unmount:\n{self.log()}")
        code = self.process.returncode
        self.process = None
        assert code == 0, f"mount exited with {code}:\n{self.log()}"

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and clear the dead mount."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.process = None
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)


@dataclass
class Tracked:
    """A mounted filestore with one local backend named `local` (and any added later)."""
    env: dict[str, str]
    db: psycopg.Connection
    tmp: Path
    mount: Mount
    backend_root: Path
    backends: dict[str, Path] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.mount.mountpoint / "local"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The CLI is another process: it sees what the mount answered once that committed."""
        self.settle()
        return run_cli(self.env, *args, check=check)

    def restart(self) -> None:
        self.mount.stop()
        self.mount.start()

    def settle(self) -> None:
        """Wait until every command the mount has answered is committed: fsync of a directory
        returns once its group commit is durable (core.journal.pipeline)."""
        if self.mount.process is None or not is_mounted(self.mount.mountpoint):
            return
        fd = os.open(self.mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- database views (each waits for what the mount answered to be committed) ---------
    def node(self, rel: str, backend: str = "local") -> dict | None:
        """The node row at a backend-relative path, or None."""
        self.settle()
        node_id = self.db.execute("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s",
                                  (backend,)).fetchone()[0]
        for part in filter(None, rel.split("/")):
            row = self.db.execute("SELECT node_id FROM filestore.entries WHERE parent_id = %s AND name = %s",
                                  (node_id, os.fsencode(part))).fetchone()
            if row is None:
                return None
            node_id = row[0]
        cur = self.db.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM filestore.nodes WHERE id = %s", (node_id,)).fetchone()

    def journal(self, since: int = 0) -> list[dict]:
        self.settle()
        cur = self.db.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM filestore.journal_entries WHERE id > %s ORDER BY id", (since,)).fetchall()

    def last_journal_id(self) -> int:
        self.settle()
        return self.db.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0]


@pytest.fixture
def tracked(tmp_path, env, db, request):
    backend_root = tmp_path / "backend"
    backend_root.mkdir()
    # --xattrs: most tests also check the extended attributes tools copy; the default (none
    # kept, no probes) has tests of its own in test_xattrs.py
    run_cli(env, "backend", "add", "local", str(backend_root), "--xattrs")
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "test-mount.log")
    mount.start()
    t = Tracked(env, db, tmp_path, mount, backend_root, {"local": backend_root})
    try:
        yield t
    finally:
        if mount.process is not None:
            mount.stop()
    for name, root in t.backends.items():
        assert_consistent(db, name, root, home=Path(env["FILESTORE_HOME"]))
    assert_clean_log(mount.log_path, request)


def add_backend(t: Tracked, name: str, *, read_only: bool = False) -> Path:
    """Register another backend and remount so that it appears."""
    root = t.tmp / f"backend-{name}"
    root.mkdir()
    t.cli("backend", "add", name, str(root), *(["--read-only"] if read_only else []))
    t.backends[name] = root
    t.restart()
    return root


# -- invariants ------------------------------------------------------------------------
def disk_tree(root: Path) -> dict[bytes, tuple]:
    out = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        if os.fsencode(STAGING) in dirnames:  # ours at the root, a nested backend's below
            dirnames.remove(os.fsencode(STAGING))
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, base)
            kind = _kind(st.st_mode)
            size = st.st_size if kind == "file" else 0
            target = os.readlink(full) if kind == "symlink" else None
            out[rel] = (kind, size, stat.S_IMODE(st.st_mode) if kind != "symlink" else None, target)
    return out


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev"}[stat.S_IFMT(mode)]


def db_tree(db: psycopg.Connection, backend: str) -> dict[bytes, tuple]:
    rows = db.execute("""
        WITH RECURSIVE t(node_id, path) AS (
            SELECT e.node_id, e.name FROM filestore.entries e
              JOIN filestore.backend_mounts b ON b.root_node_id = e.parent_id WHERE b.name = %s
            UNION ALL
            SELECT e.node_id, t.path || '\\x2f'::bytea || e.name FROM filestore.entries e
              JOIN t ON e.parent_id = t.node_id)
        SELECT t.path, n.kind, n.size, n.mode, n.symlink_target, n.state
          FROM t JOIN filestore.nodes n ON n.id = t.node_id""", (backend,)).fetchall()
    out = {}
    for path, kind, size, mode, target, state in rows:
        assert state != "DELETED", f"deleted node still named {bytes(path)!r}"
        out[bytes(path)] = (kind, size if kind == "file" else 0, mode if kind != "symlink" else None,
                            bytes(target) if target is not None else None)
    return out


def assert_consistent(db: psycopg.Connection, backend: str, root: Path, *, home: Path | None = None) -> None:
    disk, recorded = disk_tree(root), db_tree(db, backend)
    missing = sorted(set(disk) - set(recorded))[:10]
    extra = sorted(set(recorded) - set(disk))[:10]
    assert not missing and not extra, f"{backend}: on disk only {missing}; in database only {extra}"
    differing = [(p, disk[p], recorded[p]) for p in disk if disk[p] != recorded[p]][:10]
    assert not differing, f"{backend}: disk vs database differ: {differing}"
    unsnapshotted = db.execute("""
        SELECT n.id FROM filestore.nodes n WHERE n.version > 1 AND NOT EXISTS (
            SELECT 1 FROM filestore.snapshots s WHERE s.node_id = n.id AND s.version = n.version)""").fetchall()
    assert not unsnapshotted, f"nodes without a snapshot of their version: {unsnapshotted}"
    misfiled = db.execute("""SELECT e.id, e.name, n.kind, e.is_dir FROM filestore.entries e
        JOIN filestore.nodes n ON n.id = e.node_id WHERE e.is_dir <> (n.kind = 'dir') LIMIT 5""").fetchall()
    assert not misfiled, f"entries whose is_dir (directory link counts) is not their node's kind: {misfiled}"
    staged = os.listdir(root / STAGING) if (root / STAGING).exists() else []
    assert not staged, f"staging files left behind: {staged}"
    assert_rollups_recount(db, backend)
    if home is not None:
        assert_intents_resolved(db, home)


def assert_rollups_recount(db: psycopg.Connection, backend: str) -> None:
    """Every directory's exact rollup (row + pending deltas) equals a recount of the tree."""
    from core.rollups import totals

    root = db.execute("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s", (backend,)).fetchone()[0]
    fresh = totals.recount(db, root)
    have = totals.totals(db, list(fresh))
    wrong = [(d, have[d], v) for d, v in fresh.items()
             if d not in have or (have[d].size_bytes, have[d].file_count, have[d].dir_count) != v][:5]
    assert not wrong, f"{backend}: rollups differ from a recount (dir, recorded, counted): {wrong}"


def assert_intents_resolved(db: psycopg.Connection, home: Path) -> None:
    """Every command the mount logged (intent or answer) has its journal row: nothing left
    answered and uncommitted, nothing unfinished."""
    import json as _json

    path = home / "intents.log"
    if not path.exists():
        return
    ids = set()
    for line in path.read_bytes().splitlines():
        data = _json.loads(line)
        ids.update(data["done"] if "done" in data else [data["id"]])
    if not ids:
        return
    found = {str(r[0]) for r in db.execute("SELECT request_id FROM filestore.journal_entries"
                                           " WHERE request_id = ANY(%s::uuid[])", (sorted(ids),)).fetchall()}
    assert ids <= found, f"intents never journaled: {sorted(ids - found)[:5]}"


def assert_clean_log(log_path: Path, request) -> None:
    """No traceback and no ERROR line in a mount's log, unless the test says it expects them."""
    if request.node.get_closest_marker("log_errors") is not None or not log_path.exists():
        return
    # pyfuse3 logs a reply to a request the kernel dropped (its caller was interrupted or
    # killed) as an error: that is the kernel's doing, not the mount's
    benign = ("fuse_reply_* failed with No such file or directory",
              # watchdog 7.0 at unmount: an inotify event arrives after its emitter stopped
              "queue_events() called when the thread is inactive")
    bad = [line for line in log_path.read_text(errors="replace").splitlines()
           if ("Traceback" in line or " ERROR " in line or line.startswith("ERROR"))
           and not any(b in line for b in benign)]
    assert not bad, f"unexpected errors in {log_path.name}:\n" + "\n".join(bad[:10])


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def native(tmp_path) -> Path:
    """A native directory on the same disk, for comparing behaviour."""
    path = tmp_path / "native"
    path.mkdir()
    return path


def require_fuse() -> None:
    """Unprivileged mounts need /dev/fuse (mode 0666 on common distributions, 0600 on some hosts)."""
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("this user cannot open /dev/fuse")


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")
