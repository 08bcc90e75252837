"""Hard links and special files (FIFOs, sockets, devices) through the mount: nodes like any
other, journaled, with the real thing on the local backend. Special files run on S3 backends
too (an empty object with its type bits, which the kernel serves as a FIFO or socket); hard links
and RENAME_EXCHANGE are what S3 answers as fixtures_posix.DIFFERENCES says."""
from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest
from conftest import add_backend
from fixtures_posix import differs


def entries_of(tracked, node_id: int) -> list[bytes]:
    rows = tracked.db.execute("SELECT name FROM filestore.entries WHERE node_id = %s ORDER BY id",
                              (node_id,)).fetchall()
    return [bytes(r[0]) for r in rows]


def commands(rows) -> list[tuple[str, str]]:
    return [(r["command"], r["status"]) for r in rows]


def test_hard_link_shares_content_and_metadata(tracked):
    (tracked.path / "a").write_bytes(b"one")
    since = tracked.last_journal_id()
    os.link(tracked.path / "a", tracked.path / "b")
    st_a, st_b = os.stat(tracked.path / "a"), os.stat(tracked.path / "b")
    assert st_a.st_ino == st_b.st_ino and st_a.st_nlink == st_b.st_nlink == 2
    # the backend holds a real hard link
    disk_a, disk_b = os.stat(tracked.backend_root / "a"), os.stat(tracked.backend_root / "b")
    assert disk_a.st_ino == disk_b.st_ino and disk_a.st_nlink == 2
    node = tracked.node("a")
    assert tracked.node("b")["id"] == node["id"] == st_a.st_ino
    assert entries_of(tracked, node["id"]) == [b"a", b"b"]
    assert commands(tracked.journal(since)) == [("link", "committed")]
    # content and metadata are shared
    with open(tracked.path / "b", "ab") as f:
        f.write(b" two")
    assert (tracked.path / "a").read_bytes() == b"one two"
    os.chmod(tracked.path / "a", 0o600)
    assert stat.S_IMODE(os.stat(tracked.path / "b").st_mode) == 0o600


def test_unlinking_one_name_keeps_the_other(tracked):
    (tracked.path / "a").write_bytes(b"kept")
    os.link(tracked.path / "a", tracked.path / "b")
    node_id = tracked.node("a")["id"]
    os.unlink(tracked.path / "a")
    assert (tracked.path / "b").read_bytes() == b"kept"
    assert os.stat(tracked.path / "b").st_nlink == 1
    row = tracked.node("b")
    assert row["id"] == node_id and row["state"] == "ACTIVE"
    os.unlink(tracked.path / "b")
    tracked.settle()
    state = tracked.db.execute("SELECT state FROM filestore.nodes WHERE id = %s", (node_id,)).fetchone()[0]
    assert state == "DELETED"


def test_rename_onto_another_name_of_the_same_file_does_nothing(tracked):
    (tracked.path / "a").write_bytes(b"x")
    os.link(tracked.path / "a", tracked.path / "b")
    since = tracked.last_journal_id()
    os.rename(tracked.path / "a", tracked.path / "b")
    assert sorted(os.listdir(tracked.path)) == ["a", "b"]
    assert sorted(os.listdir(tracked.backend_root)) == [".filestore.staging", "a", "b"]
    assert commands(tracked.journal(since)) == []


def test_truncating_rewrite_of_a_linked_file_is_seen_through_both_names(tracked):
    (tracked.path / "a").write_bytes(b"old content")
    os.link(tracked.path / "a", tracked.path / "b")
    (tracked.path / "a").write_bytes(b"new")
    assert (tracked.path / "b").read_bytes() == b"new"
    assert os.stat(tracked.backend_root / "a").st_ino == os.stat(tracked.backend_root / "b").st_ino
    assert (tracked.backend_root / "b").read_bytes() == b"new"


def test_link_errors(tracked):
    (tracked.path / "f").write_bytes(b"x")
    os.mkdir(tracked.path / "d")
    other = add_backend(tracked, "other")
    del other
    cases = [
        (lambda: os.link(tracked.path / "f", tracked.path / "d"), errno.EEXIST),
        (lambda: os.link(tracked.path / "d", tracked.path / "d2"), errno.EPERM),
        (lambda: os.link(tracked.path / "missing", tracked.path / "g"), errno.ENOENT),
        (lambda: os.link(tracked.path / "f", tracked.mount.mountpoint / "other" / "f"), errno.EXDEV),
    ]
    for action, expected in cases:
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == expected


def _object_mode(fs, rel: str) -> int:
    from fixtures_s3 import s3_client, wait_uploaded

    wait_uploaded(fs)
    return int(s3_client(fs.endpoint).head_object(Bucket=fs.bucket, Key=f"data/{rel}")["Metadata"]["mode"])


