"""Inline mode: the mount process runs the sidecar's loops itself, and shows what they heal.

Started from `fsmount.mount.serve` once trio runs (its token is needed), stopped after the
session ends. Reconcile jobs run on worker threads; what one changed is applied to the
namespace on the trio thread (handlers read it there without locks), then the kernel's
caches are invalidated from the worker thread: pyfuse3 forbids invalidate_entry from inside a
request handler (deadlock), and a worker thread is not one. The watchers watch backend roots,
never the mountpoint, so the serving process never calls into its own mount.
"""
from __future__ import annotations

import logging
import os

import pyfuse3
import trio

from core.observe import health, registry
from core.repair.inflight import InProcess
from core.repair.reconcile import Applied, differs
from core.repair.sidecar import Context, Loops
from core.service import Filestore, database_url
from core.storage.queue import JobQueue

log = logging.getLogger(__name__)


def loops_enabled(settings) -> bool:
    """Inline loops run when there is no Redis (so no separate sidecar is assumed), unless
    FILESTORE_INLINE_LOOPS=0 asks a mount to leave them to `filestore sidecar`."""
    return settings.redis_url == "inline" and os.environ.get("FILESTORE_INLINE_LOOPS", "1") != "0"


class Inline:
    def __init__(self, fs: Filestore, mountpoint: str, token: trio.lowlevel.TrioToken):
        self.fs = fs
        self.token = token
        self.loops: Loops | None = None
        self.server = None
        ctx = Context(fs.db, fs.settings, JobQueue(fs.db), lambda: dict(fs.ns.backends), "mount", fs.pipeline)
        if loops_enabled(fs.settings):
            self.loops = Loops(ctx, in_flight=InProcess(fs.intents), on_applied=self.show, known=self.known,
                               workers=1)
            self.loops.start()
            fs.backend_back.append(self._watch_again)
        port = health.port_from_env()
        if port is not None:
            self.server = health.HealthServer(
                port, database_url=database_url(fs.settings), redis_url=fs.settings.redis_url,
                backends=lambda: list(fs.ns.backends.values()),
                alive=self.loops.alive if self.loops else dict, queue_stats=ctx.queue.stats,
                unopened=lambda: dict(fs.unavailable))
        self.registration = registry.Registration(
            fs.db, "mount", str(fs.settings.home), mountpoint=mountpoint, info=lambda: {
                "backends": sorted(b.name for b in fs.ns.backends.values()),
                "inline_loops": self.loops is not None, "http_port": self.server.port if self.server else None,
                **ctx.stats})

    def _watch_again(self, backend) -> None:
        if self.loops is not None and self.loops.watchers is not None:
            self.loops.watchers.rewatch(backend)

    def known(self, backend, rel: bytes, st, contents: dict | None = None) -> bool:
        """Does the namespace already hold what the disk shows (`st`, or None: nothing there)?
        Read from a worker thread without the trio thread: only listings already loaded are used
        (no query, no lock); a miss or a difference just sends the job to the database comparison.
        A path gone from the disk is known when this mount removed it a moment ago and its
        listing no longer has it (`rm -r` through the mount: one event per entry, none worth a
        job); a reconciled change not shown yet is in the listing, so it is looked at.
        With `contents` (name -> Stat on the disk) a directory is known only if its loaded
        listing has the same names with the same attributes: what a job looking at it deep
        compares (a directory the watcher saw created, which it could not watch at once)."""
        ns = self.fs.ns
        if st is None and not self.fs.removed_here(backend.id, rel):
            return False
        node_id = backend.root_node_id
        for part in filter(None, rel.split(b"/")):
            listing = ns.listings.get(node_id)
            if listing is None:
                return False
            found = listing.by_name.get(part)
            if found is None:
                return st is None
            node_id = found[1]
        if st is None:
            return False
        node = ns.nodes.get(node_id)
        owns = backend.executor.owns_files
        if node is None or differs(node, st, owns):
            return False
        if contents is None:
            return True
        children = ns.listings.get(node_id)
        if children is None or children.by_name.keys() != contents.keys():
            return False
        for name, child_st in contents.items():
            found = children.by_name.get(name)  # (read while the trio thread may change it)
            child = ns.nodes.get(found[1]) if found is not None else None
            if child is None or differs(child, child_st, owns):
                return False
        return True

    def show(self, applied: Applied) -> None:
        """Make the mount show a reconciled change: namespace first, then the kernel's caches."""
        try:
            trio.from_thread.run_sync(self._apply, applied, trio_token=self.token)
        except trio.RunFinishedError:
            return  # unmounting: the next start reads the database
        for parent, name, node_id in applied.unlinks:
            pyfuse3.invalidate_entry_async(parent, name, deleted=node_id, ignore_enoent=True)
        for parent, name, _, _ in applied.links:
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)  # a cached negative entry
        for inode in {n.id for n in applied.puts} | {p for p, _, _ in applied.unlinks} | \
                {p for p, _, _, _ in applied.links}:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=False)
            except OSError:
                pass  # the kernel does not know this inode: nothing cached

    def _apply(self, applied: Applied) -> None:
        with self.fs.core_lock:
            self._apply_locked(applied)

    def _apply_locked(self, applied: Applied) -> None:
        ns = self.fs.ns
        for node in applied.puts:
            ns.put(node)
        for parent, name, node_id in applied.unlinks:
            ns.unlink(parent, name, node_id)
        for parent, name, entry_id, node in applied.links:
            ns.link(parent, name, entry_id, node)
            if node.is_dir:
                ns.forget_listing(node.id)  # a restored or moved-in directory has contents: load them

    def close(self) -> None:
        if self._watch_again in self.fs.backend_back:
            self.fs.backend_back.remove(self._watch_again)
        if self.loops is not None:
            self.loops.stop()
        if self.server is not None:
            self.server.close()
        self.registration.close()
