"""Confinement: nothing reaches outside a backend root, neither through `..` nor through a symlink
planted in the tree (by another process, behind the mount's back), and the executor's staging
area cannot be reached through the mount.

The executor cases run LocalExecutor directly on temporary directories, once with openat2 and
once with the component-by-component fallback used where openat2 is missing.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest
from conftest import STAGING

import executors.local as local
from executors.base import ExecutorError
from executors.local import LocalExecutor

SECRET = b"top secret\n"
REFUSED_THROUGH_MOUNT = (errno.EACCES, errno.ENOENT, errno.ELOOP)


def snapshot(directory) -> dict:
    """Every path below `directory` with its kind, mode and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[full] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[full] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(full, "rb") as f:
                    out[full] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out


@pytest.fixture(params=["openat2", "walk"])
def resolution(request, monkeypatch):
    """Run each executor case with openat2 and with the O_NOFOLLOW walk."""
    if request.param == "walk":
        monkeypatch.setattr(local, "_have_openat2", False)
    else:
        try:
            fd = local._openat2(local._AT_FDCWD, b".", os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                pytest.skip("openat2 is not available on this kernel")
            raise
        os.close(fd)
        monkeypatch.setattr(local, "_have_openat2", True)
    return request.param


@pytest.fixture
def planted(tmp_path, resolution):
    """A backend root holding `evil -> <outside>` (a directory) and `evil_file -> <outside>/secret`."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    os.chmod(outside / "secret", 0o600)
    (outside / "emptydir").mkdir()
    os.symlink("secret", outside / "link")
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"inside")
    (root / "inner").mkdir()
    os.symlink(outside, root / "evil")
    os.symlink(outside / "secret", root / "evil_file")
    executor = LocalExecutor(root)
    before = snapshot(outside)
    yield executor, root, outside
    executor.close()
    assert snapshot(outside) == before, "something outside the root changed"
    assert (outside / "secret").read_bytes() == SECRET
    assert stat.S_IMODE(os.stat(outside / "secret").st_mode) == 0o600


ESCAPES = {
    "stat": lambda ex: ex.stat(b"evil/secret"),
    "open_read": lambda ex: ex.open_file(b"evil/secret", write=False),
    "open_write": lambda ex: ex.open_file(b"evil/secret", write=True),
    "listdir": lambda ex: ex.listdir(b"evil"),
    "readlink": lambda ex: ex.readlink(b"evil/link"),
    "create_file": lambda ex: ex.create_file(b"evil", b"x", 0o644, os.getuid(), os.getgid()),
    "mkdir": lambda ex: ex.mkdir(b"evil", b"d", 0o755, os.getuid(), os.getgid()),
    "symlink": lambda ex: ex.symlink(b"evil", b"l", b"/etc/passwd", os.getuid(), os.getgid()),
    "unlink": lambda ex: ex.unlink(b"evil", b"secret"),
    "rmdir": lambda ex: ex.rmdir(b"evil", b"emptydir"),
    "rename_into": lambda ex: ex.rename(b"", b"f", b"evil", b"f"),
    "rename_out": lambda ex: ex.rename(b"evil", b"secret", b"", b"stolen"),
    "set_attrs_mode": lambda ex: ex.set_attrs(b"evil/secret", mode=0o777),
    "set_attrs_size": lambda ex: ex.set_attrs(b"evil/secret", size=0),
    "set_attrs_times": lambda ex: ex.set_attrs(b"evil/secret", times_ns=(0, 0)),
    "land": lambda ex: _land(ex, b"evil", b"secret"),
    "sync_dir": lambda ex: ex.sync_dir(b"evil"),
}


def _land(ex: LocalExecutor, parent: bytes, name: bytes):
    fd = ex.stage("1.escape")
    try:
        os.write(fd, b"overwritten")
    finally:
        os.close(fd)
    try:
        return ex.land("1.escape", parent, name, mode=0o644, uid=os.getuid(), gid=os.getgid(),
                       times_ns=None, durable=False)
    finally:
        ex.discard("1.escape")


@pytest.mark.parametrize("operation", sorted(ESCAPES))
def test_symlinked_directory_does_not_lead_outside(planted, operation):
    executor, root, outside = planted
    with pytest.raises(ExecutorError):
        result = ESCAPES[operation](executor)
        if isinstance(result, int):
            os.close(result)
    assert sorted(os.listdir(outside)) == ["emptydir", "link", "secret"]
    assert (root / "f").read_bytes() == b"inside"
    assert not (root / "stolen").exists()


DOTDOT = {
    "stat": lambda ex: ex.stat(b"../outside/secret"),
    "stat_inner": lambda ex: ex.stat(b"inner/../../outside/secret"),
    "open_read": lambda ex: ex.open_file(b"../outside/secret", write=False),
    "open_write": lambda ex: ex.open_file(b"inner/../../outside/secret", write=True),
    "listdir": lambda ex: ex.listdir(b"../outside"),
    "create_file": lambda ex: ex.create_file(b"../outside", b"x", 0o644, os.getuid(), os.getgid()),
    "create_dotdot_name": lambda ex: ex.create_file(b"inner", b"..", 0o644, os.getuid(), os.getgid()),
    "mkdir": lambda ex: ex.mkdir(b"inner/..", b"d", 0o755, os.getuid(), os.getgid()),
    "unlink": lambda ex: ex.unlink(b"../outside", b"secret"),
    "rename_into": lambda ex: ex.rename(b"", b"f", b"../outside", b"f"),
    "rename_to_dotdot_name": lambda ex: ex.rename(b"", b"f", b"inner", b".."),
    "set_attrs": lambda ex: ex.set_attrs(b"../outside/secret", mode=0o777),
}


@pytest.mark.parametrize("operation", sorted(DOTDOT))
def test_dotdot_paths_are_refused(planted, operation):
    executor, root, outside = planted
    with pytest.raises(ExecutorError):
        result = DOTDOT[operation](executor)
        if isinstance(result, int):
            os.close(result)
    assert sorted(os.listdir(outside)) == ["emptydir", "link", "secret"]
    assert (root / "f").read_bytes() == b"inside"
    assert sorted(os.listdir(root / "inner")) == []


def test_open_file_refuses_a_symlink_to_a_file_outside(planted):
    executor, root, outside = planted
    for write in (False, True):
        with pytest.raises(ExecutorError):
            os.close(executor.open_file(b"evil_file", write=write))


def test_acting_on_the_symlink_itself_leaves_its_target_alone(planted):
    executor, root, outside = planted
    # Changing attributes of the link never follows it.
    executor.set_attrs(b"evil_file", mode=0o777, times_ns=(0, 0))
    with pytest.raises(ExecutorError):
        executor.set_attrs(b"evil_file", size=0)
    st = executor.stat(b"evil_file")
    assert st.kind == "symlink" and st.target == os.fsencode(outside / "secret")
    # Removing and renaming the link act on the link.
    executor.rename(b"", b"evil_file", b"inner", b"moved")
    assert os.readlink(root / "inner" / "moved") == str(outside / "secret")
    executor.unlink(b"inner", b"moved")
    assert not os.path.lexists(root / "inner" / "moved")


def test_staging_area_is_not_reachable_by_path(planted):
    executor, root, outside = planted
    fd = executor.stage("2.hidden")
    os.close(fd)
    with pytest.raises(ExecutorError):
        executor.stat(STAGING.encode() + b"/2.hidden")
    with pytest.raises(ExecutorError):
        os.close(executor.open_file(STAGING.encode() + b"/2.hidden", write=False))
    with pytest.raises(ExecutorError):
        executor.create_file(STAGING.encode(), b"x", 0o644, os.getuid(), os.getgid())
    assert STAGING.encode() not in [name for name, _ in executor.listdir(b"")]
    assert executor.staged() == ["2.hidden"]
    executor.discard("2.hidden")


# -- through a real mount: a symlink planted behind the mount's back -----------------------
@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(SECRET)
    os.chmod(path / "secret", 0o600)
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "something outside the backend root changed"


def _append(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _outcome(action) -> int | str:
    """The errno an operation through the mount failed with, or "succeeded"."""
    try:
        action()
    except OSError as exc:
        return exc.errno
    return "succeeded"


def _errno_of(action) -> int:
    with pytest.raises(OSError) as failure:
        action()
    return failure.value.errno


def test_planted_directory_symlink_is_not_followed_through_the_mount(tracked, outside):
    sub = tracked.path / "sub"
    os.mkdir(sub, 0o750)
    (sub / "secret").write_bytes(b"the tracked one")
    recorded = tracked.node("sub/secret")
    disk_sub = tracked.backend_root / "sub"
    saved = tracked.tmp / "saved-sub"
    # Behind the mount's back: the tracked directory becomes a symlink to a directory outside.
    os.rename(disk_sub, saved)
    os.symlink(outside, disk_sub)
    try:
        outcomes = {
            "create sub/x": _outcome(lambda: (sub / "x").write_bytes(b"planted")),
            "mkdir sub/d": _outcome(lambda: os.mkdir(sub / "d")),
            "symlink sub/l": _outcome(lambda: os.symlink("/etc/passwd", sub / "l")),
            # The mount knows a `sub/secret`: its content must not come from outside.
            "read sub/secret": _outcome(lambda: _read(sub / "secret")),
            "append sub/secret": _outcome(lambda: _append(sub / "secret", b"appended")),
            "truncate sub/secret": _outcome(lambda: os.truncate(sub / "secret", 0)),
            "chmod sub/secret": _outcome(lambda: os.chmod(sub / "secret", 0o777)),
            "unlink sub/secret": _outcome(lambda: os.unlink(sub / "secret")),
            "rename sub/secret": _outcome(lambda: os.rename(sub / "secret", tracked.path / "stolen")),
        }
        refused_badly = {op: errno.errorcode.get(code, code) for op, code in outcomes.items()
                         if code not in REFUSED_THROUGH_MOUNT}
        assert refused_badly == {}, f"expected EACCES/ENOENT/ELOOP for every operation: {outcomes}"
        assert sorted(os.listdir(outside)) == ["secret"]
        assert not (tracked.backend_root / "stolen").exists()
    finally:
        os.unlink(disk_sub)
        os.rename(saved, disk_sub)
    # Restored, the tree is served as before and nothing was recorded for the refused changes.
    assert (sub / "secret").read_bytes() == b"the tracked one"
    assert tracked.node("sub/x") is None and tracked.node("stolen") is None
    after = tracked.node("sub/secret")
    assert (after["id"], after["size"], after["mode"]) == (recorded["id"], recorded["size"], recorded["mode"])


def test_planted_file_symlink_is_not_followed_through_the_mount(tracked, outside):
    f = tracked.path / "f"
    f.write_bytes(b"tracked content")
    disk_f = tracked.backend_root / "f"
    saved = tracked.tmp / "saved-f"
    os.rename(disk_f, saved)
    os.symlink(outside / "secret", disk_f)
    try:
        outcomes = {
            "read f": _outcome(lambda: _read(f)),
            "append f": _outcome(lambda: _append(f, b"appended")),
            "truncate f": _outcome(lambda: os.truncate(f, 0)),
        }
        refused_badly = {op: errno.errorcode.get(code, code) for op, code in outcomes.items()
                         if code not in REFUSED_THROUGH_MOUNT}
        assert refused_badly == {}, f"expected EACCES/ENOENT/ELOOP for every operation: {outcomes}"
    finally:
        os.unlink(disk_f)
        os.rename(saved, disk_f)
    assert f.read_bytes() == b"tracked content"
    assert tracked.node("f")["size"] == len(b"tracked content")


# -- the staging area through the mount -----------------------------------------------------
def test_staging_name_is_reserved(tracked):
    staging = tracked.path / STAGING
    assert STAGING not in os.listdir(tracked.path)
    assert _errno_of(lambda: os.stat(staging)) == errno.ENOENT
    assert _errno_of(lambda: os.open(staging, os.O_RDONLY)) == errno.ENOENT
    assert _errno_of(lambda: os.open(staging, os.O_WRONLY | os.O_CREAT, 0o644)) == errno.EINVAL
    assert _errno_of(lambda: os.mkdir(staging)) == errno.EINVAL
    assert _errno_of(lambda: os.symlink("x", staging)) == errno.EINVAL
    (tracked.path / "f").write_bytes(b"x")
    assert _errno_of(lambda: os.rename(tracked.path / "f", staging)) == errno.EINVAL
    assert (tracked.path / "f").read_bytes() == b"x"
    # A file being written is staged, yet the staging area stays invisible through the mount.
    with open(tracked.path / "g", "wb") as g:
        g.write(b"staged for now")
        g.flush()
        assert os.listdir(tracked.backend_root / STAGING) != []
        assert STAGING not in os.listdir(tracked.path)
        assert _errno_of(lambda: os.listdir(staging)) == errno.ENOENT
    assert STAGING not in os.listdir(tracked.path)
    assert tracked.node(STAGING) is None
    # Reserved in every directory too: a backend nested in this one keeps its staging area there.
    os.mkdir(tracked.path / "sub")
    assert _errno_of(lambda: os.mkdir(tracked.path / "sub" / STAGING)) == errno.EINVAL
    (tracked.backend_root / "sub" / STAGING).mkdir()  # a nested backend's, made on the disk
    assert os.listdir(tracked.path / "sub") == []
    (tracked.backend_root / "sub" / STAGING).rmdir()
