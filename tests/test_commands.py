"""Every command through the real mount, checked three ways.

For each operation, made with ordinary `os` calls (or real tools run as subprocesses) on
the FUSE mount, the tests check:
  1. what the caller sees (return values, stat results, bytes read back);
  2. the bytes and metadata on the backend disk (`tracked.backend_root`);
  3. the node rows, journal entries and snapshots in PostgreSQL.
After each test the `tracked` fixture also runs `assert_consistent` (database tree == disk).
"""
from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import require_tool

ME_UID, ME_GID, ME_PID = os.getuid(), os.getgid(), os.getpid()
UMASK = 0o022


@pytest.fixture(autouse=True)
def fixed_umask():
    """Modes of new entries depend on the umask: make it known."""
    old = os.umask(UMASK)
    yield
    os.umask(old)


# -- helpers ---------------------------------------------------------------------------
def rows_for(journal: list[dict], node_id: int) -> list[dict]:
    return [j for j in journal if j["node_id"] == node_id]


def commands(journal: list[dict]) -> list[tuple[str, str]]:
    return [(j["command"], j["status"]) for j in journal]


def assert_by_me(row: dict) -> None:
    """A command made by an os call of this very process, through the mount."""
    assert row["actor"] == "fuse", row
    assert (row["uid"], row["gid"], row["pid"]) == (ME_UID, ME_GID, ME_PID), row


def snapshot(tracked, node_id: int, version: int) -> dict | None:
    row = tracked.db.execute("SELECT data, journal_id FROM filestore.snapshots WHERE node_id = %s AND version = %s",
                             (node_id, version)).fetchone()
    return None if row is None else {"data": row[0], "journal_id": row[1]}


def node_by_id(tracked, node_id: int) -> dict:
    cur = tracked.db.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM filestore.nodes WHERE id = %s", (node_id,)).fetchone()


def entries_of(tracked, node_id: int) -> list[tuple[int, bytes]]:
    return [(p, bytes(n)) for p, n in tracked.db.execute(
        "SELECT parent_id, name FROM filestore.entries WHERE node_id = %s", (node_id,)).fetchall()]


def root_node_id(tracked, backend: str = "local") -> int:
    return tracked.db.execute("SELECT root_node_id FROM filestore.backend_mounts WHERE name = %s",
                              (backend,)).fetchone()[0]


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def make_tree(root: Path, seed: int = 7) -> dict[str, bytes]:
    """30 files in 3 levels (5 directories x 6 files) plus one symlink; returns rel -> content."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    dirs = ["", "a", "b", "a/c", "b/d"]
    sizes = [0, 1, 100, 4096, 5000, 70_000, 200_000]  # 200 kB spans several FUSE writes
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            rel = f"{d}/f{i}.bin" if d else f"f{i}.bin"
            data = rnd.randbytes(sizes[(len(files)) % len(sizes)])
            (root / rel).write_bytes(data)
            files[rel] = data
    os.symlink("../f1.bin", root / "a" / "link")
    return files


def tree_summary(root: Path) -> dict[str, tuple]:
    """rel path -> (kind, sha256 of content | link target) for every entry below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".filestore.staging"]
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", st.st_size, hashlib.sha256(full.read_bytes()).hexdigest())
    return out


def assert_trees_equal(a: Path, b: Path) -> None:
    """Byte-for-byte equality with filecmp (shallow=False) on top of the summaries."""
    assert tree_summary(a) == tree_summary(b)
    for dirpath, _dirnames, filenames in os.walk(a):
        rel = Path(dirpath).relative_to(a)
        regular = [f for f in filenames if not os.path.islink(Path(dirpath) / f)]
        match, mismatch, errors = filecmp.cmpfiles(Path(dirpath), b / rel, regular, shallow=False)
        assert not mismatch and not errors, (rel, mismatch, errors)


def run_tool(*argv: str, cwd: Path | None = None) -> int:
    """Run a real tool; return its pid (it is the principal of what it does through the mount)."""
    env = {**os.environ, "LC_ALL": "C"}
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}): {out!r} {err!r}"
    return proc.pid


# == create / write / read =============================================================
def test_create_write_close_new_file_is_staged_and_journaled(tracked):
    since = tracked.last_journal_id()
    path = tracked.path / "new.txt"
    data = b"first line\n" + b"x" * 5000

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        assert os.write(fd, data[:100]) == 100
        assert os.write(fd, data[100:]) == len(data) - 100
    finally:
        os.close(fd)

    # the caller
    assert path.read_bytes() == data
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == len(data) and st.st_nlink == 1
    assert (st.st_uid, st.st_gid) == (ME_UID, ME_GID)
    # the disk
    on_disk = tracked.backend_root / "new.txt"
    assert on_disk.read_bytes() == data
    dst = os.stat(on_disk)
    assert stat.S_IMODE(dst.st_mode) == 0o640 and (dst.st_uid, dst.st_gid) == (ME_UID, ME_GID)
    assert st.st_mtime_ns == dst.st_mtime_ns
    # the database
    node = tracked.node("new.txt")
    assert node["id"] == st.st_ino
    assert (node["kind"], node["size"], node["mode"], node["state"], node["version"]) == \
        ("file", len(data), 0o640, "ACTIVE", 2)
    assert node["mtime_ns"] == dst.st_mtime_ns
    journal = tracked.journal(since)
    assert commands(journal) == [("create", "committed"), ("write", "committed")]
    create, write = journal
    for row in journal:
        assert row["node_id"] == node["id"] and row["path"] == "new.txt"
        assert_by_me(row)
    assert create["args"]["name"] == "new.txt" and create["args"]["mode"] == 0o640
    assert write["args"]["mode"] == "staged"
    assert write["args"]["bytes"] == len(data)
    assert write["args"]["ranges"] == [[0, len(data)]]
    assert write["result"]["size"] == len(data)
    assert snapshot(tracked, node["id"], 1)["journal_id"] == create["id"]
    snap2 = snapshot(tracked, node["id"], 2)
    assert snap2["journal_id"] == write["id"] and snap2["data"]["size"] == len(data)


def test_empty_file_created_and_closed_is_only_a_create(tracked):
    since = tracked.last_journal_id()
    path = tracked.path / "empty"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    os.close(fd)

    st = os.stat(path)
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o666 & ~UMASK
    assert path.read_bytes() == b""
    on_disk = tracked.backend_root / "empty"
    assert on_disk.is_file() and on_disk.read_bytes() == b""
    assert stat.S_IMODE(os.stat(on_disk).st_mode) == 0o644
    node = tracked.node("empty")
    assert (node["id"], node["size"], node["mode"], node["version"]) == (st.st_ino, 0, 0o644, 1)
    journal = tracked.journal(since)
    assert commands(journal) == [("create", "committed")]
    assert journal[0]["node_id"] == node["id"]
    assert_by_me(journal[0])
    assert snapshot(tracked, node["id"], 1) is not None


