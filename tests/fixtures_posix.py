"""The POSIX conformance harness: one mount shared by a module, a native directory beside
it, and `conform`, which runs one scenario on both and compares what it saw and what it left.

A scenario is a plain function of a `Run`: it makes syscalls under `run.root` through
`run.do(label, fn, ...)`, which records the return value or the errno, and notes what it
observes (`run.note`). The two sides must record the same list and end with the same tree
(kinds, modes, owners, sizes, link counts, contents, symlink targets, extended attributes). Inode numbers and
absolute times differ between filesystems, so scenarios record relations (same inode,
ctime moved) instead of raw values.

`conform(..., user=User(...))` runs the scenario in a forked child that dropped to that
uid/gids first, so the kernel's permission checks (default_permissions on the mount, the
VFS natively) apply; the child sends its record back through a pipe.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import REPO, Mount, Tracked, _with_dbname, assert_consistent, run_cli


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    umask: int = 0o022


NOBODY = User(65534, 65534)
ALICE = User(4001, 4001, (4001, 4100))
BOB = User(4002, 4002, (4002,))


class Run:
    """What one side of a scenario saw, in order."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: list[tuple] = []

    def p(self, *parts: str | bytes) -> Path | bytes:
        if any(isinstance(x, bytes) for x in parts):
            return os.path.join(os.fsencode(self.root), *(os.fsencode(x) for x in parts))
        return self.root.joinpath(*parts)

    def do(self, label: str, fn: Callable, *args: Any, keep: Callable[[Any], Any] | None = None, **kwargs: Any) -> Any:
        """Call fn; record its result (through `keep`, default: nothing but success) or its errno."""
        try:
            value = fn(*args, **kwargs)
        except OSError as exc:
            self.seen.append((label, errno.errorcode.get(exc.errno, exc.errno)))
            return None
        self.seen.append((label, "ok") if keep is None else (label, "ok", keep(value)))
        return value

    def note(self, label: str, value: Any) -> None:
        self.seen.append((label, value))


def meta(st: os.stat_result) -> tuple:
    """The parts of a stat that must agree between two filesystems."""
    kind = stat.S_IFMT(st.st_mode)
    return (oct(kind), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, st.st_nlink,
            st.st_size if not stat.S_ISDIR(st.st_mode) else None, st.st_rdev)


def tree_state(root: Path) -> dict[bytes, tuple]:
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, base)
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(full, "rb") as f:
                        extra = hashlib.sha256(f.read()).hexdigest()
                except PermissionError:
                    extra = "unreadable"
            xattrs = None
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                # user.filestore.* are the mount's read-only rollup fields: no native counterpart
                xattrs = tuple(sorted((n, os.getxattr(full, n)) for n in os.listxattr(full)
                                      if not n.startswith("user.filestore.")))
            out[rel] = (*meta(st), extra, xattrs)
    return out


def _in_child(user: User, scenario: Callable[[Run], None], root: Path) -> list[tuple]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for real, then run the scenario
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(user.groups or (user.gid,)))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            os.umask(user.umask)
            run = Run(root)
            try:
                scenario(run)
                payload = ("ok", run.seen)
            except BaseException as exc:  # an assertion in the scenario: report it to the parent
                payload = ("raised", run.seen, f"{type(exc).__name__}: {exc}")
            data = pickle.dumps(payload)
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and chunks, "the unprivileged child failed"
    payload = pickle.loads(b"".join(chunks))
    if payload[0] == "raised":
        raise AssertionError(f"scenario raised as uid {user.uid}: {payload[2]} after {payload[1]}")
    return payload[1]


def run_side(scenario: Callable[[Run], None], root: Path, user: User | None) -> list[tuple]:
    if user is not None:
        return _in_child(user, scenario, root)
    run = Run(root)
    old = os.umask(0o022)
    try:
        scenario(run)
    finally:
        os.umask(old)
    return run.seen


@dataclass
class Sides:
    native: Path
    mount: Path
    tracked: Tracked

    def conform(self, scenario: Callable[[Run], None], *, user: User | None = None,
                setup: Callable[[Path], None] | None = None) -> list[tuple]:
        """Run `setup` (as root) then `scenario` on the native dir and on the mount; they must
        record the same observations and leave the same tree. Returns the native record."""
        if setup is not None:
            setup(self.native)
            setup(self.mount)
        assert tree_state(self.mount) == tree_state(self.native), "trees differ before the scenario"
        native = run_side(scenario, self.native, user)
        mounted = run_side(scenario, self.mount, user)
        if mounted != native:
            diff = [f"  {n!r}\n    mount: {m!r}" for n, m in zip(native, mounted) if n != m]
            if len(native) != len(mounted):
                diff.append(f"  native recorded {len(native)} steps, mount {len(mounted)}")
            pytest.fail("mount diverges from native:\n" + "\n".join(diff[:15]))
        after_native, after_mount = tree_state(self.native), tree_state(self.mount)
        if after_mount != after_native:
            keys = sorted(set(after_native) | set(after_mount))
            diff = [f"  {k!r}: native {after_native.get(k)} mount {after_mount.get(k)}"
                    for k in keys if after_native.get(k) != after_mount.get(k)]
            pytest.fail("resulting trees differ:\n" + "\n".join(diff[:15]))
        return native


def _open_up(path: Path) -> None:
    """Let other users traverse to `path` (pytest makes its temporary directories 0700)."""
    for p in [path, *path.parents]:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        if mode & 0o011 != 0o011:
            os.chmod(p, mode | 0o011)


@pytest.fixture(scope="module")
def shared_tracked(tmp_path_factory, pg_server):
    """One mount for a whole module of scenarios (each scenario gets its own directory)."""
    tmp = tmp_path_factory.mktemp("posix")
    _open_up(tmp)
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(pg_server, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL", "REDIS_URL"))}
    env.update(FILESTORE_HOME=str(tmp / "home"), DATABASE_URL=url, REDIS_URL="inline", PYTHONPATH=str(REPO))
    backend_root = tmp / "backend"
    backend_root.mkdir()
    os.chmod(backend_root, 0o755)
    (tmp / "native").mkdir(mode=0o755)
    run_cli(env, "backend", "add", "local", str(backend_root), "--xattrs")  # the xattr scenarios need them
    db = psycopg.connect(url, autocommit=True)
    mount = Mount(env, tmp / "mnt", tmp / "home" / "logs" / "test-mount.log").start()
    tracked = Tracked(env, db, tmp, mount, backend_root, {"local": backend_root})
    try:
        yield tracked
    finally:
        if mount.process is not None:
            mount.stop()
        try:
            assert_consistent(db, "local", backend_root)
        finally:
            db.close()
            with psycopg.connect(pg_server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sides(shared_tracked, request) -> Sides:
    """A fresh directory for this test on the native disk and in the shared mount."""
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:120]
    native = shared_tracked.tmp / "native" / label
    mounted = shared_tracked.path / label
    for d in (native, mounted):
        d.mkdir()
        os.chmod(d, 0o777)
    return Sides(native, mounted, shared_tracked)


def wait_tick() -> None:
    """Let the clock move past the filesystem's timestamp granularity (ext4: one jiffy), so that
    a time a step sets is visibly later than the one before. Not a timing assertion."""
    time.sleep(0.02)


__all__ = ["ALICE", "BOB", "NOBODY", "Run", "Sides", "User", "meta", "tree_state", "wait_tick"]
