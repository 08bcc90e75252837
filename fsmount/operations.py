"""The pyfuse3 Operations: every handler makes one call into core and translates the answer.

Handlers run on the trio thread and call core synchronously, holding the core lock: commands
are answered before their commit (core.journal.pipeline), so no handler waits for the database.
What must wait runs off the serving thread: fsync and O_SYNC writes wait for their group commit,
a change waits while the journal's backlog is at its bound, a close uploads to S3 (write-through).
Nothing may escape a handler: `FsError` becomes its errno, anything else is logged with its
traceback, counted and answered with EIO. docs/concurrency.md lists the threads and locks.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import stat as stat_mod
import threading
import time
from collections import Counter

import pyfuse3
import trio
from pyfuse3 import FUSEError

from core.errors import FsError
from core.model import ROOT_INODE, Node, Principal
from core.observe import metrics
from core.service import Filestore
from core.view.cache import Invalidation

log = logging.getLogger(__name__)

ATTR_TIMEOUT = float(os.environ.get("FILESTORE_ATTR_TIMEOUT", "1.0"))
NAME_MAX = 255
INVALIDATION_BATCH_SECONDS = 0.02
KINDS = {stat_mod.S_IFIFO: "fifo", stat_mod.S_IFSOCK: "socket", stat_mod.S_IFCHR: "chardev",
         stat_mod.S_IFBLK: "blockdev", stat_mod.S_IFREG: "file"}
RENAME_NOREPLACE = getattr(pyfuse3, "RENAME_NOREPLACE", 1)
RENAME_EXCHANGE = getattr(pyfuse3, "RENAME_EXCHANGE", 2)
OPCODES = ("lookup", "forget", "getattr", "setattr", "readlink", "opendir", "readdir", "releasedir", "fsyncdir",
           "mkdir", "rmdir", "unlink", "symlink", "mknod", "link", "rename", "open", "create", "read", "write",
           "flush", "fsync", "release", "setxattr", "getxattr", "listxattr", "removexattr", "statfs")
REQUESTS = {op: metrics.FUSE_REQUESTS.labels(op) for op in OPCODES}  # bound once: .inc() is the hot path
# Requests waiting off the serving thread at once: for the journal (fsync, a full backlog) or
# for S3 (an upload at close).
WAITERS = trio.CapacityLimiter(int(os.environ.get("FILESTORE_WAITING_THREADS", "16")))


def _answer(op: str, exc: BaseException) -> FUSEError:
    """What the kernel is told of a failure: nothing may escape a handler."""
    if isinstance(exc, FUSEError):
        return exc
    if isinstance(exc, FsError):
        return FUSEError(exc.errno)
    if isinstance(exc, OSError):
        # A descriptor-level failure (pread/pwrite on the backend file): report it as is.
        return FUSEError(exc.errno or errno.EIO)
    log.error("unexpected failure in %s", op, exc_info=exc)
    metrics.FUSE_ERRORS.labels(op).inc()
    return FUSEError(errno.EIO)


def handler(fn):
    """Run on the serving thread, holding the core lock (docs/concurrency.md). A request
    handler counts its requests by opcode; a helper (`_name`) is part of one that does."""
    op = fn.__name__
    requests = REQUESTS[op] if not op.startswith("_") else None

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        if requests is not None:
            requests.inc()
        try:
            with self.fs.core_lock:
                return fn(self, *args, **kwargs)
        except Exception as exc:
            raise _answer(op, exc) from None
    return wrapper


def changing(fn):
    """A handler whose command goes to the journal: while the backlog is at its bound
    (PostgreSQL slow or away) it waits, off the serving thread, then answers EIO after
    FILESTORE_COMMIT_WAIT_SECONDS (core.journal.pipeline); reads go on meanwhile."""
    op = fn.__name__
    locked = handler(fn)

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        if not self.fs.pipeline.room():
            await self._wait_for_room(op)
        return await locked(self, *args, **kwargs)
    return wrapper


def blocking(fn):
    """Run on a worker thread holding the core lock: a request that waits for something
    remote (an S3 upload at close) must not stop the serving thread's own loop."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        def run():
            with self.fs.core_lock:
                return fn(self, *args)
        try:
            return await trio.to_thread.run_sync(run, limiter=WAITERS)
        except Exception as exc:
            raise _answer(op, exc) from None
    return wrapper


