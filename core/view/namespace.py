"""The in-process view of the tree: nodes, names and complete directory listings.

A directory's listing is loaded whole on first use and then kept complete by the commands
this process runs, so lookups (including the negative lookup that precedes every create),
getattr and readdir are answered without a query. Changes made by other processes become
visible when their listings are dropped (issue 6 wires that to pub/sub invalidation).

Memory is bounded (issue 17): past a budget of nodes, the listings used least recently are
dropped with their entries' nodes, then the oldest nodes loaded alone; all are loaded again
from the database when needed. Nodes with changes not in the database yet (`held`) and the
backend roots stay.
"""
from __future__ import annotations

import bisect
import collections
import errno
import logging
import os
import threading
from collections.abc import Callable

from core.errors import FsError
from core.model import Backend, Node
from core.storage import store
from core.storage.db import Database

log = logging.getLogger(__name__)

# What one node costs the mount's memory, all included (its Node, its entry in a listing, its
# parent link, and what Python's allocator keeps of the nodes dropped), with a margin: measured
# 1.16 KiB a node at the peak of two walks of 1,000,000 files (scripts/bench_scale --walk-budget)
# and 1.24 KiB at 200,000 (tests/test_scale.py). The budget is the mount's resident memory, as
# top shows it: what the process held when the namespace was made comes off it first.
BYTES_PER_NODE = 1536
# The listings used last stay (a command in progress may hold them): up to this many, as long as
# they hold no more than a quarter of the budget's nodes, and at least RECENT_LISTINGS_MIN.
RECENT_LISTINGS_KEPT = 64
RECENT_LISTINGS_MIN = 8


def _rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")


class Listing:
    """One directory's entries: name -> (entry id, node id), plus an entry-id order for readdir."""

    __slots__ = ("by_name", "_order")

    def __init__(self) -> None:
        self.by_name: dict[bytes, tuple[int, int]] = {}
        self._order: list[tuple[int, bytes]] | None = None

    def add(self, entry_id: int, name: bytes, node_id: int) -> None:
        self.by_name[name] = (entry_id, node_id)
        if self._order is not None:
            if not self._order or self._order[-1][0] < entry_id:
                self._order.append((entry_id, name))
            else:
                self._order = None

    def remove(self, name: bytes) -> None:
        if self.by_name.pop(name, None) is not None:
            self._order = None

    def after(self, entry_id: int) -> list[tuple[int, bytes]]:
        """Entries with an id greater than entry_id, in id order (readdir's offsets)."""
        if self._order is None:
            self._order = sorted((eid, name) for name, (eid, _) in self.by_name.items())
        start = bisect.bisect_right(self._order, (entry_id, b"\xff" * 256))
        return self._order[start:]


