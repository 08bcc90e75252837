"""Two mounts of one database and one Redis: what one changes, the other sees.

Each mount keeps listings, nodes and rollup values in memory and the kernel caches
attributes, names and pages; a command announces what it changed on Redis
(`filestore:invalidate`) and a fold announces the rollups it changed, and the other mount
drops its copies and tells its kernel. Without that, mount B would list a directory as it
first loaded it for as long as it runs.
"""
from __future__ import annotations

import json
import os

import redis
from conftest import Mount, wait_until


def second_mount(tracked, tmp_path, redis_url):
    tracked.mount.stop()
    tracked.mount.env = {**tracked.env, "REDIS_URL": redis_url}
    tracked.mount.start()
    home_b = tmp_path / "home-b"
    env_b = {**tracked.env, "REDIS_URL": redis_url, "FILESTORE_HOME": str(home_b)}
    return Mount(env_b, tmp_path / "mnt-b", home_b / "logs" / "b.log").start()


def test_changes_through_one_mount_reach_the_other(tracked, tmp_path, redis_server):
    b = second_mount(tracked, tmp_path, redis_server.url)
    try:
        a_dir, b_dir = tracked.path, b.mountpoint / "local"
        assert os.listdir(b_dir) == []  # B has loaded (and holds) the listing
        (a_dir / "new.txt").write_bytes(b"one")
        wait_until(lambda: "new.txt" in os.listdir(b_dir), timeout=5, message="B lists A's new file")
        assert (b_dir / "new.txt").read_bytes() == b"one"
        with open(a_dir / "new.txt", "ab") as f:  # an in-place append: same inode, new content
            f.write(b" two")
        wait_until(lambda: (b_dir / "new.txt").read_bytes() == b"one two", timeout=5,
                   message="B reads A's appended content")
        os.mkdir(a_dir / "d")
        wait_until(lambda: os.path.isdir(b_dir / "d"), timeout=5, message="B sees A's directory")
        assert os.stat(b_dir / "d").st_size == 0
        (a_dir / "d" / "f").write_bytes(b"x" * 500)
        wait_until(lambda: os.stat(b_dir / "d").st_size == 500, timeout=5, message="B serves the new rollup")
        os.rename(b_dir / "new.txt", b_dir / "d" / "moved.txt")
        wait_until(lambda: sorted(os.listdir(a_dir / "d")) == ["f", "moved.txt"], timeout=5,
                   message="A sees B's rename")
        assert not (a_dir / "new.txt").exists()
        assert (a_dir / "d" / "moved.txt").read_bytes() == b"one two"
    finally:
        b.stop()


def test_rollup_summaries_are_shared_and_invalidated_in_redis(tracked, tmp_path, redis_server):
    b = second_mount(tracked, tmp_path, redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        os.makedirs(tracked.path / "s")
        (tracked.path / "s" / "f").write_bytes(b"y" * 100)
        node = tracked.node("s")
        key = f"filestore:rollup:{node['backend_id']}:{node['id']}"
        # B serves A's change once A's group committed and its announcement arrived, and the
        # folded (exact) value, which it shares in Redis, once A's fold is announced too
        wait_until(lambda: os.path.exists(b.mountpoint / "local" / "s") and
                   os.stat(b.mountpoint / "local" / "s").st_size == 100 and client.get(key) is not None,
                   timeout=5, message="B serves the folded value and shares it")
        assert json.loads(client.get(key))["size_bytes"] == 100  # B cached it in Redis
        assert 0 < client.ttl(key) <= 300
        (tracked.path / "s" / "g").write_bytes(b"z" * 11)  # A's fold deletes the key and announces it
        wait_until(lambda: os.stat(b.mountpoint / "local" / "s").st_size == 111, timeout=5,
                   message="B drops its copy and serves the new value")
    finally:
        client.close()
        b.stop()


def test_a_separate_sidecars_reconciliations_reach_the_mount(tracked, sidecars, redis_server):
    """The mount leaves drift to a `filestore sidecar`; what the sidecar reconciles it announces,
    and the mount (another process) shows it without reloading anything by itself."""
    tracked.mount.stop()
    tracked.mount.env = {**tracked.env, "REDIS_URL": redis_server.url, "FILESTORE_INLINE_LOOPS": "0"}
    tracked.mount.start()
    sidecars(REDIS_URL=redis_server.url)
    base, root = tracked.path, tracked.backend_root
    (base / "kept.txt").write_bytes(b"v1")
    assert os.listdir(base) == ["kept.txt"]  # listing loaded and held by the mount
    (root / "outside.txt").write_bytes(b"made on the disk")
    wait_until(lambda: "outside.txt" in os.listdir(base), timeout=15, message="the mount lists it")
    with open(root / "kept.txt", "ab") as f:
        f.write(b" and v2")
    wait_until(lambda: (base / "kept.txt").read_bytes() == b"v1 and v2", timeout=15,
               message="the mount reads the new content")
    os.unlink(root / "outside.txt")
    wait_until(lambda: "outside.txt" not in os.listdir(base), timeout=15, message="the mount drops it")


class Inotify:
    """The kernel's inotify on one path, read without a library: what `tail -F`, an editor or an
    IDE watching a file in the mount relies on."""

    IN_DELETE_SELF = 0x400

    def __init__(self, path, mask: int):
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert libc.inotify_add_watch(self.fd, os.fsencode(path), mask) >= 0
        self.masks = 0

    def read(self) -> int:
        """Every event mask seen so far, or'ed."""
        import struct
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            data = b""
        offset = 0
        while offset < len(data):
            _, mask, _, length = struct.unpack_from("iIII", data, offset)
            self.masks |= mask
            offset += 16 + length
        return self.masks

    def close(self) -> None:
        os.close(self.fd)


def test_an_inotify_watch_in_one_mount_sees_a_delete_made_through_the_other(tracked, tmp_path, redis_server):
    """Issue 16: the announcement of a removed name carries its node, and the other mount tells
    its kernel the entry was deleted (not only that it is stale): a watch on the file reports
    IN_DELETE_SELF. (This kernel gives a watch on the directory no IN_DELETE for it: FUSE's
    delete notification reaches the file's watchers only.)"""
    b = second_mount(tracked, tmp_path, redis_server.url)
    (tracked.path / "gone.txt").write_bytes(b"x")
    (tracked.path / "kept.txt").write_bytes(b"y")
    b_dir = b.mountpoint / "local"
    wait_until(lambda: sorted(os.listdir(b_dir)) == ["gone.txt", "kept.txt"], timeout=5, message="B lists both")
    watch = Inotify(b_dir / "gone.txt", Inotify.IN_DELETE_SELF)
    try:
        os.unlink(tracked.path / "gone.txt")
        wait_until(lambda: watch.read() & Inotify.IN_DELETE_SELF, timeout=5,
                   message="IN_DELETE_SELF for gone.txt in mount B")
        assert not (b_dir / "gone.txt").exists() and (b_dir / "kept.txt").exists()
    finally:
        watch.close()
        b.stop()
