"""Extended attributes through the mount: what is stored where, journaled how, and the answers
that differ on purpose from a native ext4 (behaviour shared with native is compared in
test_conformance.py, scenarios `xattr:*`)."""
from __future__ import annotations

import errno
import os
import struct
import subprocess

import pytest
from conftest import errno_of
from fixtures_posix import stored as backend_holds


def stored(tracked, node_id: int) -> dict[bytes, bytes]:
    rows = tracked.db.execute("SELECT name, value FROM filestore.xattrs WHERE node_id = %s", (node_id,)).fetchall()
    return {bytes(n): bytes(v) for n, v in rows}


def test_setxattr_is_journaled_with_its_row_and_kept_on_disk(tracked):
    path = tracked.path / "f"
    path.write_bytes(b"x")
    node = tracked.node("f")
    since = tracked.last_journal_id()

    os.setxattr(path, "user.colour", b"blue")
    os.setxattr(path, "user.colour", b"green")
    os.removexattr(path, "user.colour")
    os.setxattr(path, "user.kept", b"\x00\xff")

    rows = tracked.journal(since)
    assert [(r["command"], r["status"], r["args"]["name"]) for r in rows] == [
        ("setxattr", "committed", "user.colour"), ("setxattr", "committed", "user.colour"),
        ("removexattr", "committed", "user.colour"), ("setxattr", "committed", "user.kept")]
    assert all(r["args"]["on_disk"] for r in rows) and rows[0]["args"]["size"] == 4
    assert all(r["uid"] == 0 and r["pid"] for r in rows)
    assert stored(tracked, node["id"]) == {b"user.kept": b"\x00\xff"}
    assert os.getxattr(tracked.backend_root / "f", "user.kept") == b"\x00\xff"
    assert os.listxattr(tracked.backend_root / "f") == ["user.kept"]
    # every change bumped the node's version and left a snapshot of it
    assert tracked.node("f")["version"] == node["version"] + 4


def test_refused_setxattr_is_journaled_as_failed_and_changes_nothing(tracked):
    path = tracked.path / "f"
    path.write_bytes(b"x")
    os.setxattr(path, "user.a", b"1")
    since = tracked.last_journal_id()
    assert errno_of(os.removexattr, path, "user.missing") == errno.ENODATA
    assert errno_of(os.setxattr, path, "user.filestore.size", b"1") == errno.EPERM
    # other namespaces are not refusals but what a filesystem without them answers: no row
    assert errno_of(os.setxattr, path, "trusted.x", b"1") == errno.EOPNOTSUPP
    rows = tracked.journal(since)
    assert [(r["command"], r["status"], r["errno"]) for r in rows] == [
        ("removexattr", "failed", errno.ENODATA), ("setxattr", "failed", errno.EPERM)]
    assert stored(tracked, tracked.node("f")["id"]) == {b"user.a": b"1"}


def test_xattrs_survive_a_restart_and_are_read_from_the_database(tracked):
    path = tracked.path / "d"
    path.mkdir()
    os.setxattr(path, "user.owner-team", b"storage")
    # remove the disk copy behind the mount's back: the database is the authority
    os.removexattr(tracked.backend_root / "d", "user.owner-team")
    tracked.restart()
    assert os.getxattr(path, "user.owner-team") == b"storage"
    assert [n for n in os.listxattr(path) if not n.startswith("user.filestore.")] == ["user.owner-team"]


def test_a_64_kib_value_is_kept_where_the_disk_has_no_room(tracked):
    """ext4 without ea_inode keeps at most about one block of xattrs per inode (ENOSPC); the
    mount accepts the Linux maximum of 64 KiB like XFS or btrfs, keeps it in the database and
    journals that the disk copy was not made."""
    path = tracked.path / "f"
    path.write_bytes(b"x")
    since = tracked.last_journal_id()
    os.setxattr(path, "user.big", b"v" * 65536)
    assert os.getxattr(path, "user.big") == b"v" * 65536
    assert errno_of(os.setxattr, path, "user.big", b"v" * 65537) == errno.E2BIG
    row = tracked.journal(since)[0]
    assert row["args"]["on_disk"] is False and row["args"]["size"] == 65536
    assert errno_of(os.getxattr, tracked.backend_root / "f", "user.big") == errno.ENODATA


