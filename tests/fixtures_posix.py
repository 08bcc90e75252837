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

Every module of scenarios runs against each backend kind (`BACKEND_KINDS`: a local backend,
and an S3 prefix on moto's server), one shared mount per module and kind. What an S3 backend
cannot do the way a native filesystem does is listed once, in `DIFFERENCES`, each with its
errno and reason; on the native side of an S3 run those calls answer that errno (`Limits`),
so the rest of the scenario is still decided by the native filesystem and everything else
must match it.
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
from typing import Any, Self

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


# == what an S3 backend does differently from a native filesystem, and why ==================
@dataclass(frozen=True)
class Difference:
    """One thing a backend kind cannot do as a native filesystem does: the calls it concerns,
    the errno they answer instead, and why."""
    case: str
    calls: tuple[str, ...]
    errno: int
    reason: str


DIFFERENCES: dict[str, tuple[Difference, ...]] = {
    "local": (),
    "s3": (
        Difference("a hard link (link(2) of an existing file to a free name)", ("link",), errno.EPERM,
                   "S3 has no hard links: an object has exactly one key"),
        Difference("a new name that is not UTF-8", ("open", "mkdir", "symlink", "mknod", "mkfifo", "link", "rename"),
                   errno.EILSEQ, "S3 keys are UTF-8; a name is refused before anything is uploaded, never mangled"),
        Difference("a new name whose key would be over 1,024 bytes (prefix, path and a directory marker's '/')",
                   ("open", "mkdir", "symlink", "mknod", "mkfifo", "link", "rename"), errno.ENAMETOOLONG,
                   "S3's limit on a key's length"),
        Difference("renameat2(RENAME_EXCHANGE) of two existing names", ("renameat2",), errno.EINVAL,
                   "S3 cannot swap two keys atomically (what Linux filesystems without it answer)"),
        Difference("a new name with a newline (test endpoint only)",
                   ("mkdir", "symlink", "mknod", "mkfifo", "link", "rename"), errno.ENOENT,
                   "moto's server, the S3 endpoint of the tests, answers 404 to a PUT or COPY of a key with a "
                   "newline; S3 itself stores such keys (and lists them URL-encoded, as boto3 asks). A new "
                   "file's create is not refused: its object is written back after close (D48), "
                   "where moto's refusal is an upload retried, so no scenario creates such a file"),
    ),
}
MAX_KEY_BYTES = 1024
BACKEND_KINDS = tuple(DIFFERENCES)


def differs(kind: str, call: str) -> Difference | None:
    """The listed difference of `kind` for `call`, if any (tests that cannot run a step on a
    kind ask here, so the list stays the one place that says so)."""
    return next((d for d in DIFFERENCES[kind] if call in d.calls), None)


class Limits:
    """The native side of a run against a backend kind with differences: the calls listed in
    DIFFERENCES answer their errno where the backend would, and otherwise run natively.
    `key_prefix` is the bytes the backend puts before a path under `base` (an S3 key prefix)."""

    def __init__(self, kind: str, base: Path, key_prefix: bytes):
        self.kind = kind
        self.base = os.fsencode(base)
        self.key_prefix = key_prefix
        self._saved: dict[str, Any] = {}

    def _free(self, path) -> bool:
        """Would a native call go ahead with a new name at `path`: its parent exists and may be
        written, the name is free and of a legal length (the kernel checks these first)?"""
        full = os.path.abspath(os.fsencode(path))
        parent, name = os.path.split(full)
        return (os.path.isdir(parent) and not os.path.lexists(full) and len(name) <= 255
                and os.access(parent, os.W_OK | os.X_OK))

    def _refusal(self, path, call: str) -> int | None:
        """The errno the backend answers for a new name at `path` where a native call goes ahead."""
        if not self._free(path):
            return None
        rel = os.path.relpath(os.path.abspath(os.fsencode(path)), self.base)
        for diff in DIFFERENCES[self.kind]:
            if call not in diff.calls:
                continue
            if diff.errno == errno.EILSEQ:
                try:
                    rel.decode("utf-8")
                except UnicodeDecodeError:
                    return diff.errno
            elif (diff.errno == errno.ENAMETOOLONG and len(self.key_prefix + rel) + 1 > MAX_KEY_BYTES) or \
                    (diff.errno == errno.ENOENT and b"\n" in os.path.basename(rel)):
                return diff.errno
        return None

    @staticmethod
    def _raise(code: int, path) -> None:
        raise OSError(code, os.strerror(code), path)

    def __enter__(self) -> Self:
        if not DIFFERENCES[self.kind]:
            return self
        real = {n: getattr(os, n) for n in ("open", "mkdir", "symlink", "mknod", "mkfifo", "link", "rename")}
        self._saved = real
        model = self

        def new_name(call: str, path) -> None:
            code = model._refusal(path, call)
            if code is not None:
                model._raise(code, path)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if flags & os.O_CREAT and dir_fd is None and not isinstance(path, int):
                new_name("open", path)
            return real["open"](path, flags, mode, dir_fd=dir_fd)

        def mkdir(path, mode=0o777, *, dir_fd=None):
            new_name("mkdir", path)
            return real["mkdir"](path, mode, dir_fd=dir_fd)

        def symlink(src, dst, target_is_directory=False, *, dir_fd=None):
            new_name("symlink", dst)
            return real["symlink"](src, dst, target_is_directory, dir_fd=dir_fd)

        def mknod(path, mode=0o600, device=0, *, dir_fd=None):
            new_name("mknod", path)
            return real["mknod"](path, mode, device, dir_fd=dir_fd)

        def mkfifo(path, mode=0o666, *, dir_fd=None):
            new_name("mkfifo", path)
            return real["mkfifo"](path, mode, dir_fd=dir_fd)

        def link(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
            new_name("link", dst)
            hard_links = differs(model.kind, "link")
            if hard_links is not None and os.path.lexists(src) and model._free(dst):
                st = os.stat(src) if follow_symlinks else os.lstat(src)
                if not stat.S_ISDIR(st.st_mode):  # a directory: EPERM natively too
                    model._raise(hard_links.errno, dst)
            return real["link"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
                                follow_symlinks=follow_symlinks)

        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            if os.path.lexists(src):
                new_name("rename", dst)
            return real["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        for name, fn in (("open", open_), ("mkdir", mkdir), ("symlink", symlink), ("mknod", mknod),
                         ("mkfifo", mkfifo), ("link", link), ("rename", rename)):
            setattr(os, name, fn)
        _LIMITS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(os, name, fn)
        if self._saved:
            _LIMITS.remove(self)
        self._saved = {}

    def exchange(self, old, new) -> None:
        diff = differs(self.kind, "renameat2")
        if diff is not None and os.path.lexists(old) and os.path.lexists(new):
            self._raise(diff.errno, new)


_LIMITS: list[Limits] = []


def renameat2(old, new, flags: int) -> None:
    """renameat2(2) (Python has no binding); RENAME_EXCHANGE answers as DIFFERENCES says on the
    native side of a run against a backend that cannot exchange."""
    import ctypes

    if flags == 2 and _LIMITS:
        _LIMITS[-1].exchange(old, new)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


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
    kind: str = "local"  # the backend kind under the mount (a key of DIFFERENCES)
    key_prefix: bytes = b""  # what the backend puts before a path below the native base

    def limits(self) -> Limits:
        """The native side of this kind's runs: its DIFFERENCES applied."""
        return Limits(self.kind, self.native.parent, self.key_prefix)

    def conform(self, scenario: Callable[[Run], None], *, user: User | None = None,
                setup: Callable[[Path], None] | None = None) -> list[tuple]:
        """Run `setup` (as root) then `scenario` on the native dir and on the mount; they must
        record the same observations and leave the same tree. Returns the native record."""
        if setup is not None:
            setup(self.native)
            setup(self.mount)
        assert tree_state(self.mount) == tree_state(self.native), "trees differ before the scenario"
        with self.limits():
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


def _database(pg_server) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, _with_dbname(pg_server, name)


S3_PREFIX = "posix"  # the shared S3 mount's prefix: keys are posix/<test>/<path>


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def shared_tracked(request, tmp_path_factory, pg_server):
    """One mount for a whole module of scenarios and one backend kind (each scenario gets its
    own directory): a local directory, or an S3 prefix on moto's server (write-back on, as by
    default). Tests take `shared_tracked.kind`."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"posix-{kind}")
    _open_up(tmp)
    name, url = _database(pg_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL", "REDIS_URL"))}
    env.update(FILESTORE_HOME=str(tmp / "home"), DATABASE_URL=url, REDIS_URL="inline", PYTHONPATH=str(REPO))
    (tmp / "native").mkdir(mode=0o755)
    db = psycopg.connect(url, autocommit=True)
    if kind == "s3":
        from fixtures_s3 import S3_ENV, s3_client, start_s3_mount

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"b-{uuid.uuid4().hex[:16]}"
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=bucket)
        env.update(S3_ENV)
        tracked = start_s3_mount(tmp, env, db, endpoint, bucket, prefix=S3_PREFIX, xattrs=True)
        tracked.key_prefix = f"{S3_PREFIX}/".encode()
    else:
        backend_root = tmp / "backend"
        backend_root.mkdir()
        os.chmod(backend_root, 0o755)
        run_cli(env, "backend", "add", "local", str(backend_root), "--xattrs")  # the xattr scenarios need them
        mount = Mount(env, tmp / "mnt", tmp / "home" / "logs" / "test-mount.log").start()
        tracked = Tracked(env, db, tmp, mount, backend_root, {"local": backend_root})
        tracked.key_prefix = b""
    tracked.kind = kind
    try:
        yield tracked
    finally:
        try:
            if kind == "s3":
                from fixtures_s3 import stop_and_check

                stop_and_check(tracked, s3, prefix=f"{S3_PREFIX}/")
            else:
                if tracked.mount.process is not None:
                    tracked.mount.stop()
                assert_consistent(db, "local", tracked.backend_root)
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
    return Sides(native, mounted, shared_tracked, shared_tracked.kind, shared_tracked.key_prefix)


@pytest.fixture(params=BACKEND_KINDS)
def fs(request):
    """A mount of its own for one test, of each backend kind: the `tracked` local one, or an S3
    prefix on moto's server (added with --xattrs, write-back on); `fs.kind` says which."""
    if request.param == "local":
        t = request.getfixturevalue("tracked")
        t.kind = "local"
        yield t
        return
    from fixtures_s3 import start_s3_mount, stop_and_check

    t = start_s3_mount(request.getfixturevalue("tmp_path"), request.getfixturevalue("env"),
                       request.getfixturevalue("db"), request.getfixturevalue("s3_endpoint"),
                       request.getfixturevalue("bucket"), xattrs=True)
    t.kind = "s3"
    s3 = request.getfixturevalue("s3")
    try:
        yield t
    finally:
        stop_and_check(t, s3)
        from conftest import assert_clean_log

        assert_clean_log(t.mount.log_path, request)


def hard_links(fs) -> bool:
    return differs(fs.kind, "link") is None


def stored(fs, rel: str) -> bytes:
    """What the backend itself holds at `rel` (S3: once the uploads landed)."""
    if fs.kind == "local":
        return (fs.backend_root / rel).read_bytes()
    from fixtures_s3 import s3_client, wait_uploaded

    wait_uploaded(fs)
    return s3_client(fs.endpoint).get_object(Bucket=fs.bucket, Key=f"data/{rel}")["Body"].read()


def wait_tick() -> None:
    """Let the clock move past the filesystem's timestamp granularity (ext4: one jiffy), so that
    a time a step sets is visibly later than the one before. Not a timing assertion."""
    time.sleep(0.02)


__all__ = ["ALICE", "BACKEND_KINDS", "BOB", "DIFFERENCES", "NOBODY", "Difference", "Run", "Sides", "User", "differs",
           "hard_links", "meta", "renameat2", "stored", "tree_state", "wait_tick"]
