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
        wait_until(lambda: os.stat(b.mountpoint / "local" / "s").st_size == 100, timeout=5,
                   message="B serves the folded value")
        assert json.loads(client.get(key))["size_bytes"] == 100  # B cached it in Redis
        assert 0 < client.ttl(key) <= 300
        (tracked.path / "s" / "g").write_bytes(b"z" * 11)  # A's fold deletes the key and announces it
        wait_until(lambda: os.stat(b.mountpoint / "local" / "s").st_size == 111, timeout=5,
                   message="B drops its copy and serves the new value")
    finally:
        client.close()
        b.stop()