def principal(ctx) -> Principal:
    return Principal(ctx.uid, ctx.gid, ctx.pid, "fuse")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: Filestore):
        super().__init__()
        self.fs = fs
        self.ns = fs.ns
        self.files = fs.files
        self.lookups: Counter[int] = Counter()
        self.recursive_dir_sizes = fs.settings.recursive_dir_sizes
        self.access = fs.access  # policies (D42): `enforcing` is the one test while there are none
        self.xattrs = fs.serves_xattrs  # decided once: the kernel remembers an ENOSYS for the mount's life
        fs.cache.subscribe(self._caches_changed)
        self._to_invalidate: queue.SimpleQueue[Invalidation] = queue.SimpleQueue()
        threading.Thread(target=self._invalidate_for_core, name="kernel-invalidations", daemon=True).start()
        fs.kernel_invalidate = self._to_invalidate.put
        self._started_ns = time.time_ns()

    # -- attributes -------------------------------------------------------------------
    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.id
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = node.st_mode
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = node.rdev
        size, mtime, ctime = node.size, node.mtime_ns, node.ctime_ns
        if node.kind == "file":
            live = self.files.live_stat(node.id)
            if live is not None:
                size, mtime, ctime = live.size, live.mtime_ns, live.ctime_ns
        elif node.is_dir:
            # The recursive size from the rollup; st_blocks stays a plain directory's, so that
            # `du` through the mount adds up the files once instead of counting them twice.
            size = 4096
            if self.recursive_dir_sizes:
                totals = self.fs.rollups.get(node.backend_id, node.id)
                if totals is not None:
                    size = totals.size_bytes
                    if size < 0:
                        # A total below zero is wrong (counted against a stale view), and the
                        # kernel takes a negative size as a corrupt inode: it marks the
                        # directory bad and answers EIO to everything under it until unmount.
                        log.warning("directory %d: rollup size %d below zero; serving 0", node.id, size)
                        size = 0
        attr.st_size = size
        attr.st_blksize = 4096
        attr.st_blocks = (size + 511) // 512 if node.kind == "file" else (8 if node.is_dir else 0)
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = mtime
        attr.st_ctime_ns = ctime
        return attr

    def _caches_changed(self, change: Invalidation) -> None:
        """Make the kernel ask again for what changed: new rollups (folded here or elsewhere:
        attributes only), or nodes and directories another mount changed (attributes, and the
        cached pages or listing). Runs on the folder's or the channel listener's thread, never
        on the serving thread: an invalidation can wait for a request the kernel has queued."""
        if change.everything:
            targets = [(inode, False) for inode in list(self.lookups)]
        else:
            # A fold here moves no exact total (this mount serves them with its own changes in
            # already): the kernel's attributes stay; another process's new totals show within
            # the attribute timeout, or at once when announced from elsewhere.
            folded_here = change.folded and not change.remote
            targets = [(d, True) for d in change.rollups if self.recursive_dir_sizes and not folded_here]
            targets += [(n, False) for n in (*change.nodes, *change.dirs)]
        for inode, attr_only in targets:
            if inode in self.lookups:
                try:
                    pyfuse3.invalidate_inode(inode, attr_only=attr_only)
                except Exception:  # unknown to the kernel by now, or not mounted yet
                    pass
        for parent, name, node_id in change.deleted:  # a watch on the file here sees it go (IN_DELETE_SELF)
            if parent in self.lookups or parent == ROOT_INODE:
                try:
                    pyfuse3.invalidate_entry(parent, name, deleted=node_id)
                except Exception:  # the name is another inode here by now, or unknown: dropped below
                    pass
        for parent, name in change.names:  # a removed name must not stay cached, nor an added one stay absent
            if parent in self.lookups or parent == ROOT_INODE:
                try:
                    pyfuse3.invalidate_entry(parent, name)
                except Exception:
                    pass

    def _invalidate_for_core(self) -> None:
        """Inodes core changed behind the kernel's back (adopted from the disk), and directory
        sizes this mount's commands moved: the kernel drops what it holds of them, from this
        thread of its own. A directory's size is invalidated at most once per
        INVALIDATION_BATCH_SECONDS (each invalidation costs a GETATTR; the fold that follows
        invalidates it again), names and nodes every time."""
        recent: dict[int, float] = {}
        while True:
            change = self._to_invalidate.get()
            now = time.monotonic()
            fresh = [d for d in change.rollups if now - recent.get(d, 0.0) >= INVALIDATION_BATCH_SECONDS]
            for d in fresh:
                recent[d] = now
            if len(recent) > 100_000:
                recent.clear()
            change.rollups = fresh
            self._caches_changed(change)

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ROOT_INODE
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = stat_mod.S_IFDIR | 0o755
        attr.st_nlink = 2 + len(self.ns.backends)
        attr.st_uid = attr.st_gid = 0
        attr.st_size = self._all_backends_size() if self.recursive_dir_sizes else 4096
        attr.st_blksize = 4096
        attr.st_blocks = 8
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._started_ns
        return attr

    def _all_backends_size(self) -> int:
        """The mount root's size: every backend's recursive total, local and S3 together (as
        `filestore du MOUNTPOINT` adds them up); a backend down or not folded yet counts 0."""
        size = 0
        for backend in list(self.ns.backends.values()):
            try:
                totals = self.fs.rollups.get(backend.id, backend.root_node_id)
            except Exception:  # noqa: BLE001 - one backend's totals away must not fail the root's stat
                continue
            if totals is not None:
                size += max(totals.size_bytes, 0)
        return size

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        self.lookups[node.id] += 1
        return self._attrs(node)

    # -- lookups ----------------------------------------------------------------------
    @handler
    def lookup(self, parent_inode, name, ctx=None):
        if len(name) > NAME_MAX:  # the kernel lets FUSE names up to 1,024 bytes through
            raise FUSEError(errno.ENAMETOOLONG)
        if self.access.enforcing and ctx is not None:
            self.access.check(principal(ctx), "lookup", "read", parent_inode, name)
        if parent_inode == ROOT_INODE:
            backend = self.ns.backend_by_name(name)
            if backend is None:
                raise FUSEError(errno.ENOENT)
            return self._entry(self.ns.node(backend.root_node_id))
        self.ns.dir(parent_inode)
        node = self.ns.child(parent_inode, name)
        if node is None:
            return self._absent()
        return self._entry(node)

    @staticmethod
    def _absent() -> pyfuse3.EntryAttributes:
        """A negative entry the kernel may cache: tools look a name up before creating it,
        often twice, and every change of the name goes through this mount."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = ATTR_TIMEOUT
        return attr

    @handler
    def forget(self, inode_list):
        for inode, count in inode_list:
            left = self.lookups[inode] - count
            if left > 0:
                self.lookups[inode] = left
            else:
                self.lookups.pop(inode, None)
                self.files.forget(inode)

    @handler
    def getattr(self, inode, ctx=None):
        return self._attrs_of(inode)

    def _attrs_of(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attrs()
        return self._attrs(self.ns.node(inode))

    @changing
    def setattr(self, inode, attr, fields, fh, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "setattr", "write", inode)
        size = attr.st_size if fields.update_size else None
        if size is not None and self.files.truncate_open(inode, size, fh):
            size = None
        changes = dict(
            mode=stat_mod.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if any(v is not None for v in changes.values()):
            absorbed = size is None and self.files.absorb_attrs(
                inode, **{k: v for k, v in changes.items() if k != "size"})
            if not absorbed:
                self.fs.orch.setattr(principal(ctx), inode, **changes)
        return self._attrs_of(inode)

    @handler
    def readlink(self, inode, ctx):
        node = self.ns.node(inode)
        if node.kind != "symlink":
            raise FUSEError(errno.EINVAL)
        return node.target

    # -- directories ------------------------------------------------------------------
    @handler
    def opendir(self, inode, ctx):
        if inode != ROOT_INODE:
            if self.access.enforcing:
                self.access.check(principal(ctx), "readdir", "read", inode)
            self.ns.dir(inode)
        return inode

    @handler
    def readdir(self, fh, start_id, token):
        if fh == ROOT_INODE:
            backends = sorted(self.ns.backends.values(), key=lambda b: b.name)
            for index, backend in enumerate(backends[start_id:], start=start_id + 1):
                node = self.ns.node(backend.root_node_id)
                if not pyfuse3.readdir_reply(token, backend.name.encode(), self._attrs(node), index):
                    return
                self.lookups[node.id] += 1
            return
        listing = self.ns.listing(fh)
        for entry_id, name in listing.after(start_id):
            found = listing.by_name.get(name)
            if found is None:
                continue
            node = self.ns.node(found[1])  # dropped by another process's announcement: reloaded
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), entry_id):
                return
            self.lookups[node.id] += 1

    @handler
    def releasedir(self, fh):
        return None

    async def fsyncdir(self, fh, datasync):
        """A directory's entries durable: everything answered so far committed, WAL flushed."""
        REQUESTS["fsyncdir"].inc()
        await self._durable("fsyncdir")

    @changing
    def mkdir(self, parent_inode, name, mode, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "mkdir", "write", parent_inode, name)
        return self._entry(self.fs.orch.mkdir(principal(ctx), parent_inode, name, mode))

    @changing
    def rmdir(self, parent_inode, name, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "rmdir", "delete", parent_inode, name)
        self.fs.orch.rmdir(principal(ctx), parent_inode, name)

    @changing
    def unlink(self, parent_inode, name, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "unlink", "delete", parent_inode, name)
        self.fs.orch.unlink(principal(ctx), parent_inode, name)

    @changing
    def symlink(self, parent_inode, name, target, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "symlink", "write", parent_inode, name)
        return self._entry(self.fs.orch.symlink(principal(ctx), parent_inode, name, target))

    @changing
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "mknod", "write", parent_inode, name)
        kind = KINDS.get(stat_mod.S_IFMT(mode))
        if kind is None:
            raise FUSEError(errno.EINVAL)
        return self._entry(self.fs.orch.mknod(principal(ctx), parent_inode, name, kind,
                                              stat_mod.S_IMODE(mode), rdev))

    @changing
    def link(self, inode, new_parent_inode, new_name, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "link", "write", new_parent_inode, new_name)
        return self._entry(self.fs.orch.link(principal(ctx), inode, new_parent_inode, new_name))

    @changing
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if self.access.enforcing:
            self.access.check_rename(principal(ctx), parent_inode_old, name_old, parent_inode_new, name_new,
                                     bool(flags & RENAME_EXCHANGE))
        self.fs.orch.rename(principal(ctx), parent_inode_old, name_old, parent_inode_new, name_new,
                            noreplace=bool(flags & RENAME_NOREPLACE),
                            exchange=bool(flags & RENAME_EXCHANGE))

    # -- files ------------------------------------------------------------------------
    @handler
    def open(self, inode, flags, ctx):
        if self.access.enforcing:
            writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
            self.access.check(principal(ctx), "open", "write" if writes else "read", inode)
        handle = self.files.open(principal(ctx), inode, flags)
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @changing
    def create(self, parent_inode, name, mode, flags, ctx):
        if self.access.enforcing:
            self.access.check(principal(ctx), "create", "write", parent_inode, name)
        handle, node = self.files.create(principal(ctx), parent_inode, name, mode, flags)
        return pyfuse3.FileInfo(fh=handle, keep_cache=True), self._entry(node)

    @handler
    def read(self, fh, off, size):
        return self.files.read(fh, off, size)

    async def write(self, fh, off, buf):
        REQUESTS["write"].inc()
        written, durable = await self._write(fh, off, buf)
        if durable:  # O_SYNC, O_DSYNC: recorded at once, answered once committed
            await self._durable("write")
        return written

    @handler
    def _write(self, fh, off, buf):
        return self.files.write(fh, off, buf)

    async def flush(self, fh):
        """close(2): what changed is recorded and answered at once; its commit follows in the
        pipeline's next group. A close that uploads to S3 runs off the serving thread."""
        REQUESTS["flush"].inc()
        if not self.fs.pipeline.room() and await self._has_changes(fh):  # a reader's close never waits
            await self._wait_for_room("flush")
        if await self._flush_here(fh):
            await self._flush_slowly(fh)

    @handler
    def _has_changes(self, fh):
        return self.files.needs_commit(fh)

    @handler
    def _flush_here(self, fh):
        """Record what changed, here; True if it must wait for S3 (then off this thread)."""
        if not self.files.needs_commit(fh):
            return False
        if self.files.commits_slowly(fh):
            return True
        self.files.flush(fh)
        return False

    @blocking
    def _flush_slowly(self, fh):
        self.files.flush(fh)

    async def fsync(self, fh, datasync):
        """Data on disk and recorded (serving thread), then the commit and the WAL flush
        waited for off it: fsync means durable in the journal too."""
        REQUESTS["fsync"].inc()
        await self._fsync(fh, datasync)
        await self._durable("fsync")

    @handler
    def _fsync(self, fh, datasync):
        self.files.fsync(fh, datasync)

    async def _wait_for_room(self, op: str) -> None:
        try:
            await trio.to_thread.run_sync(self.fs.pipeline.wait_for_room, limiter=WAITERS)
        except Exception as exc:
            raise _answer(op, exc) from None

    async def _durable(self, op: str) -> None:
        try:
            await trio.to_thread.run_sync(self.fs.pipeline.sync, limiter=WAITERS)
        except Exception as exc:
            raise _answer(op, exc) from None

    @handler
    def release(self, fh):
        self.files.release(fh)

    # -- extended attributes ----------------------------------------------------------
    # pyfuse3 checks XATTR_CREATE and XATTR_REPLACE itself, through getxattr.
    @changing
    def setxattr(self, inode, name, value, ctx):
        self._xattrs_served()
        if inode != ROOT_INODE and not self.fs.keeps_xattrs(inode):
            raise FUSEError(errno.EOPNOTSUPP)
        if self.access.enforcing:
            self.access.check(principal(ctx), "setxattr", "write", inode)
        self.fs.orch.setxattr(principal(ctx), inode, name, value)

    @handler
    def getxattr(self, inode, name, ctx):
        self._xattrs_served()
        if self.access.enforcing and inode != ROOT_INODE:
            self.access.check(principal(ctx), "getxattr", "read", inode)
        return self.fs.getxattr(inode, name)

    @handler
    def listxattr(self, inode, ctx):
        self._xattrs_served()
        if self.access.enforcing and inode != ROOT_INODE:
            self.access.check(principal(ctx), "listxattr", "read", inode)
        return self.fs.listxattr(inode)

    @changing
    def removexattr(self, inode, name, ctx):
        self._xattrs_served()
        if inode != ROOT_INODE and not self.fs.keeps_xattrs(inode):
            raise FUSEError(errno.EOPNOTSUPP)
        if self.access.enforcing:
            self.access.check(principal(ctx), "removexattr", "write", inode)
        self.fs.orch.removexattr(principal(ctx), inode, name)

    def _xattrs_served(self) -> None:
        """ENOSYS when no backend keeps extended attributes: the kernel then never asks again,
        for any inode of this mount (docs/architecture.md D38)."""
        if not self.xattrs:
            raise FUSEError(errno.ENOSYS)

    # -- the filesystem ---------------------------------------------------------------
    @handler
    def statfs(self, ctx):
        """Capacity of the filesystems under the backends, each counted once."""
        out = pyfuse3.StatvfsData()
        seen = set()
        blocks = bfree = bavail = files = ffree = 0
        frsize = 4096
        for backend in self.ns.backends.values():
            st = backend.executor.statfs()
            key = (st.f_fsid, st.f_blocks)
            if key in seen:
                continue
            seen.add(key)
            blocks += st.f_blocks * st.f_frsize // frsize
            bfree += st.f_bfree * st.f_frsize // frsize
            bavail += st.f_bavail * st.f_frsize // frsize
            files += st.f_files
            ffree += st.f_ffree
        out.f_bsize = out.f_frsize = frsize
        out.f_blocks, out.f_bfree, out.f_bavail = blocks, bfree, bavail
        out.f_files, out.f_ffree, out.f_favail = files, ffree, ffree
        out.f_namemax = 255
        return out

