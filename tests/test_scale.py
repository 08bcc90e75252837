"""A mount's memory stays bounded on a large tree (issue 17): the namespace drops what was used
least recently past FILESTORE_NAMESPACE_MEMORY and loads it again when needed."""
from __future__ import annotations

import os

from conftest import Mount, assert_consistent, run_cli

DIRS, FILES = 200, 1000  # 200,000 files, 200 directories


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def walk(top) -> tuple[int, int]:
    """What `find` does: every directory listed, every entry stat'ed (lstat)."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            size += os.lstat(os.path.join(dirpath, name)).st_size
            files += 1
    return files, size


def test_a_walk_of_200000_files_keeps_the_mount_within_its_namespace_memory(tmp_path, env, db):
    root = tmp_path / "big"
    for d in range(DIRS):
        sub = root / f"d{d:03}"
        sub.mkdir(parents=True)
        for f in range(FILES):
            (sub / f"f{f:04}").write_bytes(b"x" * (f % 3))
    run_cli(env, "backend", "add", "big", str(root), timeout=600)
    budget = 16 << 20  # 16,384 nodes: a tenth of the tree
    mount = Mount(dict(env, FILESTORE_NAMESPACE_MEMORY="16MiB"), tmp_path / "mnt",
                  tmp_path / "home" / "logs" / "mount.log").start()
    try:
        pid = mount.process.pid
        expected = (DIRS * FILES, DIRS * sum(f % 3 for f in range(FILES)))
        before = rss_bytes(pid)
        assert walk(mount.mountpoint / "big") == expected
        first = rss_bytes(pid)
        assert walk(mount.mountpoint / "big") == expected  # everything loaded again where dropped
        second = rss_bytes(pid)
        print(f"RSS before {before >> 20} MiB, after a walk {first >> 20} MiB, after two {second >> 20} MiB")
        # Unbounded, the walk grew the mount by about 1 KB a node (200 MB here). Bounded, it
        # grows by the budget and what Python keeps of freed memory, not by the tree.
        assert first - before < 4 * budget, (before, first)
        assert second - before < 4 * budget, (before, second)
    finally:
        mount.stop()
    assert_consistent(db, "big", root)