class Namespace:
    def __init__(self, db: Database, *, memory: int = 512 << 20):
        self.db = db
        self.lock = threading.RLock()
        self.nodes: dict[int, Node] = {}
        # least recently used first (moved to the end when used)
        self.listings: collections.OrderedDict[int, Listing] = collections.OrderedDict()
        self.max_nodes = max((memory - _rss_bytes()) // BYTES_PER_NODE, 1000)
        # Set by the service: has this process changes of the node the database lacks? Kept.
        self.held: Callable[[int], bool] = lambda node_id: False
        # One name of each node: (parent, name); None for a node whose last name this process
        # removed (the database may not have the removal committed yet: never ask it then).
        self.parents: dict[int, tuple[int, bytes] | None] = {}
        # The other names of hard-linked nodes, as far as this process has seen them: when the
        # name in `parents` goes, another takes its place without asking the database (which
        # may not have the removal committed yet).
        self.more_names: dict[int, set[tuple[int, bytes]]] = {}
        self.backends: dict[int, Backend] = {}  # by id
        self.backend_roots: dict[int, Backend] = {}  # by root node id
        # Names this process holds that the database does not have yet (files created here,
        # recorded at their first close: core.commands.files), re-added whenever a listing is loaded.
        self.unrecorded: Callable[[int], list[tuple[int, bytes, Node]]] = lambda dir_id: []

    # -- backends ---------------------------------------------------------------------
    def set_backends(self, backends: list[Backend]) -> None:
        with self.lock:
            self.backends = {b.id: b for b in backends}
            self.backend_roots = {b.root_node_id: b for b in backends}

    def backend_by_name(self, name: bytes) -> Backend | None:
        for b in self.backends.values():
            if b.name.encode() == name:
                return b
        return None

    def backend_of(self, node: Node) -> Backend:
        try:
            return self.backends[node.backend_id]
        except KeyError:
            raise FsError(errno.ESTALE, "backend no longer mounted") from None

    # -- nodes ------------------------------------------------------------------------
    def node(self, node_id: int) -> Node:
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None:
                node = store.load_node(self.db, node_id)
                if node is None:
                    raise FsError(errno.ENOENT, f"no node {node_id}")
                self.nodes[node_id] = node
            return node

    def dir(self, node_id: int) -> Node:
        node = self.node(node_id)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def put(self, node: Node) -> None:
        with self.lock:
            self.nodes[node.id] = node

    def listing(self, dir_id: int) -> Listing:
        with self.lock:
            listing = self.listings.get(dir_id)
            if listing is not None:
                self.listings.move_to_end(dir_id)
                return listing
            listing = Listing()
            for entry_id, name, node in [*store.load_listing(self.db, dir_id), *self.unrecorded(dir_id)]:
                listing.add(entry_id, name, node.id)
                self.nodes.setdefault(node.id, node)
                self._name(node.id, dir_id, name)
            self.listings[dir_id] = listing
            if len(self.nodes) > self.max_nodes:
                self._evict(keep_dir=dir_id)
            return listing

    def _evict(self, *, keep_dir: int) -> None:
        """Down to 3/4 of the budget: the listings used least recently go with their entries'
        nodes, then (if that is not enough) the nodes loaded first. Never what `held` names,
        the backend roots, `keep_dir` (being answered from now) or the listings used last."""
        target = self.max_nodes * 3 // 4
        before = len(self.nodes)
        for dir_id in list(self.listings)[:-self._recent_kept()]:
            if len(self.nodes) <= target:
                break
            if dir_id == keep_dir or self.held(dir_id):
                continue
            listing = self.listings.pop(dir_id)
            for _, node_id in listing.by_name.values():
                self._drop(node_id)
        if len(self.nodes) > target:
            for node_id in list(self.nodes):
                if len(self.nodes) <= target:
                    break
                if node_id != keep_dir and node_id not in self.listings:
                    self._drop(node_id)
        log.debug("namespace: %d of %d nodes dropped (budget %d)", before - len(self.nodes), before, self.max_nodes)

    def _recent_kept(self) -> int:
        """How many of the listings used last eviction leaves alone (see RECENT_LISTINGS_KEPT)."""
        kept = held = 0
        for listing in reversed(self.listings.values()):
            held += len(listing.by_name)
            if kept >= RECENT_LISTINGS_KEPT or (kept >= RECENT_LISTINGS_MIN and held > self.max_nodes // 4):
                break
            kept += 1
        return max(kept, 1)

    def _drop(self, node_id: int) -> None:
        if node_id in self.backend_roots or self.held(node_id):
            return
        self.nodes.pop(node_id, None)
        self.parents.pop(node_id, None)
        self.more_names.pop(node_id, None)

    def child(self, dir_id: int, name: bytes) -> Node | None:
        found = self.listing(dir_id).by_name.get(name)
        return self.node(found[1]) if found else None  # a node dropped by an announcement reloads

    def parent_of(self, node_id: int) -> tuple[int, bytes] | None:
        with self.lock:
            if node_id in self.parents:
                return self.parents[node_id]
            found = store.load_parent(self.db, node_id)
            if found:
                self.parents[node_id] = found
            return found

    def path_of(self, node_id: int) -> tuple[Backend, bytes]:
        """The backend and the backend-relative path of one of the node's names."""
        parts: list[bytes] = []
        current = node_id
        for _ in range(4096):
            if current in self.backend_roots:
                return self.backend_roots[current], b"/".join(reversed(parts))
            link = self.parent_of(current)
            if link is None:
                raise FsError(errno.ENOENT, f"node {node_id} has no name")
            current, name = link
            parts.append(name)
        raise FsError(errno.ELOOP, "directory cycle")

    # -- changes applied as commands are answered -------------------------------------
    def link(self, parent_id: int, name: bytes, entry_id: int, node: Node, *, new_dir: bool = False) -> None:
        """A name added (or moved here). `new_dir`: a directory just made, whose listing is known
        to be empty; any other directory's listing is loaded when first needed."""
        with self.lock:
            self.nodes[node.id] = node
            listing = self.listings.get(parent_id)
            if listing is not None:
                listing.add(entry_id, name, node.id)
            self._name(node.id, parent_id, name)
            if new_dir:
                self.listings.setdefault(node.id, Listing())

    def unlink(self, parent_id: int, name: bytes, node_id: int) -> None:
        with self.lock:
            listing = self.listings.get(parent_id)
            if listing is not None:
                listing.remove(name)
            others = self.more_names.get(node_id)
            if others is not None:
                others.discard((parent_id, name))
            if self.parents.get(node_id) == (parent_id, name):
                if others:
                    self.parents[node_id] = others.pop()
                else:
                    node = self.nodes.get(node_id)
                    if node is not None and (node.is_dir or node.nlink <= 1):  # its last name: none now
                        self.parents[node_id] = None
                    else:
                        del self.parents[node_id]
            if others is not None and not others:
                del self.more_names[node_id]

    def _name(self, node_id: int, parent_id: int, name: bytes) -> None:
        known = self.parents.get(node_id)
        if known is None:  # unknown, or nameless until now (linked again)
            self.parents[node_id] = (parent_id, name)
        elif known != (parent_id, name):
            self.more_names.setdefault(node_id, set()).add((parent_id, name))

    def forget_listing(self, dir_id: int) -> None:
        with self.lock:
            self.listings.pop(dir_id, None)

    def forget(self, nodes: list[int], dirs: list[int], *, keep: Callable[[int], bool]) -> None:
        """Drop what another process changed; it is loaded again on next use. `keep` names
        nodes and directories this process has changes of that the database does not hold yet
        (answered, not committed; or open files not recorded): those stay."""
        with self.lock:
            for node_id in (*nodes, *dirs):
                if node_id not in self.backend_roots and not keep(node_id):
                    self.nodes.pop(node_id, None)
                    self.parents.pop(node_id, None)
                    self.more_names.pop(node_id, None)
            for dir_id in dirs:
                if not keep(dir_id):
                    self.listings.pop(dir_id, None)

    def forget_everything(self, *, keep: Callable[[int], bool]) -> None:
        with self.lock:
            self.nodes = {k: v for k, v in self.nodes.items() if keep(k) or k in self.backend_roots}
            self.listings = collections.OrderedDict((k, v) for k, v in self.listings.items() if keep(k))
            self.parents = {k: v for k, v in self.parents.items() if keep(k)}
            self.more_names = {k: v for k, v in self.more_names.items() if keep(k)}

