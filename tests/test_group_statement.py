"""filestore.record_commands, the one statement of a group commit (docs/architecture.md D36, D59),
sent straight to a real PostgreSQL: its plans never read a table whole, however small the table
was when they were made, and a group's removals go set-based only when no name repeats."""
from __future__ import annotations

import uuid

import psycopg
import pytest
from conftest import run_cli

from core.journal.records import Change, Journal, Record, statement
from core.model import Node, Principal

WHO = Principal(0, 0, 1, "fuse")


class Tree:
    """Commands on one directory of a real backend, built as the mount builds them."""

    def __init__(self, conn: psycopg.Connection, backend_id: int, dir_id: int):
        self.conn, self.backend_id, self.dir_id = conn, backend_id, dir_id

    def ids(self, n: int) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT nextval('filestore.node_ids') FROM generate_series(1, %s)", (n,)).fetchall()]

    def create(self, node_id: int, name: str) -> tuple[Node, Record]:
        node = Node(node_id, self.backend_id, "file", 0, 0o644, 0, 0, 0, 1, 1, 1)
        change = Change(touches=[(self.dir_id, 1)])
        change.links.append((self.dir_id, name.encode(), node_id, None))
        change.insert(node, parent_id=self.dir_id, name=name)
        change.add_delta([self.dir_id], 0, 1, 0)
        return node, self._record("create", node_id, name, change)

    def write(self, node: Node, name: str, size: int) -> tuple[Node, Record]:
        after = node.changed(size=size, version=node.version + 1)
        change = Change()
        change.update(after, node.version)
        change.add_delta([self.dir_id], size - node.size, 0, 0)
        return after, self._record("write", node.id, name, change)

    def unlink(self, node: Node, name: str) -> Record:
        after = node.changed(nlink=0, ctime_ns=2, version=node.version + 1, state="DELETED")
        change = Change(unlinks=[(self.dir_id, name.encode(), node.id)], touches=[(self.dir_id, 2)])
        change.update(after, node.version, parent_id=self.dir_id, name=name, removed_entry=True)
        change.add_delta([self.dir_id], -node.size, -1, 0)
        return self._record("unlink", node.id, name, change)

    def _record(self, command: str, node_id: int, name: str, change: Change) -> Record:
        return Record(Journal(command, "committed", WHO, uuid.uuid4(), self.backend_id, node_id, name,
                              {"parent_id": self.dir_id, "name": name}), change)

    def commit(self, records: list[Record]) -> None:
        self.conn.execute(*statement([r.payload() for r in records])).fetchall()

    def names(self) -> dict[str, int]:
        return {bytes(name).decode(): node for name, node in self.conn.execute(
            "SELECT name, node_id FROM filestore.entries WHERE parent_id = %s", (self.dir_id,)).fetchall()}


@pytest.fixture
def tree(tmp_path, env, database_url):
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    with psycopg.connect(database_url, autocommit=True) as conn:
        backend_id, dir_id = conn.execute(
            "SELECT id, root_node_id FROM filestore.backend_mounts WHERE name = 'local'").fetchone()
        yield Tree(conn, backend_id, dir_id)


def _scans(conn: psycopg.Connection, table: str) -> tuple[int, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables"
                        " WHERE schemaname = 'filestore' AND relname = %s", (table,)).fetchone()


def test_groups_read_no_table_whole_although_planned_on_an_empty_one(tree, database_url):
    """The committer's connection plans the statement at its first groups, on a new database;
    those plans stay while the tables grow. Before schema 14 a group of writes read the whole
    nodes table (a hash join over a sequential scan: PostgreSQL guesses 100 rows for the
    payload), and so did every group's directory times."""
    def burst(count: int, group: int) -> list[tuple[Node, str]]:
        made, records = [], []
        for node_id in tree.ids(count):
            name = f"f{node_id}"
            node, create = tree.create(node_id, name)
            node, write = tree.write(node, name, 4096)
            made.append((node, name))
            records += [create, write]
        for i in range(0, len(records), 2 * group):
            tree.commit(records[i:i + 2 * group])
        return made

    burst(12, 2)  # the plans are made here, on an empty table, and kept
    made = burst(3000, 500)
    with psycopg.connect(database_url, autocommit=True) as observer:
        tree.conn.execute("SELECT pg_stat_force_next_flush()")
        tree.conn.execute("SELECT 1")
        nodes_before, entries_before = _scans(observer, "nodes"), _scans(observer, "entries")
        burst(200, 10)  # creates and writes
        for i in range(0, 200, 20):  # removals
            tree.commit([tree.unlink(node, name) for node, name in made[i:i + 20]])
        tree.conn.execute("SELECT pg_stat_force_next_flush()")
        tree.conn.execute("SELECT 1")
        nodes_after, entries_after = _scans(observer, "nodes"), _scans(observer, "entries")
    assert nodes_after[0] == nodes_before[0], "a group read filestore.nodes whole"
    assert entries_after[0] == entries_before[0], "a group read filestore.entries whole"
    assert nodes_after[1] > nodes_before[1]  # the groups did reach the table, by its index
    assert len(tree.names()) == 3012 + 200 - 200


def test_removals_of_distinct_names_go_in_one_statement_and_a_repeated_name_keeps_order(tree):
    (a, create_a), (b, create_b), (c, create_c) = (tree.create(i, f"n{k}") for k, i in enumerate(tree.ids(3)))
    tree.commit([create_a, create_b, create_c])
    # n0 removed and created again in one group: the removal must come first.
    again_id, gone_id = tree.ids(2)
    again, create_again = tree.create(again_id, "n0")
    gone, create_gone = tree.create(gone_id, "tmp")
    tree.commit([tree.unlink(a, "n0"), create_again, tree.unlink(b, "n1"), create_gone, tree.unlink(gone, "tmp")])
    assert tree.names() == {"n0": again_id, "n2": c.id}
    # Distinct names only: one statement for the group's removals.
    tree.commit([tree.unlink(again, "n0"), tree.unlink(c, "n2")])
    assert tree.names() == {}
    states = dict(tree.conn.execute("SELECT id, state FROM filestore.nodes WHERE id = ANY(%s)",
                                    ([a.id, b.id, c.id, again_id, gone_id],)).fetchall())
    assert set(states.values()) == {"DELETED"}


def test_a_removal_whose_entry_is_gone_refuses_the_whole_group(tree):
    """The set-based removal counts what it removed: an entry another writer took away since is
    a conflict (FS409, which the pipeline resolves entry by entry), and nothing of the group lands."""
    (a, create_a), (b, create_b) = (tree.create(i, f"m{k}") for k, i in enumerate(tree.ids(2)))
    tree.commit([create_a, create_b])
    tree.conn.execute("DELETE FROM filestore.entries WHERE parent_id = %s AND name = 'm1'", (tree.dir_id,))
    journal_rows = tree.conn.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()[0]
    with pytest.raises(psycopg.Error) as refused:
        tree.commit([tree.unlink(a, "m0"), tree.unlink(b, "m1")])
    assert refused.value.sqlstate == "FS409"
    assert tree.names() == {"m0": a.id}
    assert tree.conn.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()[0] == journal_rows