def test_o_excl_on_existing_file_fails_with_eexist(tracked):
    path = tracked.path / "there"
    write_file(path, b"keep")
    since = tracked.last_journal_id()
    with pytest.raises(OSError) as exc:
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert exc.value.errno == errno.EEXIST
    assert path.read_bytes() == b"keep"
    assert (tracked.backend_root / "there").read_bytes() == b"keep"
    assert [j for j in tracked.journal(since) if j["status"] == "committed"] == []


def test_overwrite_with_o_trunc_is_staged_and_one_write(tracked):
    path = tracked.path / "doc.txt"
    write_file(path, b"old content that is rather long\n")
    node_before = tracked.node("doc.txt")
    since = tracked.last_journal_id()

    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.write(fd, b"new\n") == 4
        # staged: until close the backend name still holds the old bytes
        assert (tracked.backend_root / "doc.txt").read_bytes() == b"old content that is rather long\n"
        assert tracked.node("doc.txt")["version"] == node_before["version"]
    finally:
        os.close(fd)

    assert path.read_bytes() == b"new\n"
    assert os.stat(path).st_size == 4
    assert os.stat(path).st_ino == node_before["id"]
    assert (tracked.backend_root / "doc.txt").read_bytes() == b"new\n"
    assert stat.S_IMODE(os.stat(tracked.backend_root / "doc.txt").st_mode) == 0o644
    node = tracked.node("doc.txt")
    assert node["id"] == node_before["id"]
    assert (node["size"], node["version"]) == (4, node_before["version"] + 1)
    journal = tracked.journal(since)
    assert commands(journal) == [("write", "committed")]
    write = journal[0]
    assert write["node_id"] == node["id"]
    assert write["args"]["mode"] == "staged" and write["args"]["bytes"] == 4
    assert_by_me(write)
    assert snapshot(tracked, node["id"], node["version"])["data"]["size"] == 4


def test_append_to_existing_file_is_written_in_place(tracked):
    path = tracked.path / "log.txt"
    write_file(path, b"line 1\n")
    node_before = tracked.node("log.txt")
    since = tracked.last_journal_id()

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, b"line 2\n") == 7
        assert os.write(fd, b"line 3\n") == 7
        # in place: the backend file has the bytes already, the database not until close
        assert (tracked.backend_root / "log.txt").read_bytes() == b"line 1\nline 2\nline 3\n"
        assert tracked.node("log.txt")["size"] == 7
        assert tracked.journal(since) == []
    finally:
        os.close(fd)

    assert path.read_bytes() == b"line 1\nline 2\nline 3\n"
    assert os.stat(path).st_size == 21
    assert (tracked.backend_root / "log.txt").read_bytes() == b"line 1\nline 2\nline 3\n"
    node = tracked.node("log.txt")
    assert (node["id"], node["size"], node["version"]) == (node_before["id"], 21, node_before["version"] + 1)
    assert node["mtime_ns"] == os.stat(tracked.backend_root / "log.txt").st_mtime_ns
    journal = tracked.journal(since)
    assert commands(journal) == [("write", "committed")]
    write = journal[0]
    assert write["node_id"] == node["id"]
    assert write["args"]["mode"] == "in_place"
    assert write["args"]["ranges"] == [[7, 14]]
    assert write["args"]["bytes"] == 14
    assert_by_me(write)
    assert snapshot(tracked, node["id"], node["version"])["journal_id"] == write["id"]


def test_pwrite_in_the_middle_is_in_place(tracked):
    path = tracked.path / "digits"
    write_file(path, b"0123456789")
    node_before = tracked.node("digits")
    since = tracked.last_journal_id()

    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"AB", 4) == 2
        assert os.pread(fd, 10, 0) == b"0123AB6789"
    finally:
        os.close(fd)

    assert path.read_bytes() == b"0123AB6789"
    assert os.stat(path).st_size == 10
    assert (tracked.backend_root / "digits").read_bytes() == b"0123AB6789"
    node = tracked.node("digits")
    assert (node["size"], node["version"]) == (10, node_before["version"] + 1)
    journal = tracked.journal(since)
    assert commands(journal) == [("write", "committed")]
    assert journal[0]["args"]["mode"] == "in_place"
    assert journal[0]["args"]["ranges"] == [[4, 2]] and journal[0]["args"]["bytes"] == 2
    assert_by_me(journal[0])
    assert snapshot(tracked, node["id"], node["version"]) is not None


def test_unclosed_new_file_is_readable_through_same_and_second_fd(tracked):
    path = tracked.path / "pending.bin"
    data = bytes(range(256)) * 40
    since = tracked.last_journal_id()

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fd2 = None
    try:
        assert os.write(fd, data) == len(data)
        assert os.pread(fd, len(data) + 10, 0) == data
        assert os.fstat(fd).st_size == len(data)
        fd2 = os.open(path, os.O_RDONLY)
        assert os.read(fd2, len(data) + 10) == data
        assert os.stat(path).st_size == len(data)
        # a new file reaches the backend and the journal at its first close, with its content
        assert not os.path.lexists(tracked.backend_root / "pending.bin")
        assert tracked.node("pending.bin") is None
        assert commands(tracked.journal(since)) == []
        assert "pending.bin" in os.listdir(tracked.path)  # but this mount shows it at once
    finally:
        os.close(fd)
        if fd2 is not None:
            os.close(fd2)

    assert path.read_bytes() == data
    assert (tracked.backend_root / "pending.bin").read_bytes() == data
    node = tracked.node("pending.bin")
    assert (node["size"], node["version"]) == (len(data), 2)
    journal = tracked.journal(since)
    assert commands(journal) == [("create", "committed"), ("write", "committed")]
    assert journal[1]["args"]["mode"] == "staged" and journal[1]["args"]["bytes"] == len(data)


