"""Rollup deltas of a command: what it changed, for the directories it changed.

Commands never update a rollup row, because every path's ancestors include the backend root
and writers would queue on its row. Instead each command appends deltas in its own
transaction: what changed, and the directories it changed as they were when the command ran
(`derive`, run before the command is recorded, against the tree as it was). The counting
rules are those of core.rollups.totals.
"""
from __future__ import annotations

from collections.abc import Iterable

from core.journal.records import Change
from core.model import Node
from core.storage import store
from core.storage.db import Database
from core.view.namespace import Namespace


def derive(ns: Namespace, changes: Iterable[Change]) -> None:
    """Fill each change's rollup deltas and directory moves from what it links, unlinks and
    resizes. Runs before the command's transaction, against the tree as it was before it."""
    seen: dict[int, Node] = {}  # node -> as left by an earlier change of the same command
    for change in changes:
        after = {n.id: n for n in change.new_nodes}
        after.update((n.id, n) for n, _ in change.updates)

        def before(node_id: int) -> Node | None:
            if node_id in seen:
                return seen[node_id]
            if node_id in {n.id for n in change.new_nodes}:
                return None
            return ns.node(node_id)

        unlinked = {n: p for p, _, n in change.unlinks}
        linked_dirs = {link[2] for link in change.links if _kind(after, before, link[2]) == "dir"}
        for parent, _, node_id in change.unlinks:
            old = before(node_id)
            if old.is_dir:
                if node_id in linked_dirs:
                    pass  # moved: counted from its link below
                elif _known_empty(ns, node_id):
                    change.add_delta(ancestors(ns, parent), 0, 0, -1)
                else:  # detached with whatever is below it (the reconciler's vanished directory)
                    change.add_move(node_id, ancestors(ns, parent), [])
            else:
                change.add_delta(ancestors(ns, parent), -old.size, -1, 0)
        for link in change.links:
            parent, node_id = link[0], link[2]
            new = after.get(node_id) or before(node_id)
            if new.is_dir:
                if node_id in unlinked:
                    change.add_move(node_id, ancestors(ns, unlinked[node_id]), ancestors(ns, parent))
                elif before(node_id) is None:  # a new directory: empty
                    change.add_delta(ancestors(ns, parent), 0, 0, 1)
                else:  # a known directory comes back with its subtree (reconciler, recovery)
                    change.add_move(node_id, [], ancestors(ns, parent))
            else:
                change.add_delta(ancestors(ns, parent), new.size, 1, 0)
        named = set(unlinked) | {link[2] for link in change.links}
        for node, _ in change.updates:
            if node.id in named or node.kind == "dir":
                continue
            old = before(node.id)
            if old is not None and node.size != old.size:
                for parent in parents(ns, node):
                    change.add_delta(ancestors(ns, parent), node.size - old.size, 0, 0)
        seen.update(after)


def _kind(after: dict[int, Node], before, node_id: int) -> str:
    node = after.get(node_id) or before(node_id)
    return node.kind


def _known_empty(ns, dir_id: int) -> bool:
    listing = getattr(ns, "listings", {}).get(dir_id)
    return listing is not None and not listing.by_name


class DbTree:
    """What `derive` (and adoption, core.journal.recovery) reads of the tree, from the database:
    for threads and processes without a namespace (the sidecar's reconciler, the committer
    resolving a conflict). Slower (a query per node and ancestor), always as committed."""

    def __init__(self, db: Database, backends: Iterable):
        self.db = db
        self.backend_roots = {b.root_node_id: b for b in backends}

    def node(self, node_id: int) -> Node:
        return store.load_node(self.db, node_id)

    def parent_of(self, node_id: int):
        return store.load_parent(self.db, node_id)

    def child(self, dir_id: int, name: bytes) -> Node | None:
        found = store.load_child(self.db, dir_id, name)
        return found[1] if found else None


def ancestors(ns: Namespace, dir_id: int) -> list[int]:
    """The directory and its ancestors up to its backend root, nearest first."""
    chain = [dir_id]
    current = dir_id
    while current not in ns.backend_roots:
        link = ns.parent_of(current)
        if link is None:  # detached (removed) directory: its totals reach nobody else
            break
        current = link[0]
        chain.append(current)
    return chain


def parents(ns: Namespace, node: Node) -> list[int]:
    """The directory of every name of a node (a hard-linked file counts once per name). The
    names the namespace knows come first: the database may not have the latest link or unlink
    committed yet; it is asked only when the namespace knows fewer names than the node has."""
    link = ns.parent_of(node.id)
    known = ([link] if link else []) + sorted(getattr(ns, "more_names", {}).get(node.id, ()))
    if len(known) >= node.nlink or not node.nlink > 1:
        return [parent for parent, _ in known]
    return store.load_parents(ns.db, node.id)
