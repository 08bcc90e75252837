"""Errno exactness through the real mount.

Every case runs the same operation on the mount and on a native directory holding the same
tree, and asserts: the native errno is the one POSIX/Linux gives (so the reference itself is
checked), the mount gives exactly the same errno, neither tree changed (on the backend disk,
through the mount, natively), and the journal gained no committed row (a refusal that reached
the filesystem may leave rows with status 'failed' carrying that errno; a refusal the kernel
makes itself, such as mkdir of an existing name, leaves none).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import STAGING, add_backend

LONG = "n" * 256  # one byte over NAME_MAX
LONGEST = "m" * 255  # exactly NAME_MAX


# -- helpers ---------------------------------------------------------------------------
def tree(root: Path, *, skip_staging: bool = False) -> dict[str, tuple]:
    """Every entry below root: kind, permission bits, and content hash or symlink target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_staging and Path(dirpath) == Path(root) and STAGING in dirnames:
            dirnames.remove(STAGING)
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = str(full.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size,
                            hashlib.sha256(full.read_bytes()).hexdigest())
    out["."] = ("root", stat.S_IMODE(os.lstat(root).st_mode))
    return out


def outcome(op: Callable[[Path], object], base: Path) -> int | None:
    """The errno `op` fails with on `base`, or None when it succeeds."""
    try:
        op(base)
    except OSError as exc:
        assert exc.errno is not None, f"OSError without errno: {exc!r}"
        return exc.errno
    return None


def populate(base: Path) -> None:
    """The same starting tree on both sides."""
    (base / "f").write_bytes(b"data\n")
    (base / "d").mkdir()
    (base / "full").mkdir()
    (base / "full" / "x").write_bytes(b"x\n")
    (base / "tree" / "sub").mkdir(parents=True)
    os.symlink("f", base / "link")


def name_of(code: int | None) -> str:
    return "success" if code is None else errno.errorcode.get(code, str(code))


class Pair:
    """A tracked backend (`base` in the mount, `disk` its root) and a native reference dir."""

    def __init__(self, tracked, base: Path, disk: Path, native: Path):
        self.tracked = tracked
        self.base = base
        self.disk = disk
        self.native = native

    def check(self, op: Callable[[Path], object], expected: int | None) -> list[dict]:
        """Run op on both trees; same errno, no change anywhere, no committed journal row."""
        t = self.tracked
        since = t.last_journal_id()
        disk_before = tree(self.disk)
        native_before = tree(self.native)
        assert tree(self.base) == native_before, "trees differ before the operation"

        got_native = outcome(op, self.native)
        got_mount = outcome(op, self.base)

        assert got_native == expected, \
            f"reference: native gave {name_of(got_native)}, expected {name_of(expected)}"
        assert got_mount == got_native, \
            f"mount gave {name_of(got_mount)}, native gave {name_of(got_native)}"
        assert tree(self.native) == native_before, "the native operation changed the native tree"
        assert tree(self.disk) == disk_before, "the failed operation changed the backend disk"
        assert tree(self.base) == native_before, "the mount view differs from the native tree"

        rows = t.journal(since)
        committed = [(r["command"], r["path"]) for r in rows if r["status"] != "failed"]
        assert not committed, f"a failed operation left committed journal rows: {committed}"
        wrong = [(r["command"], r["errno"]) for r in rows if r["errno"] != expected]
        assert not wrong, f"failed journal rows with another errno than {name_of(expected)}: {wrong}"
        return rows


@pytest.fixture
def pair(tracked, native) -> Pair:
    populate(tracked.path)
    populate(native)
    return Pair(tracked, tracked.path, tracked.backend_root, native)


def _open(path: Path, flags: int, mode: int = 0o644) -> None:
    os.close(os.open(path, flags, mode))


def _read(path: Path) -> None:
    with open(path, "rb") as f:
        f.read()


def _write(path: Path, data: bytes = b"new\n") -> None:
    with open(path, "wb") as f:
        f.write(data)


def _bind_mount(source: Path, target: Path, *, read_only: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip("the native reference is a bind mount, which needs root")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", *(["-o", "ro"] if read_only else []), str(source), str(target)],
                   check=True, capture_output=True)


def _unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