def test_unclosed_in_place_write_is_readable_through_same_and_second_fd(tracked):
    path = tracked.path / "existing.txt"
    write_file(path, b"abcdefgh")
    since = tracked.last_journal_id()

    fd = os.open(path, os.O_RDWR)
    fd2 = None
    try:
        assert os.pwrite(fd, b"XYZ", 8) == 3
        assert os.pread(fd, 100, 0) == b"abcdefghXYZ"
        fd2 = os.open(path, os.O_RDONLY)
        assert os.read(fd2, 100) == b"abcdefghXYZ"
        assert os.fstat(fd2).st_size == 11
        assert tracked.node("existing.txt")["size"] == 8
        assert tracked.journal(since) == []
    finally:
        os.close(fd)
        if fd2 is not None:
            os.close(fd2)

    assert (tracked.backend_root / "existing.txt").read_bytes() == b"abcdefghXYZ"
    assert tracked.node("existing.txt")["size"] == 11
    journal = tracked.journal(since)
    assert commands(journal) == [("write", "committed")]
    assert journal[0]["args"]["mode"] == "in_place" and journal[0]["args"]["ranges"] == [[8, 3]]


# == directories ========================================================================
def test_makedirs_creates_journaled_nested_directories(tracked):
    since = tracked.last_journal_id()
    os.makedirs(tracked.path / "a" / "b" / "c")

    expected_mode = 0o777 & ~UMASK
    ids = []
    for rel in ("a", "a/b", "a/b/c"):
        st = os.stat(tracked.path / rel)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == expected_mode
        dst = os.stat(tracked.backend_root / rel)
        assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == expected_mode
        assert (dst.st_uid, dst.st_gid) == (ME_UID, ME_GID)
        node = tracked.node(rel)
        assert (node["kind"], node["mode"], node["state"], node["version"]) == ("dir", expected_mode, "ACTIVE", 1)
        assert node["id"] == st.st_ino
        assert snapshot(tracked, node["id"], 1) is not None
        ids.append(node["id"])
    assert os.listdir(tracked.path / "a" / "b" / "c") == []
    assert os.stat(tracked.path / "a").st_nlink == 3  # . , .. and b/..
    journal = tracked.journal(since)
    assert commands(journal) == [("mkdir", "committed")] * 3
    assert [j["node_id"] for j in journal] == ids
    assert [j["path"] for j in journal] == ["a", "a/b", "a/b/c"]
    for row in journal:
        assert_by_me(row)


def test_mkdir_existing_name_fails_with_eexist(tracked):
    os.mkdir(tracked.path / "d")
    with pytest.raises(OSError) as exc:
        os.mkdir(tracked.path / "d")
    assert exc.value.errno == errno.EEXIST
    assert len([j for j in tracked.journal() if j["command"] == "mkdir" and j["status"] == "committed"]) == 1


def test_rmdir(tracked):
    os.mkdir(tracked.path / "gone")
    node_before = tracked.node("gone")
    since = tracked.last_journal_id()

    os.rmdir(tracked.path / "gone")

    with pytest.raises(OSError) as exc:
        os.stat(tracked.path / "gone")
    assert exc.value.errno == errno.ENOENT
    assert "gone" not in os.listdir(tracked.path)
    assert not os.path.lexists(tracked.backend_root / "gone")
    assert tracked.node("gone") is None
    node = node_by_id(tracked, node_before["id"])
    assert (node["state"], node["version"]) == ("DELETED", 2)
    assert entries_of(tracked, node["id"]) == []
    journal = tracked.journal(since)
    assert commands(journal) == [("rmdir", "committed")]
    assert journal[0]["node_id"] == node["id"] and journal[0]["path"] == "gone"
    assert_by_me(journal[0])
    snap = snapshot(tracked, node["id"], 2)
    assert snap["data"]["state"] == "DELETED" and snap["data"]["removed_entry"] is True


def test_rmdir_non_empty_fails_with_enotempty(tracked):
    os.makedirs(tracked.path / "full" / "inner")
    since = tracked.last_journal_id()
    with pytest.raises(OSError) as exc:
        os.rmdir(tracked.path / "full")
    assert exc.value.errno == errno.ENOTEMPTY
    assert (tracked.backend_root / "full" / "inner").is_dir()
    assert tracked.node("full")["state"] == "ACTIVE"
    journal = tracked.journal(since)
    assert commands(journal) == [("rmdir", "failed")]
    assert journal[0]["errno"] == errno.ENOTEMPTY


def test_unlink_keeps_history(tracked):
    path = tracked.path / "victim.txt"
    write_file(path, b"bye")
    node_before = tracked.node("victim.txt")
    since = tracked.last_journal_id()

    os.unlink(path)

    with pytest.raises(OSError) as exc:
        os.lstat(path)
    assert exc.value.errno == errno.ENOENT
    assert not os.path.lexists(tracked.backend_root / "victim.txt")
    assert tracked.node("victim.txt") is None
    node = node_by_id(tracked, node_before["id"])
    assert node is not None and node["state"] == "DELETED"
    assert node["version"] == node_before["version"] + 1
    assert entries_of(tracked, node["id"]) == []
    journal = tracked.journal(since)
    assert commands(journal) == [("unlink", "committed")]
    assert journal[0]["node_id"] == node["id"]
    assert_by_me(journal[0])
    # the history is kept: every command on the node, and a snapshot of every version
    history = rows_for(tracked.journal(), node["id"])
    assert [j["command"] for j in history] == ["create", "write", "unlink"]
    for version in range(1, node["version"] + 1):
        assert snapshot(tracked, node["id"], version) is not None, version


def test_unlink_missing_fails_with_enoent(tracked):
    with pytest.raises(OSError) as exc:
        os.unlink(tracked.path / "never-was")
    assert exc.value.errno == errno.ENOENT


def test_unlink_directory_fails_with_eisdir(tracked):
    os.mkdir(tracked.path / "dir")
    with pytest.raises(OSError) as exc:
        os.unlink(tracked.path / "dir")
    assert exc.value.errno == errno.EISDIR
    assert (tracked.backend_root / "dir").is_dir()


# == symlinks ===========================================================================
def test_symlink_readlink_lstat(tracked):
    target = "some/../where/target.txt"
    link = tracked.path / "ln"
    since = tracked.last_journal_id()

    os.symlink(target, link)

    assert os.readlink(link) == target
    st = os.lstat(link)
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len(target)
    assert (st.st_uid, st.st_gid) == (ME_UID, ME_GID)
    with pytest.raises(OSError) as exc:
        os.stat(link)  # dangling: following it fails
    assert exc.value.errno == errno.ENOENT
    on_disk = tracked.backend_root / "ln"
    assert os.path.islink(on_disk) and os.readlink(on_disk) == target
    assert (os.lstat(on_disk).st_uid, os.lstat(on_disk).st_gid) == (ME_UID, ME_GID)
    node = tracked.node("ln")
    assert node["id"] == st.st_ino
    assert node["kind"] == "symlink"
    assert bytes(node["symlink_target"]) == target.encode()
    assert node["size"] == len(target)
    journal = tracked.journal(since)
    assert commands(journal) == [("symlink", "committed")]
    assert journal[0]["node_id"] == node["id"] and journal[0]["args"]["target"] == target
    assert_by_me(journal[0])
    assert snapshot(tracked, node["id"], 1)["data"]["target"] == target