def test_fifo_is_a_node_and_a_real_fifo(fs):
    tracked = fs
    since = tracked.last_journal_id()
    os.mkfifo(tracked.path / "pipe", 0o640)
    st = os.lstat(tracked.path / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    if fs.kind == "local":
        assert stat.S_ISFIFO(os.lstat(tracked.backend_root / "pipe").st_mode)
    else:
        assert _object_mode(fs, "pipe") == stat.S_IFIFO | 0o640
    node = tracked.node("pipe", fs.kind if fs.kind == "s3" else "local")
    assert (node["kind"], node["mode"], node["id"]) == ("fifo", 0o640, st.st_ino)
    rows = tracked.journal(since)
    assert commands(rows) == [("mknod", "committed")] and rows[0]["args"]["kind"] == "fifo"
    # data flows through it (the kernel serves FIFOs itself)
    reader = subprocess.Popen(["cat", str(tracked.path / "pipe")], stdout=subprocess.PIPE)
    with open(tracked.path / "pipe", "wb") as w:
        w.write(b"through the pipe")
    assert reader.communicate(timeout=10)[0] == b"through the pipe"
    os.rename(tracked.path / "pipe", tracked.path / "pipe2")
    if fs.kind == "local":
        assert stat.S_ISFIFO(os.lstat(tracked.backend_root / "pipe2").st_mode)
    else:
        assert _object_mode(fs, "pipe2") == stat.S_IFIFO | 0o640
    os.unlink(tracked.path / "pipe2")
    assert not os.path.lexists(tracked.path / "pipe2")
    if fs.kind == "local":
        assert not os.path.lexists(tracked.backend_root / "pipe2")


def test_socket_and_devices(fs):
    tracked = fs
    backend = "s3" if fs.kind == "s3" else "local"
    os.mknod(tracked.path / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(tracked.path / "sock").st_mode)
    assert tracked.node("sock", backend)["kind"] == "socket"
    if os.geteuid() != 0:
        pytest.skip("devices need root")
    dev = os.makedev(1, 3)
    os.mknod(tracked.path / "null", stat.S_IFCHR | 0o666, dev)
    os.mknod(tracked.path / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    st = os.lstat(tracked.path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev
    if fs.kind == "local":
        assert os.lstat(tracked.backend_root / "null").st_rdev == dev
    assert stat.S_ISBLK(os.lstat(tracked.path / "blk").st_mode)
    row = tracked.node("null", backend)
    assert (row["kind"], row["rdev"]) == ("chardev", dev)
    tracked.restart()  # kinds and device numbers come back from the database
    st = os.lstat(tracked.path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev


def test_hard_links_and_exchange_answer_as_listed_where_the_backend_has_none(fs):
    """On a backend listed without hard links (S3), link(2) answers its errno and is journaled
    as failed, renameat2(RENAME_EXCHANGE) too, and nothing changes."""
    link, exchange = differs(fs.kind, "link"), differs(fs.kind, "renameat2")
    if link is None:
        pytest.skip("this backend kind has hard links and RENAME_EXCHANGE: the tests above")
    (fs.path / "a").write_bytes(b"x")
    (fs.path / "b").write_bytes(b"y")
    from fixtures_s3 import wait_uploaded

    wait_uploaded(fs)
    since = fs.last_journal_id()
    with pytest.raises(OSError) as exc:
        os.link(fs.path / "a", fs.path / "c")
    assert exc.value.errno == link.errno
    with pytest.raises(OSError) as exc:
        _renameat2(fs.path / "a", fs.path / "b", RENAME_EXCHANGE)
    assert exc.value.errno == exchange.errno
    assert sorted(os.listdir(fs.path)) == ["a", "b"]
    assert (fs.path / "a").read_bytes() == b"x" and (fs.path / "b").read_bytes() == b"y"
    assert [(r["command"], r["status"], r["errno"]) for r in fs.journal(since)] == [
        ("link", "failed", link.errno), ("rename", "failed", exchange.errno)]


def test_tar_round_trip_keeps_hard_links_and_fifos(tracked, native):
    src = native / "src"
    src.mkdir()
    (src / "data").write_bytes(b"linked data")
    os.link(src / "data", src / "alias")
    os.mkfifo(src / "fifo")
    subprocess.run(["tar", "-cf", str(native / "t.tar"), "-C", str(src), "."], check=True)
    subprocess.run(["tar", "-xf", str(native / "t.tar"), "-C", str(tracked.path)], check=True)
    assert os.stat(tracked.path / "data").st_ino == os.stat(tracked.path / "alias").st_ino
    assert os.stat(tracked.path / "alias").st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(tracked.path / "fifo").st_mode)
    out = native / "out"
    out.mkdir()
    subprocess.run(f"tar -cf - -C {tracked.path} . | tar -xf - -C {out}", shell=True, check=True)
    assert os.stat(out / "data").st_ino == os.stat(out / "alias").st_ino
    assert (out / "alias").read_bytes() == b"linked data"


def _renameat2(old, new, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


RENAME_EXCHANGE = 2


def test_rename_exchange_swaps_atomically(tracked, native):
    for base in (tracked.path, native):
        os.makedirs(base / "d" / "inner")
        (base / "f").write_bytes(b"file")
        (base / "g").write_bytes(b"other")
    f_id, d_id = tracked.node("f")["id"], tracked.node("d")["id"]
    since = tracked.last_journal_id()
    for base in (tracked.path, native):
        _renameat2(base / "f", base / "g", RENAME_EXCHANGE)
        _renameat2(base / "f", base / "d", RENAME_EXCHANGE)  # a file and a directory swap too
    for base in (tracked.path, native):
        assert (base / "g").read_bytes() == b"file"
        assert (base / "d").read_bytes() == b"other"
        assert os.path.isdir(base / "f" / "inner")
    assert (tracked.backend_root / "g").read_bytes() == b"file"
    assert os.path.isdir(tracked.backend_root / "f" / "inner")
    assert tracked.node("g")["id"] == f_id and tracked.node("f")["id"] == d_id
    assert commands(tracked.journal(since)) == [("rename", "committed")] * 2
    for base in (tracked.path, native):  # a missing second name: ENOENT; into itself: EINVAL
        with pytest.raises(OSError) as exc:
            _renameat2(base / "g", base / "missing", RENAME_EXCHANGE)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            _renameat2(base / "f", base / "f" / "inner", RENAME_EXCHANGE)
        assert exc.value.errno == errno.EINVAL
