"""Threshold watches and one du across backends (docs/architecture.md D41), through a real mount:
a threshold crossed up and then down gives exactly two filestore.threshold.crossed events, and
none while the total stays on one side; `filestore du MOUNTPOINT` adds up every backend."""
from __future__ import annotations

import json
import os

import jsonschema
from conftest import add_backend, wait_until

from core.events import outbox


def write(path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"x" * size)


def folded(t, node_id: int, size: int) -> None:
    """Wait until the mount's folder has folded the directory's row to `size` (the watch is
    checked in that fold's transaction, so its journal row is committed by then)."""
    t.settle()
    wait_until(lambda: t.db.execute("SELECT size_bytes FROM filestore.rollups WHERE node_id = %s",
                                    (node_id,)).fetchone()[0] == size, message=f"rollup of {node_id} folded to {size}")


def crossings(t) -> list[tuple]:
    return [(r["path"], r["result"]["direction"], r["result"]["value"]) for r in t.journal()
            if r["command"] == "threshold.crossed"]


def test_a_threshold_crossed_up_and_down_gives_two_events(tracked):
    t = tracked
    w = t.path / "w"
    os.mkdir(w)
    write(w / "a", 600)
    t.settle()
    watch = json.loads(t.cli("watch", "add", "local:/w", "--bytes", "1000", "--json").stdout)
    assert (watch["path"], watch["metric"], watch["threshold"], watch["above"], watch["value"]) == \
        ("w", "size_bytes", 1000, False, 600)
    node = watch["node_id"]
    os.mkdir(w / "sub")
    write(w / "sub" / "b", 300)  # 900: still under
    folded(t, node, 900)
    assert crossings(t) == []
    write(w / "sub" / "c", 200)  # 1,100: over
    folded(t, node, 1100)
    assert crossings(t) == [("w", "up", 1100)]
    write(w / "d", 500)  # 1,600: still over, no event
    folded(t, node, 1600)
    os.unlink(w / "a")  # 1,000: at the threshold is over
    folded(t, node, 1000)
    assert crossings(t) == [("w", "up", 1100)]
    os.unlink(w / "d")  # 500: under again
    folded(t, node, 500)
    write(w / "e", 100)  # 600: still under
    folded(t, node, 600)
    assert crossings(t) == [("w", "up", 1100), ("w", "down", 500)]
    # The events, as consumers get them (inline mode: derived from the journal), match the schema.
    events = [json.loads(line) for line in t.cli("events", "tail", "--from", "1", "--type", "filestore.threshold.crossed",
                                                  "--json").stdout.splitlines()]
    assert [(e["path"], e["node_id"], e["result"]["direction"], e["result"]["threshold"]) for e in events] == \
        [("w", node, "up", 1000), ("w", node, "down", 1000)]
    for event in events:
        jsonschema.validate(event, outbox.load_schema())
    listed = json.loads(t.cli("watch", "ls", "--json").stdout)
    assert [(x["id"], x["crossings"], x["above"], x["value"]) for x in listed] == [(watch["id"], 2, False, 600)]
    t.cli("watch", "remove", str(watch["id"]))
    assert json.loads(t.cli("watch", "ls", "--json").stdout) == []
    assert t.cli("watch", "remove", str(watch["id"]), check=False).returncode == 1
    # A file count watch, and the usage errors.
    files = json.loads(t.cli("watch", "add", str(w), "--files", "2", "--json").stdout)
    assert (files["metric"], files["above"]) == ("file_count", True)  # sub/b, sub/c, e
    assert t.cli("watch", "add", "local:/w", check=False).returncode == 2
    not_dir = t.cli("watch", "add", "local:/w/e", "--files", "1", check=False)
    assert not_dir.returncode == 1 and "a watch is on a directory" in not_dir.stderr
    assert t.cli("journal", "verify").returncode == 0  # the folds' rows are chained too


def test_du_of_the_mount_point_adds_up_every_backend(tracked):
    t = tracked
    add_backend(t, "other")
    os.makedirs(t.path / "x" / "y")
    write(t.path / "x" / "y" / "f", 1234)
    write(t.path / "g", 10)
    other = t.mount.mountpoint / "other"
    write(other / "h", 5000)
    t.settle()
    rows = json.loads(t.cli("du", str(t.mount.mountpoint), "--depth", "1", "--json").stdout)["directories"]
    by_path = {r["path"]: (r["size_bytes"], r["file_count"], r["dir_count"]) for r in rows}
    assert by_path == {"local:/": (1244, 2, 2), "other:/": (5000, 1, 0),
                       str(t.mount.mountpoint): (6244, 3, 4)}  # the two backend roots count as directories
    total = json.loads(t.cli("du", str(t.mount.mountpoint), "--json").stdout)["directories"]
    assert [(r["path"], r["size_bytes"]) for r in total] == [(str(t.mount.mountpoint), 6244)]
    # and `stat` of the mount root, as of any directory in it: the total of every backend
    wait_until(lambda: os.stat(t.mount.mountpoint).st_size == 6244, timeout=5, message="the root's size")