# -- the cases -------------------------------------------------------------------------
# Grouped by errno; every case of a group runs (on one mount) and all mismatches are reported.
CASES = {
    "ENOENT": [
        ("open-missing", lambda b: _read(b / "missing")),
        ("unlink-missing", lambda b: os.unlink(b / "missing")),
        ("rmdir-missing", lambda b: os.rmdir(b / "missing")),
        ("rename-missing-source", lambda b: os.rename(b / "missing", b / "other")),
        ("stat-in-missing-dir", lambda b: os.stat(b / "nodir" / "x")),
    ],
    "EEXIST": [
        ("open-creat-excl-existing", lambda b: _open(b / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        ("mkdir-existing", lambda b: os.mkdir(b / "d")),
        ("mkdir-onto-file", lambda b: os.mkdir(b / "f")),
        ("symlink-onto-existing", lambda b: os.symlink("anything", b / "f")),
    ],
    "ENOTEMPTY": [
        ("rmdir-nonempty", lambda b: os.rmdir(b / "full")),
        ("rename-dir-onto-nonempty-dir", lambda b: os.rename(b / "d", b / "full")),
    ],
    "ENOTDIR": [
        ("open-through-file", lambda b: _read(b / "f" / "x")),
        ("rmdir-file", lambda b: os.rmdir(b / "f")),
        ("rename-dir-onto-file", lambda b: os.rename(b / "d", b / "f")),
    ],
    "EISDIR": [
        ("unlink-dir", lambda b: os.unlink(b / "d")),
        ("open-dir-wronly", lambda b: _open(b / "d", os.O_WRONLY)),
        ("rename-file-onto-dir", lambda b: os.rename(b / "f", b / "d")),
    ],
    "EINVAL": [
        ("rename-dir-into-own-subtree", lambda b: os.rename(b / "tree", b / "tree" / "sub" / "inner")),
    ],
    "ENAMETOOLONG": [
        ("create-256-byte-name", lambda b: _write(b / LONG)),
        ("mkdir-256-byte-name", lambda b: os.mkdir(b / LONG)),
        ("rename-to-256-byte-name", lambda b: os.rename(b / "f", b / LONG)),
    ],
}


def check_all(pair: Pair, cases, expected: int | None) -> None:
    failures = []
    for name, op in cases:
        try:
            pair.check(op, expected)
        except AssertionError as exc:
            failures.append(f"{name}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("code", list(CASES))
def test_errno_matches_native(pair, code):
    check_all(pair, CASES[code], getattr(errno, code))


def test_lookup_of_a_256_byte_name_is_enametoolong(pair):
    """Not only creating: looking a name over NAME_MAX up fails with ENAMETOOLONG, not ENOENT."""
    check_all(pair, [("stat", lambda b: os.stat(b / LONG)),
                     ("open", lambda b: _read(b / LONG)),
                     ("unlink", lambda b: os.unlink(b / LONG))], errno.ENAMETOOLONG)


def test_255_byte_names_work(pair):
    """NAME_MAX itself is allowed for create, mkdir and a rename target, and is journaled."""
    since = pair.tracked.last_journal_id()
    for base in (pair.native, pair.base):
        assert outcome(lambda b: _write(b / LONGEST, b"long\n"), base) is None
        assert outcome(lambda b: os.mkdir(b / ("d" + LONGEST[1:])), base) is None
        assert outcome(lambda b: os.rename(b / "f", b / ("f" + LONGEST[1:])), base) is None
    assert tree(pair.base) == tree(pair.native)
    assert tree(pair.disk, skip_staging=True) == tree(pair.native)
    rows = [(r["command"], r["status"]) for r in pair.tracked.journal(since)]
    assert ("create", "committed") in rows and ("mkdir", "committed") in rows \
        and ("rename", "committed") in rows, rows
    assert all(status == "committed" for _, status in rows), rows


# -- failures that reach the filesystem are journaled once -----------------------------
def test_rmdir_nonempty_journals_one_failed_row(pair):
    node = pair.tracked.node("full")
    rows = pair.check(lambda b: os.rmdir(b / "full"), errno.ENOTEMPTY)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["command"], row["status"], row["errno"]) == ("rmdir", "failed", errno.ENOTEMPTY)
    assert row["node_id"] == node["id"] and row["path"] == "full"
    assert row["error"]
    assert pair.tracked.node("full")["version"] == node["version"]


def test_rename_onto_nonempty_dir_journals_one_failed_row(pair):
    rows = pair.check(lambda b: os.rename(b / "d", b / "full"), errno.ENOTEMPTY)
    assert [(r["command"], r["status"], r["errno"]) for r in rows] == [("rename", "failed", errno.ENOTEMPTY)]
    assert rows[0]["node_id"] == pair.tracked.node("d")["id"]


# -- EROFS -----------------------------------------------------------------------------
def _populate_ro(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "ro.txt").write_bytes(b"read me\n")


def add_readonly_backend(t, name: str = "ro") -> Path:
    """A read-only backend that already holds a file (imported at `backend add`)."""
    root = t.tmp / f"backend-{name}"
    _populate_ro(root)
    t.cli("backend", "add", name, str(root), "--read-only")
    t.backends[name] = root
    t.restart()
    return root


@pytest.fixture
def ro_pair(tracked, tmp_path):
    """The read-only backend, and as reference a read-only bind mount of the same tree."""
    root = add_readonly_backend(tracked)
    source = tmp_path / "native-ro-src"
    _populate_ro(source)
    reference = tmp_path / "native-ro"
    _bind_mount(source, reference, read_only=True)
    try:
        yield Pair(tracked, tracked.mount.mountpoint / "ro", root, reference)
    finally:
        _unmount(reference)


RO_CASES = [
    ("create", lambda b: _write(b / "new")),
    ("open-creat-excl", lambda b: _open(b / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("mkdir", lambda b: os.mkdir(b / "newdir")),
    ("symlink", lambda b: os.symlink("ro.txt", b / "newlink")),
    ("unlink-existing", lambda b: os.unlink(b / "ro.txt")),
    ("rmdir-existing", lambda b: os.rmdir(b / "sub")),
    ("rename", lambda b: os.rename(b / "ro.txt", b / "moved.txt")),
    ("chmod-backend-root", lambda b: os.chmod(b, 0o700)),
    ("chmod-file", lambda b: os.chmod(b / "ro.txt", 0o600)),
    ("utime-file", lambda b: os.utime(b / "ro.txt", ns=(10**18, 10**18))),
    ("truncate-file", lambda b: os.truncate(b / "ro.txt", 0)),
    ("open-wronly", lambda b: _open(b / "ro.txt", os.O_WRONLY)),
    ("open-rdwr", lambda b: _open(b / "ro.txt", os.O_RDWR)),
    ("write-with-trunc", lambda b: _write(b / "ro.txt")),
]


def test_read_only_backend_refuses_changes_with_erofs(ro_pair):
    check_all(ro_pair, RO_CASES, errno.EROFS)


@pytest.mark.xfail(strict=True, reason=(
    "FUSE limit: the kernel looks the name up before it sends unlink/rmdir, so a missing name "
    "is ENOENT; a natively read-only mount answers EROFS first (documented in the README)"))
def test_read_only_backend_unlink_of_missing_name_is_erofs(ro_pair):
    """A read-only filesystem answers EROFS before it looks the name up (Linux do_unlinkat)."""
    check_all(ro_pair, [("unlink-missing", lambda b: os.unlink(b / "missing")),
                        ("rmdir-missing", lambda b: os.rmdir(b / "missing"))], errno.EROFS)


def test_read_only_backend_serves_content_and_journals_refusal(ro_pair):
    ro_pair.check(lambda b: _read(b / "ro.txt"), None)
    assert (ro_pair.base / "ro.txt").read_bytes() == b"read me\n"
    assert sorted(os.listdir(ro_pair.base)) == ["ro.txt", "sub"]
    root_node = ro_pair.tracked.node("", backend="ro")
    rows = ro_pair.check(lambda b: os.chmod(b, 0o700), errno.EROFS)
    assert [(r["command"], r["status"], r["errno"], r["node_id"]) for r in rows] == \
        [("setattr", "failed", errno.EROFS, root_node["id"])]


# -- EXDEV -----------------------------------------------------------------------------
@pytest.fixture
def exdev(tracked, native, tmp_path):
    """Backends `local` and `other` with local/f; as reference two mounts of one native disk."""
    other_root = add_backend(tracked, "other")
    (tracked.path / "f").write_bytes(b"payload\n")
    (native / "f").write_bytes(b"payload\n")
    native_other_src = tmp_path / "native-other-src"
    native_other_src.mkdir()
    native_other = tmp_path / "native-other"
    _bind_mount(native_other_src, native_other)
    try:
        yield tracked, other_root, tracked.mount.mountpoint / "other", native, native_other
    finally:
        _unmount(native_other)


def test_rename_across_backends_is_exdev(exdev):
    tracked, other_root, other, native, native_other = exdev
    since = tracked.last_journal_id()
    disk_before = (tree(tracked.backend_root), tree(other_root))
    node = tracked.node("f")

    got_native = outcome(lambda _: os.rename(native / "f", native_other / "f"), native)
    got_mount = outcome(lambda _: os.rename(tracked.path / "f", other / "f"), tracked.path)
    assert got_native == errno.EXDEV, name_of(got_native)
    assert got_mount == errno.EXDEV, name_of(got_mount)
    assert (tree(tracked.backend_root), tree(other_root)) == disk_before
    assert (tracked.path / "f").read_bytes() == b"payload\n"
    assert not (other / "f").exists()
    rows = tracked.journal(since)
    assert [(r["command"], r["status"], r["errno"]) for r in rows] == [("rename", "failed", errno.EXDEV)]
    assert rows[0]["error"]
    assert rows[0]["node_id"] == node["id"], "the failed rename does not name the node it tried to move"


def test_mv_across_backends_falls_back_to_copy_and_delete(exdev):
    tracked, other_root, other, native, native_other = exdev
    since = tracked.last_journal_id()
    done_native = subprocess.run(["mv", str(native / "f"), str(native_other / "f")], capture_output=True, text=True)
    done_mount = subprocess.run(["mv", str(tracked.path / "f"), str(other / "f")], capture_output=True, text=True)
    assert done_native.returncode == 0, done_native.stderr
    assert done_mount.returncode == 0, done_mount.stderr
    assert not (tracked.backend_root / "f").exists() and not (tracked.path / "f").exists()
    assert (other_root / "f").read_bytes() == b"payload\n"
    assert (other / "f").read_bytes() == b"payload\n"
    assert tree(other, skip_staging=True) == tree(native_other)
    assert tracked.node("f") is None
    assert tracked.node("f", backend="other")["size"] == len(b"payload\n")

    ids = dict(tracked.db.execute("SELECT name, id FROM filestore.backend_mounts").fetchall())
    rows = tracked.journal(since)
    failed = [(r["command"], r["errno"]) for r in rows if r["status"] == "failed"]
    assert failed == [("rename", errno.EXDEV)], failed
    done = [(r["command"], r["backend_id"], r["path"]) for r in rows if r["status"] == "committed"]
    assert ("create", ids["other"], "f") in done, done
    assert ("write", ids["other"], "f") in done, done
    assert ("unlink", ids["local"], "f") in done, done
    order = [c for c, _, _ in done]
    assert order.index("write") < order.index("unlink"), f"the source went before the copy was written: {order}"


# -- the mount root --------------------------------------------------------------------
ROOT_CASES = [
    ("mkdir", lambda m: os.mkdir(m / "x")),
    ("create", lambda m: _write(m / "x")),
    ("open-creat-excl", lambda m: _open(m / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("symlink", lambda m: os.symlink("local", m / "x")),
    ("rmdir-backend", lambda m: os.rmdir(m / "local")),
]


def test_mount_root_refuses_new_names_with_eperm(tracked):
    mountpoint = tracked.mount.mountpoint
    (tracked.path / "f").write_bytes(b"data\n")
    failures = []
    for name, op in ROOT_CASES:
        since = tracked.last_journal_id()
        disk_before = tree(tracked.backend_root)
        got = outcome(op, mountpoint)
        if got != errno.EPERM:
            failures.append(f"{name}: got {name_of(got)}, expected EPERM")
        if sorted(os.listdir(mountpoint)) != ["local"]:
            failures.append(f"{name}: mount root now lists {sorted(os.listdir(mountpoint))}")
        if tree(tracked.backend_root) != disk_before:
            failures.append(f"{name}: the backend disk changed")
        committed = [r["command"] for r in tracked.journal(since) if r["status"] != "failed"]
        if committed:
            failures.append(f"{name}: committed journal rows {committed}")
    assert not failures, "\n".join(failures)
