"""Two backends whose roots nest: what changes through one is in the other's nodes,
rollups and journal at once (a `mirror` command of actor `overlap`), in both directions."""
from __future__ import annotations

import json
import os

from test_rollups import disk_totals, du_json


def nest_inner_backend(tracked):
    """A backend `inner` on the outer backend's directory `sub` (holding old.txt, 10 bytes),
    mounted again: the mount paths of `sub` through the outer backend and through `inner`."""
    os.mkdir(tracked.path / "sub")
    (tracked.path / "sub" / "old.txt").write_bytes(b"o" * 10)
    inner_root = tracked.backend_root / "sub"
    tracked.cli("backend", "add", "inner", str(inner_root))
    tracked.backends["inner"] = inner_root
    tracked.restart()
    return tracked.path / "sub", tracked.mount.mountpoint / "inner"


def test_nested_backends_stay_consistent(tracked):
    outer, inner = nest_inner_backend(tracked)
    assert os.listdir(inner) == ["old.txt"]
    since = tracked.last_journal_id()

    (outer / "a.txt").write_bytes(b"a" * 100)  # through the outer backend
    assert (inner / "a.txt").read_bytes() == b"a" * 100
    (inner / "b.txt").write_bytes(b"b" * 7)  # through the inner one
    assert (outer / "b.txt").read_bytes() == b"b" * 7
    os.mkdir(inner / "d")
    os.rename(inner / "b.txt", inner / "d" / "b.txt")
    assert os.listdir(outer / "d") == ["b.txt"] and not (outer / "b.txt").exists()
    with open(outer / "a.txt", "ab") as f:
        f.write(b"more")
    assert os.stat(inner / "a.txt").st_size == 104
    os.unlink(outer / "old.txt")
    assert sorted(os.listdir(inner)) == ["a.txt", "d"]

    assert tracked.node("d/b.txt", backend="inner")["size"] == 7
    assert tracked.node("sub/a.txt")["size"] == tracked.node("a.txt", backend="inner")["size"] == 104
    mirrored = [r for r in tracked.journal(since) if r["command"] == "mirror"]
    assert mirrored and {r["actor"] for r in mirrored} == {"overlap"}
    assert {r["args"]["source_backend"] for r in mirrored} == {"local", "inner"}
    # both backends' rollups equal a count of the same disk
    assert du_json(tracked, "inner:/")[""] == disk_totals(tracked.backends["inner"])[""] == du_json(tracked, "local:/sub")["sub"]
    for name in ("local", "inner"):
        assert tracked.cli("rollups", "verify", f"{name}:/", check=False).returncode == 0
    assert json.loads(tracked.cli("stats", "inner", "--json").stdout)  # counters see the mirrored commands
