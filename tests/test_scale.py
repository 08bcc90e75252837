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
    # Unbounded, a walk takes the mount to about 250 MiB (1 KB a node); this budget holds about
    # 80,000 nodes besides what the process holds before, so the walk must drop and reload.
    budget = 160 << 20
    mount = Mount(dict(env, FILESTORE_NAMESPACE_MEMORY="160MiB"), tmp_path / "mnt",
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
        # The budget is the mount's whole resident memory (what Python's allocator keeps of freed
        # nodes included), as an operator reads it in top.
        assert first < budget and second < budget, (before, first, second)
    finally:
        mount.stop()
    assert_consistent(db, "big", root)


# -- loading a directory costs what it holds, not what the database holds (issue 17, flat costs) --

class RecordingDatabase:
    """A core Database whose queries are recorded, to be EXPLAINed afterwards."""

    def __init__(self, url: str):
        from core.storage.db import Database

        self.inner = Database(url)
        self.seen: list[tuple[str, object]] = []

    def query(self, sql, params=None):
        self.seen.append((sql, params))
        return self.inner.query(sql, params)

    def close(self) -> None:
        self.inner.close()


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def scans_of_everything(db, sql: str, params) -> list[str]:
    """The plan's steps that read a table of the tree whole (a sequential scan of nodes or
    entries) or walk one of their indexes past many rows it then drops."""
    plan = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0][0]["Plan"]
    bad = []
    for step in plan_nodes(plan):
        loops = step.get("Actual Loops", 1)
        removed = step.get("Rows Removed by Filter", 0) * loops
        if step.get("Relation Name") in ("nodes", "entries") and step["Node Type"] == "Seq Scan" and loops:
            bad.append(f"Seq Scan on {step['Relation Name']} ({step.get('Actual Rows')} rows x {loops})")
        elif removed > 2000:
            bad.append(f"{step['Node Type']} on {step.get('Relation Name')} dropping {removed} rows")
    return bad


def test_loading_a_directory_reads_its_own_rows_not_the_whole_tree(tmp_path, env, db, database_url):
    """In a database of 40,000 nodes, a 1,000-entry directory and a directory of 20
    directories (of 10 files each): their listings (what a mount loads on first use) and a
    directory's own node (its link count counts its subdirectories) read their own rows through
    indexes, entry by entry; the backend root's listing reads its directories' subdirectories, not
    the files below them (a mount loads it before serving: 8.1 s at 1M nodes before). Before, PostgreSQL read every node of the database for a listing
    (a hash join over a sequential scan) and for each directory's link count, so both grew
    with the whole tree (issue 17)."""
    from core.storage import store

    root = tmp_path / "tree"
    for d in range(40):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(1000):
            (sub / f"f{f}").touch()
    for d in range(20):
        sub = root / "small" / f"s{d:02}"
        sub.mkdir(parents=True)
        for f in range(10):
            (sub / f"f{f}").touch()
    run_cli(env, "backend", "add", "tree", str(root), timeout=600)
    db.execute("ANALYZE filestore.nodes")
    db.execute("ANALYZE filestore.entries")
    top = db.execute("SELECT root_node_id FROM filestore.backend_mounts WHERE name = 'tree'").fetchone()[0]
    d07, small = (db.execute("SELECT node_id FROM filestore.entries WHERE parent_id = %s AND name = %s",
                             (top, name)).fetchone()[0] for name in (b"d07", b"small"))
    recording = RecordingDatabase(database_url)
    try:
        listing = store.load_listing(recording, d07)
        assert sorted(name for _, name, _ in listing) == sorted(f"f{f}".encode() for f in range(1000))
        assert [entry_id for entry_id, _, _ in listing] == sorted(entry_id for entry_id, _, _ in listing)
        subdirs = store.load_listing(recording, small)
        assert sorted((name, n.nlink) for _, name, n in subdirs) == [(f"s{d:02}".encode(), 2) for d in range(20)]
        assert store.load_node(recording, small).nlink == 22
        # The backend root, as a mount loads it before serving: its directories' link counts
        # read their subdirectories only, not the 40,000 files below them (entries.is_dir).
        top_listing = {name: n.nlink for _, name, n in store.load_listing(recording, top)}
        assert top_listing == {**{f"d{d:02}".encode(): 2 for d in range(40)}, b"small": 22}
        assert store.load_node(recording, top).nlink == 2 + 41
    finally:
        recording.close()
    bad = {sql[:60]: scans_of_everything(db, sql, params) for sql, params in recording.seen}
    assert not any(bad.values()), bad


def test_a_database_from_before_is_dir_learns_which_entries_name_directories(tmp_path, env, db):
    """Schema 13 added entries.is_dir: upgrading a schema 12 database (every entry false, as the
    column's default leaves it) marks the entries of directories, so link counts stay right."""
    from core.storage import schema, store
    from core.storage.db import Database

    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "c").mkdir()
    (root / "a" / "f").touch()
    run_cli(env, "backend", "add", "tree", str(root))
    db.execute("UPDATE filestore.entries SET is_dir = false")
    db.execute("DELETE FROM filestore.schema_versions WHERE version >= 13")
    schema.apply(db)
    marked = db.execute("""SELECT count(*) FILTER (WHERE e.is_dir), count(*) FILTER (WHERE e.is_dir <> (n.kind = 'dir'))
        FROM filestore.entries e JOIN filestore.nodes n ON n.id = e.node_id""").fetchone()
    assert marked == (3, 0)
    a = db.execute("SELECT node_id FROM filestore.entries WHERE name = 'a'::bytea").fetchone()[0]
    loaded = Database(env["DATABASE_URL"])
    try:
        assert store.load_node(loaded, a).nlink == 4
    finally:
        loaded.close()