def test_symlink_to_file_is_followed_for_reads(tracked):
    write_file(tracked.path / "real.txt", b"payload")
    os.symlink("real.txt", tracked.path / "alias")
    assert (tracked.path / "alias").read_bytes() == b"payload"
    assert os.stat(tracked.path / "alias").st_ino == tracked.node("real.txt")["id"]
    assert os.lstat(tracked.path / "alias").st_ino == tracked.node("alias")["id"]


# == rename =============================================================================
def test_rename_file_within_directory(tracked):
    write_file(tracked.path / "old.txt", b"content")
    node_before = tracked.node("old.txt")
    since = tracked.last_journal_id()

    os.rename(tracked.path / "old.txt", tracked.path / "new.txt")

    with pytest.raises(OSError) as exc:
        os.stat(tracked.path / "old.txt")
    assert exc.value.errno == errno.ENOENT
    assert (tracked.path / "new.txt").read_bytes() == b"content"
    assert os.stat(tracked.path / "new.txt").st_ino == node_before["id"]
    assert not os.path.lexists(tracked.backend_root / "old.txt")
    assert (tracked.backend_root / "new.txt").read_bytes() == b"content"
    assert tracked.node("old.txt") is None
    node = tracked.node("new.txt")
    assert node["id"] == node_before["id"]
    assert node["version"] == node_before["version"] + 1
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]
    row = journal[0]
    assert row["node_id"] == node["id"]
    assert (row["args"]["from"], row["args"]["to"]) == ("old.txt", "new.txt")
    assert_by_me(row)
    assert snapshot(tracked, node["id"], node["version"])["data"]["name"] == "new.txt"


def test_rename_file_across_directories(tracked):
    os.mkdir(tracked.path / "src")
    os.mkdir(tracked.path / "dst")
    write_file(tracked.path / "src" / "f", b"moving")
    node_before = tracked.node("src/f")
    since = tracked.last_journal_id()

    os.rename(tracked.path / "src" / "f", tracked.path / "dst" / "g")

    assert os.listdir(tracked.path / "src") == []
    assert os.listdir(tracked.path / "dst") == ["g"]
    assert (tracked.path / "dst" / "g").read_bytes() == b"moving"
    assert os.stat(tracked.path / "dst" / "g").st_ino == node_before["id"]
    assert os.listdir(tracked.backend_root / "src") == []
    assert (tracked.backend_root / "dst" / "g").read_bytes() == b"moving"
    assert tracked.node("src/f") is None
    node = tracked.node("dst/g")
    assert node["id"] == node_before["id"] and node["version"] == node_before["version"] + 1
    assert entries_of(tracked, node["id"]) == [(tracked.node("dst")["id"], b"g")]
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]
    assert (journal[0]["args"]["from"], journal[0]["args"]["to"]) == ("src/f", "dst/g")
    assert_by_me(journal[0])


def test_rename_directory_with_contents(tracked):
    os.makedirs(tracked.path / "proj" / "sub")
    write_file(tracked.path / "proj" / "top.txt", b"top")
    write_file(tracked.path / "proj" / "sub" / "deep.txt", b"deep")
    os.mkdir(tracked.path / "archive")
    ids = {rel: tracked.node(rel)["id"] for rel in ("proj", "proj/sub", "proj/top.txt", "proj/sub/deep.txt")}
    since = tracked.last_journal_id()

    os.rename(tracked.path / "proj", tracked.path / "archive" / "proj2")

    assert not os.path.lexists(tracked.path / "proj")
    moved = tracked.path / "archive" / "proj2"
    assert sorted(os.listdir(moved)) == ["sub", "top.txt"]
    assert (moved / "top.txt").read_bytes() == b"top"
    assert (moved / "sub" / "deep.txt").read_bytes() == b"deep"
    assert os.stat(moved / "sub" / "deep.txt").st_ino == ids["proj/sub/deep.txt"]
    assert os.stat(moved).st_ino == ids["proj"]
    assert (tracked.backend_root / "archive" / "proj2" / "sub" / "deep.txt").read_bytes() == b"deep"
    assert not os.path.lexists(tracked.backend_root / "proj")
    for old_rel, rel in (("proj", "archive/proj2"), ("proj/sub", "archive/proj2/sub"),
                         ("proj/top.txt", "archive/proj2/top.txt"),
                         ("proj/sub/deep.txt", "archive/proj2/sub/deep.txt")):
        assert tracked.node(old_rel) is None
        assert tracked.node(rel)["id"] == ids[old_rel], rel
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]
    assert journal[0]["node_id"] == ids["proj"]
    assert_by_me(journal[0])
    # children can still be written through their new path
    with open(moved / "sub" / "deep.txt", "ab") as f:
        f.write(b"er")
    assert (tracked.backend_root / "archive" / "proj2" / "sub" / "deep.txt").read_bytes() == b"deeper"
    assert tracked.node("archive/proj2/sub/deep.txt")["size"] == 6
    assert tracked.journal()[-1]["path"] == "archive/proj2/sub/deep.txt"


def test_rename_replacing_existing_file(tracked):
    write_file(tracked.path / "winner", b"new")
    write_file(tracked.path / "loser", b"old old")
    winner = tracked.node("winner")
    loser = tracked.node("loser")
    since = tracked.last_journal_id()

    os.rename(tracked.path / "winner", tracked.path / "loser")

    assert os.listdir(tracked.path) == ["loser"]
    assert (tracked.path / "loser").read_bytes() == b"new"
    assert os.stat(tracked.path / "loser").st_ino == winner["id"]
    assert sorted(os.listdir(tracked.backend_root)) == [".filestore.staging", "loser"]
    assert (tracked.backend_root / "loser").read_bytes() == b"new"
    node = tracked.node("loser")
    assert node["id"] == winner["id"] and node["version"] == winner["version"] + 1
    replaced = node_by_id(tracked, loser["id"])
    assert replaced["state"] == "DELETED" and replaced["version"] == loser["version"] + 1
    assert entries_of(tracked, loser["id"]) == []
    assert snapshot(tracked, loser["id"], replaced["version"])["data"]["state"] == "DELETED"
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]
    assert journal[0]["node_id"] == winner["id"]
    assert_by_me(journal[0])


