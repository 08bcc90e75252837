"""Counters (seed 003, docs/architecture.md D40) through a real mount, by value: global, per backend
and per directory; moved by renames (files and directories, across nested backends); node counts
per directory; `stats verify|repair` on a deliberately damaged subset, and only on it."""
from __future__ import annotations

import json
import os
import random

import pytest
from conftest import wait_until
from test_overlaps import nest_inner_backend
from test_rollups import du_json, random_commands


def stats(tracked, *target: str) -> dict[str, int]:
    return json.loads(tracked.cli("stats", *target, "--json").stdout)["counters"]


def folded(tracked) -> None:
    """Wait until the counters have read everything journaled so far (they fold about once a
    second): the global count of commands equals the journal's."""
    tracked.settle()
    rows = tracked.db.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()[0]
    wait_until(lambda: sum(v for k, v in stats(tracked).items() if k.startswith("commands.")) >= rows,
               timeout=20, message="counters folded")


def verify(tracked, *target: str) -> tuple[int, list[dict]]:
    done = tracked.cli("stats", "verify", *target, "--json", check=False)
    return done.returncode, json.loads(done.stdout.splitlines()[-1])["differences"]  # after the progress lines


def test_a_rename_moves_counters_from_the_old_path_to_the_new(tracked):
    base = tracked.path
    os.makedirs(base / "a" / "sub")
    os.mkdir(base / "b")
    (base / "a" / "x").write_bytes(b"x" * 10)
    (base / "a" / "sub" / "y").write_bytes(b"y" * 5)
    folded(tracked)
    a, b = stats(tracked, "local:/a"), stats(tracked, "local:/b")
    assert a["nodes.file"] == 2 and a["nodes.dir"] == 1 and a["bytes.written"] == 15
    assert a["commands.create.committed"] == 2 and a["commands.mkdir.committed"] == 1
    assert a["events.node.created"] == 3 and a["events.node.updated"] == 2
    assert b == {}

    os.rename(base / "a" / "x", base / "b" / "x")  # a file: its history goes with it
    os.rename(base / "a" / "sub", base / "b" / "sub")  # a directory: its whole subtree
    folded(tracked)
    a, b = stats(tracked, "local:/a"), stats(tracked, "local:/b")
    assert a == {}
    assert b["nodes.file"] == 2 and b["nodes.dir"] == 1 and b["bytes.written"] == 15
    assert b["commands.create.committed"] == 2 and b["commands.rename.committed"] == 2
    sub = stats(tracked, "local:/b/sub")  # keyed by the directory, not its path
    assert sub["nodes.file"] == 1 and sub["bytes.written"] == 5 and "commands.rename.committed" not in sub
    x = stats(tracked, "local:/b/x")  # a file's own counters
    assert x == {"bytes.written": 10, "commands.create.committed": 1, "commands.rename.committed": 1,
                 "commands.write.committed": 1, "events.command.completed": 3, "events.node.created": 1,
                 "events.node.updated": 2, "nodes.file": 1}
    root = stats(tracked, "local:/")
    assert root["nodes.file"] == 2 and root["nodes.dir"] == 3  # a, b, b/sub

    # A deletion leaves the node's history where it happened; its node count goes.
    os.unlink(base / "b" / "x")
    folded(tracked)
    b = stats(tracked, "local:/b")
    assert b["nodes.file"] == 1 and b["commands.unlink.committed"] == 1 and b["commands.create.committed"] == 2
    assert b["events.node.deleted"] == 1
    # The backend's and the global node counts agree with the root directory's.
    assert stats(tracked, "local")["nodes.file"] == stats(tracked)["nodes.file"] == \
        stats(tracked, "local:/")["nodes.file"] == 1
    assert verify(tracked, "local") == (0, [])


@pytest.mark.parametrize("seed", [4, 5])
def test_counters_equal_a_recount_after_random_commands(tracked, seed):
    random_commands(tracked.path, random.Random(seed), 150)
    folded(tracked)
    assert verify(tracked, "local") == (0, [])
    assert verify(tracked) == (0, [])
    # per directory, a node counts once per name, as the rollups count it
    root = stats(tracked, "local:/")
    assert (root.get("nodes.file", 0) + root.get("nodes.symlink", 0), root.get("nodes.dir", 0)) == \
        du_json(tracked)[""][1:]


def test_verify_and_repair_look_only_at_the_subset_asked_for(tracked):
    base = tracked.path
    for d in ("p", "q"):
        os.makedirs(base / d / "deep")
        for i in range(3):
            (base / d / "deep" / f"f{i}").write_bytes(b"z" * (i + 1))
    folded(tracked)
    ids = {d: str(tracked.node(d)["id"]) for d in ("p", "q", "p/deep")}
    good_q = stats(tracked, "local:/q")
    # damage p/deep, q and the backend's own counters
    tracked.db.execute("UPDATE filestore.counters SET value = value + 100 WHERE scope = 'dir' AND scope_key = %s"
                       " AND counter = 'nodes.file'", (ids["p/deep"],))
    tracked.db.execute("UPDATE filestore.counters SET value = 7 WHERE scope = 'dir' AND scope_key = %s"
                       " AND counter = 'bytes.written'", (ids["q"],))
    tracked.db.execute("DELETE FROM filestore.counters WHERE scope = 'backend' AND counter = 'commands.mkdir.committed'")

    code, found = verify(tracked, "local:/p")
    assert code == 1 and [(d["key"], d["counter"], d["recorded"], d["expected"]) for d in found] == [
        (ids["p/deep"], "nodes.file", 103, 3)]  # q and the backend are not looked at
    done = tracked.cli("stats", "repair", "local:/p")
    # p/deep, then the ancestors rebuilt from their direct children (the root takes q's damaged row)
    assert done.stdout.splitlines()[0] == f"dir {ids['p/deep']} nodes.file: recorded 103, counted 3"
    assert verify(tracked, "local:/p") == (0, [])
    assert stats(tracked, "local:/p/deep")["nodes.file"] == 3
    assert verify(tracked, "local:/q")[0] == 1  # still damaged: repair touched only p

    code, found = verify(tracked, "local")
    assert code == 1 and {(d["scope"], d["counter"]) for d in found} == {
        ("backend", "commands.mkdir.committed"), ("dir", "bytes.written")}
    tracked.cli("stats", "repair", "local")
    assert verify(tracked, "local") == (0, [])
    assert stats(tracked, "local:/q") == good_q
    assert stats(tracked, "local")["commands.mkdir.committed"] == 4
    repairs = [r for r in tracked.journal() if r["command"] == "stats.repair"]
    assert [r["args"] for r in repairs] == [{"scope": "dir", "key": ids["p"]}, {"scope": "backend", "key": "local"}]


