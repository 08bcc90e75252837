"""The watchers' inotify trees against a real directory, without a mount: what reaches Python and
which paths come out (core.repair.tree_watch, core.repair.watchers). The drift that follows is
tested with real sidecars and mounts in test_sidecar.py and test_sidecar_mount.py."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
from conftest import STAGING, wait_until

from core.model import Backend
from core.repair.tree_watch import TreeWatch
from core.repair.watchers import Watchers
from executors.local import LocalExecutor


def quiet(tree: TreeWatch) -> dict[str, dict]:
    """The paths reported for what was done so far (the system calls queue their events before
    they return, so reading after them is deterministic)."""
    seen: dict[str, dict] = {}
    for _ in range(2):  # an IN_MOVED_FROM still alone after one read is final
        for rel, extra in tree.read()[1].items():
            seen.setdefault(os.fsdecode(rel), {}).update(extra)  # as the watchers merge them
    return seen


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "backend"
    (root / STAGING).mkdir(parents=True)
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"f")
    return root


def test_staging_areas_at_any_depth_are_not_watched(root):
    (root / "d" / "e" / STAGING).mkdir()  # a nested backend's
    tree = TreeWatch(str(root))
    try:
        assert tree.watched == 3  # the root, d and d/e
        for area in (root / STAGING, root / "d" / "e" / STAGING):
            (area / "staged").write_bytes(b"x" * 4096)
            os.chmod(area / "staged", 0o640)
            os.utime(area / "staged", (1, 1))
        count, changes = tree.read()
        assert (count, changes) == (0, {})
        # The landing rename is the one event of a staged file, with the close of its descriptor.
        with open(root / STAGING / "s2", "wb", buffering=0) as f:
            f.write(b"y" * 4096)
            os.rename(root / STAGING / "s2", root / "d" / "landed")
        count, changes = tree.read()
        assert changes == {b"d/landed": {}} and count == 2, (count, changes)
        assert quiet(tree) == {}
        (root / "new").mkdir()
        (root / "new" / STAGING).mkdir()  # made inside a directory the watcher had to add
        (root / "new" / STAGING / "s").write_bytes(b"z")
        assert quiet(tree) == {"new": {"deep": True}}
        assert tree.watched == 4
    finally:
        tree.close()


def test_changes_made_outside_are_reported_by_path(root):
    tree = TreeWatch(str(root))
    try:
        (root / "created.txt").write_bytes(b"c")
        os.chmod(root / "d" / "f.txt", 0o600)
        os.makedirs(root / "p" / "q" / "r")  # with content: looked at deep
        (root / "p" / "q" / "r" / "in.txt").write_bytes(b"i")
        os.rename(root / "d" / "f.txt", root / "d" / "e" / "g.txt")
        # p/q, p/q/r and in.txt were made before p was watched: listed when it is, and the
        # directories compared whole (something may have come and gone in them unseen)
        deep = {"deep": True}
        assert quiet(tree) == {"created.txt": {}, "d/f.txt": {}, "p": deep, "p/q": deep, "p/q/r": deep,
                               "p/q/r/in.txt": {}, "d/e/g.txt": {"from": b"d/f.txt".hex()}}

        os.rename(root / "d", root / "p" / "moved")  # a directory moved inside: later paths follow it
        assert quiet(tree) == {"p/moved": {"from": b"d".hex(), "deep": True}}
        (root / "p" / "moved" / "e" / "h.txt").write_bytes(b"h")
        assert quiet(tree) == {"p/moved/e/h.txt": {}}

        with open(root / "log.txt", "ab") as log:  # appended by a writer that keeps it open
            log.write(b"one\n")
            log.flush()
            assert quiet(tree) == {"log.txt": {}}
            log.write(b"two\n")
            log.flush()
            assert quiet(tree) == {"log.txt": {}}
        assert quiet(tree) == {"log.txt": {}}  # its close

        outside = root.parent / "outside"
        os.rename(root / "p" / "moved", outside)  # moved out: the old path; nothing from it after
        assert quiet(tree) == {"p/moved": {}}
        (outside / "e" / "later.txt").write_bytes(b"l")
        assert quiet(tree) == {}
        os.rename(outside, root / "back")  # moved in: watched again, with its contents
        assert quiet(tree) == {"back": {"deep": True}}
        (root / "back" / "e" / "again.txt").write_bytes(b"a")
        assert quiet(tree) == {"back/e/again.txt": {}}

        shutil.rmtree(root / "back")
        assert set(quiet(tree)) >= {"back", "back/e", "back/e/again.txt"}
        assert tree.watched == 4  # the root, p, p/q, p/q/r
    finally:
        tree.close()


def test_a_tree_of_more_than_5000_directories_is_watched_to_its_depths(tmp_path):
    root = tmp_path / "big"
    for i in range(60):
        for j in range(100):
            os.makedirs(root / f"a{i}" / f"b{j}")
    tree = TreeWatch(str(root))
    try:
        assert tree.watched == 1 + 60 + 6000
        (root / "a59" / "b99" / "deep.txt").write_bytes(b"d")
        (root / "a0" / "b0" / "c").mkdir()
        (root / "a0" / "b0" / "c" / "in-new.txt").write_bytes(b"n")
        # in-new.txt came before c was watched: listed when it is
        assert quiet(tree) == {"a59/b99/deep.txt": {}, "a0/b0/c": {"deep": True}, "a0/b0/c/in-new.txt": {}}
        (root / "a0" / "b0" / "c" / "later.txt").write_bytes(b"l")
        assert quiet(tree) == {"a0/b0/c/later.txt": {}}
    finally:
        tree.close()


def test_an_overflowed_queue_asks_for_an_audit_and_watching_goes_on(tmp_path):
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it")
    root = tmp_path / "flood"
    (root / "d").mkdir(parents=True)
    tree = TreeWatch(str(root))
    try:
        for i in range(limit + 100):
            (root / "d" / f"f{i}").write_bytes(b"")
        _, changes = tree.read()
        assert changes == {b"": {"deep": True, "source": "audit"}}
        (root / "d" / "after").write_bytes(b"a")
        assert quiet(tree) == {"d/after": {}}
    finally:
        tree.close()


class Recorded:
    """A JobQueue that keeps what it is given."""

    def __init__(self):
        self.items: list[tuple[str, dict]] = []

    def enqueue_many(self, queue, items, delay=0.0):
        self.items.extend(items)


def test_watchers_feed_the_queue_from_one_thread_and_skip_known_paths(root):
    backend = Backend(7, "local", "local", str(root), False, 1, executor=LocalExecutor(root))
    queue = Recorded()
    watchers = Watchers(queue, [backend], known=lambda b, rel, st, *listing: rel == b"mine.txt")
    watchers.start()
    before = threading.active_count()
    stop = threading.Event()
    runner = threading.Thread(target=watchers.run, args=(stop,))
    runner.start()
    try:
        assert threading.active_count() == before + 1  # no thread of inotify's own
        (root / "mine.txt").write_bytes(b"the mount's")
        (root / "theirs.txt").write_bytes(b"someone else's")
        wait_until(lambda: any(p["path"] == b"theirs.txt".hex() for _, p in queue.items), 10,
                   message="the change to be queued")
        assert all(p["path"] != b"mine.txt".hex() for _, p in queue.items)
        assert {"backend": 7, "path": b"theirs.txt".hex(), "source": "watcher"} in [p for _, p in queue.items]
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()


def test_a_name_taken_again_before_its_move_out_is_read_keeps_its_new_watch(root):
    tree = TreeWatch(str(root))
    try:
        os.rename(root / "d", root.parent / "away")
        (root / "d").mkdir()  # the same name, before the watcher has read the move
        (root / "d" / "new.txt").write_bytes(b"n")
        assert quiet(tree) == {"d": {"deep": True}, "d/new.txt": {}}
        (root / "d" / "later.txt").write_bytes(b"l")
        (root.parent / "away" / "e" / "not-ours.txt").write_bytes(b"x")
        assert quiet(tree) == {"d/later.txt": {}}
    finally:
        tree.close()