def test_rename_replacing_empty_directory(tracked):
    os.mkdir(tracked.path / "full")
    write_file(tracked.path / "full" / "x", b"x")
    os.mkdir(tracked.path / "empty")
    full, empty = tracked.node("full"), tracked.node("empty")
    since = tracked.last_journal_id()

    os.rename(tracked.path / "full", tracked.path / "empty")

    assert os.listdir(tracked.path) == ["empty"]
    assert os.listdir(tracked.path / "empty") == ["x"]
    assert os.stat(tracked.path / "empty").st_ino == full["id"]
    assert (tracked.backend_root / "empty" / "x").read_bytes() == b"x"
    assert not os.path.lexists(tracked.backend_root / "full")
    assert tracked.node("empty")["id"] == full["id"]
    assert tracked.node("empty/x")["size"] == 1
    replaced = node_by_id(tracked, empty["id"])
    assert replaced["state"] == "DELETED" and replaced["version"] == 2
    assert entries_of(tracked, empty["id"]) == []
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]
    assert_by_me(journal[0])


def test_rename_over_non_empty_directory_fails_with_enotempty(tracked):
    os.makedirs(tracked.path / "a")
    os.makedirs(tracked.path / "b" / "child")
    with pytest.raises(OSError) as exc:
        os.rename(tracked.path / "a", tracked.path / "b")
    assert exc.value.errno == errno.ENOTEMPTY
    assert (tracked.backend_root / "a").is_dir() and (tracked.backend_root / "b" / "child").is_dir()
    assert tracked.journal()[-1]["command"] == "rename" and tracked.journal()[-1]["status"] == "failed"
    assert tracked.journal()[-1]["errno"] == errno.ENOTEMPTY


def test_rename_directory_into_itself_fails_with_einval(tracked):
    os.makedirs(tracked.path / "p" / "q")
    with pytest.raises(OSError) as exc:
        os.rename(tracked.path / "p", tracked.path / "p" / "q" / "p")
    assert exc.value.errno == errno.EINVAL
    assert (tracked.backend_root / "p" / "q").is_dir()


# == setattr ============================================================================
def test_chmod(tracked):
    path = tracked.path / "perm"
    write_file(path, b"p", 0o644)
    before = tracked.node("perm")
    since = tracked.last_journal_id()

    os.chmod(path, 0o4750)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4750
    assert stat.S_IMODE(os.stat(tracked.backend_root / "perm").st_mode) == 0o4750
    node = tracked.node("perm")
    assert (node["mode"], node["version"]) == (0o4750, before["version"] + 1)
    journal = tracked.journal(since)
    assert commands(journal) == [("setattr", "committed")]
    assert journal[0]["args"] == {"mode": 0o4750}
    assert journal[0]["node_id"] == node["id"]
    assert_by_me(journal[0])
    assert snapshot(tracked, node["id"], node["version"])["data"]["mode"] == 0o4750


def test_chmod_directory(tracked):
    os.mkdir(tracked.path / "d", 0o755)
    os.chmod(tracked.path / "d", 0o700)
    assert stat.S_IMODE(os.stat(tracked.path / "d").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tracked.backend_root / "d").st_mode) == 0o700
    assert tracked.node("d")["mode"] == 0o700


def test_chown_as_root(tracked):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = tracked.path / "owned"
    write_file(path, b"o")
    before = tracked.node("owned")
    since = tracked.last_journal_id()

    os.chown(path, 1234, 5678)

    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    dst = os.stat(tracked.backend_root / "owned")
    assert (dst.st_uid, dst.st_gid) == (1234, 5678)
    node = tracked.node("owned")
    assert (node["uid"], node["gid"], node["version"]) == (1234, 5678, before["version"] + 1)
    journal = tracked.journal(since)
    assert commands(journal) == [("setattr", "committed")]
    assert journal[0]["args"] == {"uid": 1234, "gid": 5678}
    assert_by_me(journal[0])
    assert snapshot(tracked, node["id"], node["version"])["data"]["uid"] == 1234
    # group only
    os.chown(path, -1, 99)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 99)
    assert (os.stat(tracked.backend_root / "owned").st_uid, os.stat(tracked.backend_root / "owned").st_gid) == (1234, 99)
    assert (tracked.node("owned")["uid"], tracked.node("owned")["gid"]) == (1234, 99)


def test_utime_nanoseconds(tracked):
    path = tracked.path / "timed"
    write_file(path, b"t")
    before = tracked.node("timed")
    atime_ns, mtime_ns = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    since = tracked.last_journal_id()

    os.utime(path, ns=(atime_ns, mtime_ns))

    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime_ns, mtime_ns)
    dst = os.stat(tracked.backend_root / "timed")
    assert (dst.st_atime_ns, dst.st_mtime_ns) == (atime_ns, mtime_ns)
    node = tracked.node("timed")
    assert (node["atime_ns"], node["mtime_ns"]) == (atime_ns, mtime_ns)
    assert node["version"] == before["version"] + 1
    journal = tracked.journal(since)
    assert commands(journal) == [("setattr", "committed")]
    assert journal[0]["args"] == {"atime_ns": atime_ns, "mtime_ns": mtime_ns}
    assert_by_me(journal[0])
    # it survives a restart: what the mount answers then comes from the database
    tracked.restart()
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime_ns, mtime_ns)


def test_utime_on_a_directory(tracked):
    os.mkdir(tracked.path / "d")
    os.utime(tracked.path / "d", ns=(1_000_000_001, 2_000_000_002))
    assert os.stat(tracked.path / "d").st_mtime_ns == 2_000_000_002
    assert os.stat(tracked.backend_root / "d").st_mtime_ns == 2_000_000_002
    assert tracked.node("d")["mtime_ns"] == 2_000_000_002


def test_utime_of_a_written_file_before_close_survives_close(tracked):
    """What tar and cp -p do: set the times through the open descriptor, then close it."""
    path = tracked.path / "stamped"
    mtime_ns = 1_400_000_000_000_000_000
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"data")
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    assert os.stat(path).st_mtime_ns == mtime_ns
    assert os.stat(tracked.backend_root / "stamped").st_mtime_ns == mtime_ns
    assert tracked.node("stamped")["mtime_ns"] == mtime_ns