def test_other_namespaces_are_those_of_a_filesystem_without_them(tracked):
    path = tracked.path / "f"
    path.write_bytes(b"x")
    assert errno_of(os.getxattr, path, "security.capability") == errno.ENODATA
    assert errno_of(os.getxattr, path, "trusted.x") == errno.ENODATA
    for name in ("security.selinux", "trusted.x"):
        assert errno_of(os.setxattr, path, name, b"v") == errno.EOPNOTSUPP, name
    # a valid ACL (the kernel parses it first): user::rw- group::r-- other::r--
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((1, 6), (4, 4), (0x20, 4)))
    assert errno_of(os.setxattr, path, "system.posix_acl_access", acl) == errno.EOPNOTSUPP
    assert os.listxattr(path) == []
    assert errno_of(os.getxattr, tracked.mount.mountpoint, "user.x") == errno.ENODATA
    assert errno_of(os.setxattr, tracked.mount.mountpoint, "user.x", b"v") == errno.EPERM


def test_user_filestore_names_are_read_only(tracked):
    path = tracked.path / "f"
    path.write_bytes(b"x")
    for flags in (0, os.XATTR_CREATE, os.XATTR_REPLACE):
        got = errno_of(os.setxattr, path, "user.filestore.size_bytes", b"1", flags)
        assert got == (errno.ENODATA if flags == os.XATTR_REPLACE else errno.EPERM)
    assert errno_of(os.removexattr, path, "user.filestore.size_bytes") == errno.EPERM


def test_virtual_xattrs_are_served_from_the_provider(tracked, tmp_path):
    """The provider of the read-only user.filestore.* names (a directory's rollup fields):
    served by getxattr and listxattr, refused to setxattr."""
    from core import config
    from core.errors import FsError
    from core.model import Principal
    from core.service import Filestore

    fs = Filestore(config.load({**tracked.env, "FILESTORE_HOME": str(tmp_path / "home2")}))
    try:
        root = fs.ns.backend_by_name(b"local").root_node_id
        assert fs.virtual_xattrs(fs.ns.node(root))[b"user.filestore.file_count"] == b"0"
        fs.virtual_xattrs = lambda node: {b"user.filestore.file_count": b"3"}
        assert fs.getxattr(root, b"user.filestore.file_count") == b"3"
        assert b"user.filestore.file_count" not in fs.listxattr(root)  # read by name, never listed
        with pytest.raises(FsError) as err:
            fs.orch.setxattr(Principal.current_process(), root, b"user.filestore.file_count", b"4")
        assert err.value.errno == errno.EPERM
    finally:
        fs.close()


def test_xattrs_off_makes_the_kernel_stop_asking(tmp_path, env, db):
    """FILESTORE_XATTRS=off: the first call answers ENOSYS, which the kernel turns into
    EOPNOTSUPP and remembers for the mount (no more round trips for ls -l probes)."""
    from conftest import Mount, run_cli

    backend = tmp_path / "backend"
    backend.mkdir()
    run_cli(env, "backend", "add", "local", str(backend))
    mount = Mount({**env, "FILESTORE_XATTRS": "off"}, tmp_path / "mnt", tmp_path / "home" / "logs" / "m.log").start()
    try:
        path = mount.mountpoint / "local" / "f"
        path.write_bytes(b"x")
        assert errno_of(os.setxattr, path, "user.a", b"1") == errno.EOPNOTSUPP
        assert errno_of(os.getxattr, path, "user.a") == errno.EOPNOTSUPP
        assert errno_of(os.listxattr, path) in (None, errno.EOPNOTSUPP)
    finally:
        mount.stop()
    assert db.execute("SELECT count(*) FROM filestore.xattrs").fetchone()[0] == 0