def test_a_damaged_ancestor_is_rebuilt_from_its_children(tracked):
    os.makedirs(tracked.path / "top" / "mid" / "low")
    (tracked.path / "top" / "mid" / "low" / "f").write_bytes(b"abc")
    folded(tracked)
    top = str(tracked.node("top")["id"])
    tracked.db.execute("UPDATE filestore.counters SET value = 0 WHERE scope = 'dir' AND scope_key = %s", (top,))
    assert verify(tracked, "local:/top/mid") == (0, [])  # below the damage: nothing wrong
    tracked.cli("stats", "repair", "local:/top/mid")  # rebuilds top (and the root) from their children
    assert verify(tracked, "local") == (0, [])
    assert stats(tracked, "local:/top")["bytes.written"] == 3


def test_stats_errors_are_one_line(tracked):
    (tracked.path / "f").write_bytes(b"1")
    done = tracked.cli("stats", "verify", "local:/f", check=False)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "file" in done.stderr
    done = tracked.cli("stats", "nosuch", check=False)
    assert done.returncode == 1 and done.stderr.startswith("filestore: no backend named")
    done = tracked.cli("stats", "verify", "a", "b", check=False)
    assert done.returncode == 2


def test_overlapping_backends_move_and_drop_counts_in_both(tracked):
    """A file moved out of a nested backend's root through the outer one leaves the inner
    backend's counters; a move inside it moves the outer's; a shared node deleted drops both."""
    _, inner = nest_inner_backend(tracked)
    outer = tracked.path

    (outer / "sub" / "a.txt").write_bytes(b"a" * 100)  # mirrored into inner
    folded(tracked)
    assert stats(tracked, "local")["nodes.file"] == 2 and stats(tracked, "inner")["nodes.file"] == 2
    assert stats(tracked, "local:/sub")["nodes.file"] == 2 and stats(tracked, "inner:/")["nodes.file"] == 2

    os.rename(outer / "sub" / "a.txt", outer / "out.txt")  # out of the inner root
    folded(tracked)
    assert stats(tracked, "local")["nodes.file"] == 2 and stats(tracked, "inner")["nodes.file"] == 1
    sub = stats(tracked, "local:/sub")
    assert sub["nodes.file"] == 1 and sub["bytes.written"] == 10  # a.txt's 100 bytes went with it
    assert stats(tracked, "local:/")["bytes.written"] == 110
    assert stats(tracked, "inner:/")["nodes.file"] == 1

    os.mkdir(inner / "d")
    os.rename(inner / "old.txt", inner / "d" / "old.txt")  # inside inner: a move in both
    folded(tracked)
    moved = stats(tracked, "local:/sub/d")
    assert moved["nodes.file"] == 1 and moved["bytes.written"] == 10 and moved["commands.create.committed"] == 1
    assert stats(tracked, "inner:/d")["nodes.file"] == 1

    os.unlink(inner / "d" / "old.txt")  # a node both backends hold
    folded(tracked)
    assert stats(tracked, "inner").get("nodes.file", 0) == 0
    assert stats(tracked, "local")["nodes.file"] == 1  # out.txt
    assert "nodes.file" not in stats(tracked, "local:/sub/d") and "nodes.file" not in stats(tracked, "inner:/d")
    assert stats(tracked, "local:/sub/d")["bytes.written"] == 10  # its history stays where it was
    for name in ("local", "inner"):
        assert verify(tracked, name) == (0, [])


def test_dir_counters_are_counted_again_from_the_tree_when_unseeded(tracked):
    """A database upgraded from path-text counters (schema 7) has no dir counters: the next fold
    counts them once from the tree and the journal."""
    os.makedirs(tracked.path / "u" / "v")
    (tracked.path / "u" / "v" / "w").write_bytes(b"w" * 4)
    folded(tracked)
    before = stats(tracked, "local:/u")
    tracked.db.execute("DELETE FROM filestore.counters WHERE scope = 'dir'")
    tracked.db.execute("UPDATE filestore.counter_watermark SET dirs_seeded = false")
    (tracked.path / "later").write_bytes(b"l")  # a window to fold
    wait_until(lambda: tracked.db.execute("SELECT dirs_seeded FROM filestore.counter_watermark").fetchone()[0],
               timeout=20, message="the dir counters seeded")
    assert stats(tracked, "local:/u") == before
    folded(tracked)
    assert verify(tracked, "local") == (0, [])