def test_truncate_grow_and_shrink(tracked):
    path = tracked.path / "sized"
    write_file(path, b"abcd")
    before = tracked.node("sized")
    since = tracked.last_journal_id()

    os.truncate(path, 10)

    assert os.stat(path).st_size == 10
    assert path.read_bytes() == b"abcd" + b"\0" * 6
    assert (tracked.backend_root / "sized").read_bytes() == b"abcd" + b"\0" * 6
    node = tracked.node("sized")
    assert (node["size"], node["version"]) == (10, before["version"] + 1)

    os.truncate(path, 2)

    assert os.stat(path).st_size == 2
    assert path.read_bytes() == b"ab"
    assert (tracked.backend_root / "sized").read_bytes() == b"ab"
    node = tracked.node("sized")
    assert (node["size"], node["version"]) == (2, before["version"] + 2)
    assert node["mtime_ns"] == os.stat(tracked.backend_root / "sized").st_mtime_ns
    journal = tracked.journal(since)
    assert commands(journal) == [("setattr", "committed")] * 2
    assert [j["args"]["size"] for j in journal] == [10, 2]
    for row in journal:
        assert row["node_id"] == node["id"]
        assert_by_me(row)
    assert snapshot(tracked, node["id"], before["version"] + 1)["data"]["size"] == 10
    assert snapshot(tracked, node["id"], before["version"] + 2)["data"]["size"] == 2


def test_truncate_directory_fails_with_eisdir(tracked):
    os.mkdir(tracked.path / "d")
    with pytest.raises(OSError) as exc:
        os.truncate(tracked.path / "d", 0)
    assert exc.value.errno == errno.EISDIR


# == node ids are inode numbers =========================================================
def test_node_ids_are_inode_numbers(tracked):
    os.makedirs(tracked.path / "x" / "y")
    write_file(tracked.path / "x" / "f", b"f")
    os.symlink("f", tracked.path / "x" / "l")
    seen = set()
    for rel in ("x", "x/y", "x/f", "x/l"):
        ino = os.lstat(tracked.path / rel).st_ino
        assert ino == tracked.node(rel)["id"], rel
        seen.add(ino)
    assert len(seen) == 4
    assert os.stat(tracked.path).st_ino == root_node_id(tracked)
    listed = {e.name: e.inode() for e in os.scandir(tracked.path / "x")}
    assert listed == {name: tracked.node(f"x/{name}")["id"] for name in ("y", "f", "l")}
    # stable across a restart
    tracked.restart()
    for rel in ("x", "x/y", "x/f", "x/l"):
        assert os.lstat(tracked.path / rel).st_ino == tracked.node(rel)["id"], rel


# == real tools =========================================================================
def test_cp_r_tree_into_mount(tracked, native):
    require_tool("cp")
    src = native / "tree"
    files = make_tree(src)
    assert len(files) == 30
    since = tracked.last_journal_id()

    pid = run_tool("cp", "-r", str(src), str(tracked.path / "copy"))

    assert_trees_equal(src, tracked.path / "copy")
    assert_trees_equal(src, tracked.backend_root / "copy")
    for rel, data in files.items():
        node = tracked.node(f"copy/{rel}")
        assert node["size"] == len(data), rel
        assert os.stat(tracked.path / "copy" / rel).st_ino == node["id"]
    journal = tracked.journal(since)
    assert [j for j in journal if j["status"] != "committed"] == []
    assert {(j["actor"], j["uid"], j["pid"]) for j in journal} == {("fuse", ME_UID, pid)}
    counts = {c: sum(1 for j in journal if j["command"] == c) for c in ("mkdir", "create", "write", "symlink")}
    assert counts == {"mkdir": 5, "create": 30, "write": sum(1 for d in files.values() if d),
                      "symlink": 1}
    for rel, data in files.items():
        node_rows = rows_for(journal, tracked.node(f"copy/{rel}")["id"])
        writes = [j for j in node_rows if j["command"] == "write"]
        assert [j["command"] for j in node_rows][0] == "create"
        assert sum(j["args"]["bytes"] for j in writes) == len(data), rel


def test_tar_extract_into_mount_matches_native_extract(tracked, native, tmp_path):
    require_tool("tar")
    src = native / "tree"
    make_tree(src)
    if os.geteuid() == 0:
        os.chown(src / "a" / "f0.bin", 1234, 4321)
        os.lchown(src / "a" / "link", 1234, 4321)
    os.chmod(src / "b" / "f1.bin", 0o600)
    os.chmod(src / "b" / "d", 0o750)
    for i, p in enumerate(sorted(src.rglob("*"))):
        os.utime(p, (1_000_000_000 + i, 1_100_000_000 + i), follow_symlinks=False)
    archive = tmp_path / "tree.tar"
    run_tool("tar", "-cf", str(archive), "-C", str(native), "tree")
    expected = native / "extracted"
    expected.mkdir()
    run_tool("tar", "-xf", str(archive), "-C", str(expected))
    since = tracked.last_journal_id()

    pid = run_tool("tar", "-xf", str(archive), "-C", str(tracked.path))

    assert_trees_equal(expected / "tree", tracked.path / "tree")
    assert_trees_equal(expected / "tree", tracked.backend_root / "tree")

    def meta(root: Path) -> dict[str, tuple]:
        out = {}
        for p in sorted(root.rglob("*")):
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                             st.st_gid, st.st_mtime_ns)
        return out

    want = meta(expected / "tree")
    for where in (tracked.path / "tree", tracked.backend_root / "tree"):
        got = meta(where)
        assert set(got) == set(want), where
        differing = {rel: (got[rel], want[rel]) for rel in want if got[rel] != want[rel]}
        assert differing == {}, f"{where} (got, native): {differing}"
    for rel, (_fmt, mode, uid, gid, mtime_ns) in want.items():
        node = tracked.node(f"tree/{rel}")
        assert (node["uid"], node["gid"], node["mtime_ns"]) == (uid, gid, mtime_ns), rel
        if node["kind"] != "symlink":
            assert node["mode"] == mode, rel
    journal = tracked.journal(since)
    assert [j for j in journal if j["status"] != "committed"] == []
    assert {(j["uid"], j["pid"]) for j in journal} == {(ME_UID, pid)}


def test_mv_directory(tracked):
    require_tool("mv")
    os.makedirs(tracked.path / "from" / "inner")
    write_file(tracked.path / "from" / "inner" / "f", b"payload")
    os.mkdir(tracked.path / "to")
    ids = {rel: tracked.node(rel)["id"] for rel in ("from", "from/inner", "from/inner/f")}
    since = tracked.last_journal_id()

    pid = run_tool("mv", str(tracked.path / "from"), str(tracked.path / "to" / "moved"))

    assert sorted(os.listdir(tracked.path)) == ["to"]
    assert (tracked.path / "to" / "moved" / "inner" / "f").read_bytes() == b"payload"
    assert os.stat(tracked.path / "to" / "moved").st_ino == ids["from"]
    assert (tracked.backend_root / "to" / "moved" / "inner" / "f").read_bytes() == b"payload"
    assert not os.path.lexists(tracked.backend_root / "from")
    assert tracked.node("to/moved")["id"] == ids["from"]
    assert tracked.node("to/moved/inner/f")["id"] == ids["from/inner/f"]
    journal = tracked.journal(since)
    assert commands(journal) == [("rename", "committed")]  # a rename, not a copy and delete
    assert journal[0]["node_id"] == ids["from"] and journal[0]["pid"] == pid
    assert journal[0]["args"]["to"] == "to/moved"