def _requests(port: int, op: str) -> float:
    from fixtures_sidecar import http_get

    _, text = http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(f'filestore_fuse_requests_total{{op="{op}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_by_default_no_backend_keeps_xattrs_and_ls_sends_no_probe(tmp_path, env, db):
    """The default (FILESTORE_XATTRS=auto, no backend added with --xattrs): the mount answers
    ENOSYS once and the kernel asks no more, so `ls -l` of a directory costs no xattr round
    trip per entry (GNU ls probes two of each), which is what keeps it near native (D38)."""
    from conftest import Mount, run_cli
    from fixtures_sidecar import free_port

    backend = tmp_path / "backend"
    backend.mkdir()
    run_cli(env, "backend", "add", "local", str(backend))
    port = free_port()
    mount = Mount({**env, "FILESTORE_HTTP_PORT": str(port)}, tmp_path / "mnt",
                  tmp_path / "home" / "logs" / "m.log").start()
    try:
        base = mount.mountpoint / "local"
        for i in range(50):
            (base / f"f{i}").write_bytes(b"x")
        assert errno_of(os.getxattr, base / "f0", "user.a") == errno.EOPNOTSUPP
        assert errno_of(os.setxattr, base / "f0", "user.a", b"1") == errno.EOPNOTSUPP
        probes = _requests(port, "getxattr") + _requests(port, "listxattr")
        listing = subprocess.run(["ls", "-l", str(base)], capture_output=True, text=True, check=True)
        assert len(listing.stdout.splitlines()) == 51
        assert _requests(port, "getxattr") + _requests(port, "listxattr") == probes  # none reached the mount
        assert _requests(port, "getattr") + _requests(port, "lookup") > 0  # the counter itself counts
    finally:
        mount.stop()
    assert db.execute("SELECT count(*) FROM filestore.xattrs").fetchone()[0] == 0


def test_a_backend_added_with_xattrs_keeps_them_beside_one_without(tmp_path, env, db):
    from conftest import Mount, run_cli

    for name, extra in (("tagged", ["--xattrs"]), ("plain", [])):
        (tmp_path / name).mkdir()
        run_cli(env, "backend", "add", name, str(tmp_path / name), *extra)
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "m.log").start()
    try:
        tagged, plain = mount.mountpoint / "tagged" / "f", mount.mountpoint / "plain" / "f"
        tagged.write_bytes(b"x")
        plain.write_bytes(b"x")
        os.setxattr(tagged, "user.team", b"a")
        assert os.getxattr(tagged, "user.team") == b"a"
        assert errno_of(os.setxattr, plain, "user.team", b"a") == errno.EOPNOTSUPP
        assert errno_of(os.getxattr, plain, "user.team") == errno.ENODATA
        assert os.listxattr(plain) == []
    finally:
        mount.stop()
    assert db.execute("SELECT count(*) FROM filestore.xattrs").fetchone()[0] == 1


@pytest.mark.parametrize("command", ["setxattr", "removexattr"])
def test_crash_after_the_disk_change_is_adopted_at_restart(tracked, command):
    """The server dies after the attribute changed on disk and before its command committed:
    recovery takes what the disk has (a set happened), or keeps the stored value (a removal
    that never returned), and journals it as `recover`."""
    from test_recovery import crash_during, recover_rows, unfinished_intents

    path = tracked.path / "f"
    path.write_bytes(b"x")
    os.setxattr(path, "user.v", b"old")
    since = tracked.last_journal_id()
    if command == "setxattr":
        crash_during(tracked, "after_execute:setxattr", lambda: os.setxattr(path, "user.v", b"new"))
    else:
        crash_during(tracked, "after_execute:removexattr", lambda: os.removexattr(path, "user.v"))
    assert [i["cmd"] for i in unfinished_intents(tracked)] == [command]
    tracked.mount.start()
    rows = recover_rows(tracked, since)
    assert [r["args"]["intent"] for r in rows] == [command]
    expected = b"new" if command == "setxattr" else b"old"
    assert os.getxattr(path, "user.v") == expected
    assert stored(tracked, tracked.node("f")["id"]) == {b"user.v": expected}


def test_xattrs_on_every_backend_kind_are_journaled_and_survive_a_restart(fs):
    """The same user.* attributes on a local and an S3 backend (the database holds them; S3
    objects keep none, so the row says on_disk false there), kept across a rename, a rewrite
    by rename and a restart. Behaviour shared with native is compared in test_conformance.py
    on both kinds."""
    path = fs.path / "f"
    path.write_bytes(b"x")
    assert backend_holds(fs, "f") == b"x"  # S3: once its upload landed (journaled), before `since`
    since = fs.last_journal_id()
    os.setxattr(path, "user.colour", b"blue")
    rows = fs.journal(since)
    assert [(r["command"], r["status"]) for r in rows] == [("setxattr", "committed")]
    assert rows[0]["args"]["on_disk"] is (fs.kind == "local")
    os.rename(path, fs.path / "g")
    (fs.path / "g.tmp").write_bytes(b"new")
    os.rename(fs.path / "g.tmp", fs.path / "h")
    fs.restart()
    assert os.getxattr(fs.path / "g", "user.colour") == b"blue"
    assert os.listxattr(fs.path / "h") == []
    assert errno_of(os.getxattr, fs.path / "g", "user.missing") == errno.ENODATA