def test_rm_r_tree(tracked, native):
    require_tool("rm")
    src = native / "tree"
    files = make_tree(src)
    shutil.copytree(src, tracked.path / "tree", symlinks=True)
    ids = {str(p.relative_to(tracked.path)): os.lstat(p).st_ino for p in (tracked.path / "tree").rglob("*")}
    ids["tree"] = tracked.node("tree")["id"]
    assert len(ids) == 30 + 1 + 5  # files, the symlink, the directories
    since = tracked.last_journal_id()

    pid = run_tool("rm", "-r", str(tracked.path / "tree"))

    assert os.listdir(tracked.path) == []
    assert not os.path.lexists(tracked.backend_root / "tree")
    assert tracked.node("tree") is None
    for rel, node_id in ids.items():
        node = node_by_id(tracked, node_id)
        assert node["state"] == "DELETED", rel
        assert entries_of(tracked, node_id) == [], rel
    journal = tracked.journal(since)
    assert [j for j in journal if j["status"] != "committed"] == []
    assert sorted(j["node_id"] for j in journal) == sorted(ids.values())
    assert sum(1 for j in journal if j["command"] == "rmdir") == 5
    assert sum(1 for j in journal if j["command"] == "unlink") == len(files) + 1
    assert {j["pid"] for j in journal} == {pid}


def test_ls_l_lists_names_and_sizes(tracked):
    require_tool("ls")
    sizes = {"a.txt": 0, "b.bin": 1, "c.dat": 12_345, "long name with spaces": 70_000}
    for name, size in sizes.items():
        write_file(tracked.path / name, b"z" * size)
    os.mkdir(tracked.path / "sub")
    os.symlink("a.txt", tracked.path / "ln")

    out = subprocess.run(["ls", "-l", "--quoting-style=literal", str(tracked.path)], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"}, check=True).stdout
    listed = {}
    for line in out.splitlines():
        if line.startswith("total"):
            continue
        fields = line.split(None, 8)
        listed[fields[8]] = (fields[0][0], int(fields[4]))
    assert listed == {**{name: ("-", size) for name, size in sizes.items()},
                      "sub": ("d", 0), "ln -> a.txt": ("l", len("a.txt"))}  # a directory shows its rollup
    for name, size in sizes.items():
        assert tracked.node(name)["size"] == size
        assert os.path.getsize(tracked.backend_root / name) == size


# == history and journal through the CLI ================================================
def test_cli_history_lists_create_and_write(tracked):
    path = tracked.path / "hist.txt"
    write_file(path, b"hello")
    with open(path, "ab") as f:
        f.write(b" world")
    node = tracked.node("hist.txt")

    out = json.loads(tracked.cli("history", str(path), "--json").stdout)

    assert out["node_id"] == node["id"] == os.stat(path).st_ino
    assert (out["backend"], out["path"]) == ("local", "hist.txt")
    entries = out["entries"]
    assert [(e["command"], e["status"]) for e in entries] == \
        [("create", "committed"), ("write", "committed"), ("write", "committed")]
    assert all(e["node_id"] == node["id"] for e in entries)
    assert all((e["actor"], e["uid"], e["gid"], e["pid"]) == ("fuse", ME_UID, ME_GID, ME_PID) for e in entries)
    assert [e["args"].get("mode") for e in entries[1:]] == ["staged", "in_place"]
    assert entries[2]["args"]["ranges"] == [[5, 6]]
    assert [e["id"] for e in entries] == [j["id"] for j in rows_for(tracked.journal(), node["id"])]
    # the backend:/path form names the same node
    out2 = json.loads(tracked.cli("history", "local:/hist.txt", "--json").stdout)
    assert out2["node_id"] == node["id"] and len(out2["entries"]) == 3


def test_cli_journal_since(tracked):
    os.mkdir(tracked.path / "before")
    since = tracked.last_journal_id()
    os.mkdir(tracked.path / "after")
    write_file(tracked.path / "after" / "f", b"1")

    rows = json.loads(tracked.cli("journal", "--since", str(since), "--json").stdout)

    assert [r["id"] for r in rows] == [j["id"] for j in tracked.journal(since)]
    assert [(r["command"], r["path"]) for r in rows] == \
        [("mkdir", "after"), ("create", "after/f"), ("write", "after/f")]
    assert all(r["id"] > since and r["status"] == "committed" for r in rows)
    assert [r["node_id"] for r in rows] == [tracked.node("after")["id"]] + [tracked.node("after/f")["id"]] * 2


# == idempotency keys (programmatic callers, in process) ================================
@pytest.fixture
def core_fs(tracked, tmp_path):
    """A second, in-process Filestore on the same database (its own FILESTORE_HOME)."""
    from core import config
    from core.service import Filestore

    env = dict(tracked.env)
    env["FILESTORE_HOME"] = str(tmp_path / "programmatic-home")
    fs = Filestore(config.load(env))
    try:
        yield fs
    finally:
        fs.close()


def test_idempotency_key_replays_a_committed_command(tracked, core_fs):
    from core.model import Principal

    who = Principal.current_process()
    root = root_node_id(tracked)
    since = tracked.last_journal_id()

    first = core_fs.orch.mkdir(who, root, b"k", 0o755, idempotency_key="abc")
    second = core_fs.orch.mkdir(who, root, b"k", 0o755, idempotency_key="abc")  # answered, maybe not committed
    core_fs.pipeline.sync()
    third = core_fs.orch.mkdir(who, root, b"k", 0o755, idempotency_key="abc")  # found in the journal

    assert second.id == first.id == third.id
    assert (tracked.backend_root / "k").is_dir()
    assert sorted(os.listdir(tracked.backend_root)) == [".filestore.staging", "k"]
    node = tracked.node("k")
    assert node["id"] == first.id and node["version"] == 1
    assert tracked.db.execute("SELECT count(*) FROM filestore.nodes WHERE kind = 'dir' AND id <> %s",
                              (root,)).fetchone()[0] == 1
    journal = tracked.journal(since)
    assert commands(journal) == [("mkdir", "committed")]
    row = journal[0]
    assert row["idempotency_key"] == "abc" and row["node_id"] == first.id
    assert (row["actor"], row["uid"], row["gid"], row["pid"]) == ("cli", ME_UID, ME_GID, ME_PID)
    # the mount sees it once its listing is reloaded
    tracked.restart()
    assert os.listdir(tracked.path) == ["k"]
    assert os.stat(tracked.path / "k").st_ino == first.id


def test_idempotency_key_replays_a_failure(tracked, core_fs):
    from core.errors import FsError
    from core.model import Principal

    who = Principal.current_process()
    root = root_node_id(tracked)
    since = tracked.last_journal_id()

    with pytest.raises(FsError) as exc:
        core_fs.orch.rmdir(who, root, b"later", idempotency_key="rm-later")
    assert exc.value.errno == errno.ENOENT
    made = core_fs.orch.mkdir(who, root, b"later", 0o755)
    # the retry answers what the first attempt answered, and changes nothing
    with pytest.raises(FsError) as exc:
        core_fs.orch.rmdir(who, root, b"later", idempotency_key="rm-later")
    assert exc.value.errno == errno.ENOENT
    core_fs.pipeline.sync()

    assert (tracked.backend_root / "later").is_dir()
    node = tracked.node("later")
    assert node["id"] == made.id and node["state"] == "ACTIVE"
    journal = tracked.journal(since)
    assert commands(journal) == [("rmdir", "failed"), ("mkdir", "committed")]
    assert journal[0]["idempotency_key"] == "rm-later" and journal[0]["errno"] == errno.ENOENT
    assert journal[1]["idempotency_key"] is None
    tracked.restart()
    assert os.path.isdir(tracked.path / "later")


def test_idempotency_key_replays_a_committed_unlink(tracked, core_fs):
    """A caller that lost the answer of a successful unlink retries it: success, nothing more."""
    from core.model import Principal

    who = Principal.current_process()
    root = root_node_id(tracked)
    made = core_fs.orch.create(who, root, b"f", 0o644)
    core_fs.pipeline.sync()
    since = tracked.last_journal_id()

    assert core_fs.orch.unlink(who, root, b"f", idempotency_key="unlink-f") is None
    assert core_fs.orch.unlink(who, root, b"f", idempotency_key="unlink-f") is None
    core_fs.pipeline.sync()

    assert not os.path.lexists(tracked.backend_root / "f")
    assert node_by_id(tracked, made.id)["state"] == "DELETED"
    journal = tracked.journal(since)
    assert commands(journal) == [("unlink", "committed")]
    assert journal[0]["idempotency_key"] == "unlink-f" and journal[0]["node_id"] == made.id


def test_attributes_set_on_an_open_new_file_are_folded_into_its_write(tracked):
    """tar's pattern (write, fchown, fchmod, futimens, close) is one create and one write."""
    path = tracked.path / "folded.bin"
    since = tracked.last_journal_id()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"content")
        os.fchown(fd, 1234, 4321)
        os.fchmod(fd, 0o640)
        os.utime(fd, ns=(1_500_000_000_123_456_789, 1_400_000_000_987_654_321))
        st = os.fstat(fd)  # visible at once through the mount, before the commit
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o640)
        assert st.st_mtime_ns == 1_400_000_000_987_654_321
    finally:
        os.close(fd)
    node = tracked.node("folded.bin")
    assert (node["uid"], node["gid"], node["mode"], node["size"]) == (1234, 4321, 0o640, 7)
    assert node["mtime_ns"] == 1_400_000_000_987_654_321
    on_disk = os.lstat(tracked.backend_root / "folded.bin")
    assert (on_disk.st_uid, on_disk.st_gid, stat.S_IMODE(on_disk.st_mode)) == (1234, 4321, 0o640)
    assert on_disk.st_mtime_ns == 1_400_000_000_987_654_321
    journal = [j for j in tracked.journal(since) if j["node_id"] == node["id"]]
    assert commands(journal) == [("create", "committed"), ("write", "committed")]
    assert journal[1]["args"]["attrs"] == {"uid": 1234, "gid": 4321, "mode": 0o640,
                                           "atime_ns": 1_500_000_000_123_456_789,
                                           "mtime_ns": 1_400_000_000_987_654_321}


def test_renaming_a_new_file_before_close_records_its_create_first(tracked):
    since = tracked.last_journal_id()
    fd = os.open(tracked.path / "draft.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"draft ")
        os.rename(tracked.path / "draft.txt", tracked.path / "final.txt")
        os.write(fd, b"and more")  # after the rename the file is on the backend: in place
    finally:
        os.close(fd)
    assert (tracked.path / "final.txt").read_bytes() == b"draft and more"
    assert (tracked.backend_root / "final.txt").read_bytes() == b"draft and more"
    assert not os.path.lexists(tracked.backend_root / "draft.txt")
    node = tracked.node("final.txt")
    journal = [j for j in tracked.journal(since) if j["node_id"] == node["id"]]
    assert commands(journal) == [("create", "committed"), ("write", "committed"),
                                 ("rename", "committed"), ("write", "committed")]
    assert [j["args"].get("mode") for j in journal if j["command"] == "write"] == ["staged", "in_place"]
    assert node["size"] == 14 and node["version"] == 4


def test_unlinking_a_new_file_while_open_keeps_it_usable_until_close(tracked):
    since = tracked.last_journal_id()
    path = tracked.path / "scratch.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"scratch data")
        os.unlink(path)
        assert not os.path.lexists(path)
        os.write(fd, b" still writable")
        assert os.pread(fd, 100, 0) == b"scratch data still writable"
    finally:
        os.close(fd)
    assert not os.path.lexists(tracked.backend_root / "scratch.tmp")
    assert commands(tracked.journal(since)) == [("create", "committed"), ("write", "committed"),
                                                ("unlink", "committed")]


def test_a_new_file_is_visible_in_the_mount_before_its_close(tracked):
    os.mkdir(tracked.path / "sub")
    fd = os.open(tracked.path / "sub" / "early.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert os.listdir(tracked.path / "sub") == ["early.txt"]
        with pytest.raises(FileExistsError) as exc:
            os.open(tracked.path / "sub" / "early.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(OSError) as exc:
            os.rmdir(tracked.path / "sub")
        assert exc.value.errno == errno.ENOTEMPTY
    finally:
        os.close(fd)
    assert (tracked.backend_root / "sub" / "early.txt").read_bytes() == b""
    assert tracked.node("sub/early.txt")["size"] == 0
