#!/usr/bin/env python3
"""A bare pyfuse3 + trio passthrough filesystem: a BENCHMARK REFERENCE ONLY, not part of the product.

    python scripts/passthrough.py [--counts FILE] SOURCE MOUNTPOINT

mounts SOURCE at MOUNTPOINT and serves in the foreground until unmounted (`fusermount3 -u MOUNTPOINT`);
SIGTERM, SIGINT and SIGHUP unmount cleanly. `scripts/bench` runs its workloads through it to measure
the floor of any Python FUSE filesystem built like the Filestore mount: the same pyfuse3 + trio loop,
async handlers calling os functions directly on the trio thread (no threads), the same mount options
(default_permissions, allow_other as root), 1.0 s entry/attr timeouts, cached negative lookups,
keep_cache on open, no writeback cache -- and none of Filestore's own work (no database, no journal).

Like pyfuse3's examples/passthroughfs.py, inode numbers are the source's st_ino (the source's root is
ROOT_INODE), remembered while the kernel holds a lookup reference; each maps to its (parent inode, name)
links rather than full paths, so that renaming a directory is O(1) and a path is rebuilt from its
parents. readdir answers with attributes (readdirplus); its entry ids are positions in a sorted listing
taken at opendir.
Not supported: hard links (link), mknod, extended attributes, rename flags (EINVAL).

--counts FILE counts the FUSE requests that reach Python, per handler (pyfuse3's method names: lookup,
getattr, create, flush, release, forget, getxattr...; the unsupported ones too, which answer ENOSYS),
and writes them to FILE as JSON {"pid", "dumps", "requests": {name: count}}: once when serving starts
(dumps 0), then on every SIGUSR1 (dumps + 1), each time by an atomic rename. `scripts/bench` reads the
counts before and after each timed phase to set the passthrough's requests beside the mount's. Without
--counts nothing is counted. Requests libfuse answers itself (INIT, DESTROY, INTERRUPT, and opcodes
pyfuse3 does not handle, such as fallocate or lseek) are not seen.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import stat as stat_mod
import sys
from collections import Counter

import pyfuse3
import trio
from pyfuse3 import FUSEError

TIMEOUT = 1.0
ROOT = pyfuse3.ROOT_INODE
STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
               "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                  "f_namemax")


COUNTING = False          # set by --counts: REQUESTS[handler name] += 1 on every request
REQUESTS: dict[str, int] = {}  # a plain dict with every handler's name in it: the cheapest increment


def oserrors(fn):
    """OSError -> FUSEError(errno); anything else -> EIO (printed): a bug must not kill the mount.
    Counts the request first when COUNTING."""
    name = fn.__name__
    REQUESTS[name] = 0

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        if COUNTING:
            REQUESTS[name] += 1
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # noqa: BLE001
            print(f"passthrough: {fn.__name__}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise FUSEError(errno.EIO) from None
    return wrapper


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, source: str):
        super().__init__()
        self.source = os.fsencode(os.path.abspath(source))
        self.root_ino = os.lstat(self.source).st_ino
        self.links: dict[int, set[tuple[int, bytes]]] = {}       # inode -> its (parent inode, name) pairs
        self.lookups: Counter[int] = Counter()
        self.dirs: dict[int, tuple[int, list[bytes]]] = {}        # dir handle -> (inode, sorted names)
        self.next_dh = 1
        self.fd_ino: dict[int, int] = {}                            # open fd -> inode
        self.euid, self.egid = os.geteuid(), os.getegid()

    # -- inodes, paths, attributes ----------------------------------------------------
    def _path(self, inode: int) -> bytes:
        if inode == ROOT:
            return self.source
        links = self.links.get(inode)
        if not links:
            raise FUSEError(errno.ENOENT)
        parent, name = next(iter(links))
        return os.path.join(self._path(parent), name)

    def _join(self, parent_inode: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent_inode), name)

    def _ino(self, st) -> int:
        return ROOT if st.st_ino == self.root_ino else st.st_ino

    def _attrs(self, st) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._ino(st)
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        for name in STAT_FIELDS:
            setattr(attr, name, getattr(st, name))
        return attr

    def _remember(self, parent_inode: int, name: bytes, st) -> pyfuse3.EntryAttributes:
        """The entry for parent/name, counting the lookup reference the kernel takes with it."""
        ino = self._ino(st)
        if ino != ROOT:
            self.links.setdefault(ino, set()).add((parent_inode, name))
        self.lookups[ino] += 1
        return self._attrs(st)

    def _owned(self, path: bytes, ctx) -> None:
        """As root (allow_other), a new entry belongs to the caller, not to the server."""
        if (ctx.uid, ctx.gid) != (self.euid, self.egid):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    async def lookup(self, parent_inode, name, ctx=None):
        path = self._join(parent_inode, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            attr = pyfuse3.EntryAttributes()  # a negative entry the kernel may cache, as Filestore does
            attr.st_ino, attr.entry_timeout = 0, TIMEOUT
            return attr
        return self._remember(parent_inode, name, st)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            left = self.lookups[inode] - count
            if left > 0:
                self.lookups[inode] = left
            else:
                self.lookups.pop(inode, None)
                self.links.pop(inode, None)

    async def getattr(self, inode, ctx=None):
        try:
            return self._attrs(os.lstat(self._path(inode)))
        except (OSError, FUSEError):
            fd = next((fd for fd, ino in self.fd_ino.items() if ino == inode), None)
            if fd is None:
                raise
            return self._attrs(os.fstat(fd))  # unlinked while open

    async def setattr(self, inode, attr, fields, fh, ctx):
        target = fh if fh is not None else self._path(inode)
        nofollow = {} if fh is not None else {"follow_symlinks": False}
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode and (fh is not None or not stat_mod.S_ISLNK(os.lstat(target).st_mode)):
            os.chmod(target, stat_mod.S_IMODE(attr.st_mode))  # Linux has no lchmod: ignored on symlinks
        if fields.update_uid or fields.update_gid:
            os.chown(target, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, **nofollow)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(fh) if fh is not None else os.lstat(target)
            os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                 attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns), **nofollow)
        return await self.getattr(inode)

    async def readlink(self, inode, ctx):
        return os.readlink(self._path(inode))

    # -- directories ------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        dh, self.next_dh = self.next_dh, self.next_dh + 1
        self.dirs[dh] = (inode, sorted(os.listdir(self._path(inode))))
        return dh

    async def readdir(self, fh, start_id, token):
        inode, names = self.dirs[fh]
        path = self._path(inode)
        for index in range(start_id, len(names)):
            child = os.path.join(path, names[index])
            try:
                st = os.lstat(child)
            except FileNotFoundError:  # removed since opendir
                continue
            if not pyfuse3.readdir_reply(token, names[index], self._attrs(st), index + 1):
                return
            self._remember(inode, names[index], st)  # the kernel took a lookup reference (readdirplus)

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._join(parent_inode, name)
        os.mkdir(path, mode)
        self._owned(path, ctx)
        return self._remember(parent_inode, name, os.lstat(path))

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._join(parent_inode, name)
        os.symlink(target, path)
        self._owned(path, ctx)
        return self._remember(parent_inode, name, os.lstat(path))

    def _remove(self, parent_inode: int, name: bytes, remove) -> None:
        path = self._join(parent_inode, name)
        ino = self._ino(os.lstat(path))
        remove(path)
        self.links.get(ino, set()).discard((parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, os.rmdir)

    async def unlink(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, os.unlink)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)
        old, new = self._join(parent_inode_old, name_old), self._join(parent_inode_new, name_new)
        ino = self._ino(os.lstat(old))
        try:
            replaced = self._ino(os.lstat(new))
        except FileNotFoundError:
            replaced = None
        os.rename(old, new)
        if replaced == ino:  # two links to one inode: rename(2) does nothing
            return
        if replaced is not None:
            self.links.get(replaced, set()).discard((parent_inode_new, name_new))
        if ino in self.links:  # what lies below a directory follows through its parent links
            self.links[ino].discard((parent_inode_old, name_old))
            self.links[ino].add((parent_inode_new, name_new))

    # -- files ------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), flags & ~(os.O_CREAT | os.O_APPEND))  # writes come with offsets
        self.fd_ino[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._join(parent_inode, name)
        fd = os.open(path, (flags | os.O_CREAT) & ~os.O_APPEND, mode)
        try:
            self._owned(path, ctx)
            entry = self._remember(parent_inode, name, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        self.fd_ino[fd] = entry.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def release(self, fh):
        self.fd_ino.pop(fh, None)
        os.close(fh)

    async def statfs(self, ctx):
        st, out = os.statvfs(self.source), pyfuse3.StatvfsData()
        for name in STATVFS_FIELDS:
            setattr(out, name, getattr(st, name))
        return out


HANDLERS = ("lookup forget getattr setattr readlink opendir readdir releasedir mkdir symlink rmdir unlink "
            "rename open create read write flush fsync release statfs").split()
# pyfuse3's defaults (ENOSYS), wrapped too so that they are counted: the kernel asks some of them once
UNSUPPORTED = ["access", "fsyncdir", "getxattr", "link", "listxattr", "mknod", "poll", "removexattr", "setxattr"]
for _name in HANDLERS + UNSUPPORTED:
    setattr(Passthrough, _name, oserrors(getattr(Passthrough, _name)))


def dump_counts(path: str, dumps: int) -> None:
    """REQUESTS as JSON in path, replaced atomically (a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "dumps": dumps, "requests": {k: n for k, n in REQUESTS.items() if n}}, f)
    os.replace(tmp, path)


async def _main(counts_path: str | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, counts_path)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _on_signals(counts_path: str | None) -> None:
    """SIGTERM/SIGINT/SIGHUP: unmount. SIGUSR1 (with --counts): write the counts."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*stops, *([signal.SIGUSR1] if counts_path else [])) as signals:
        dumps = 0
        if counts_path:
            dump_counts(counts_path, dumps)  # the first file also says that SIGUSR1 is handled now
        async for signum in signals:
            if signum in stops:
                pyfuse3.terminate()
                return
            dumps += 1
            dump_counts(counts_path, dumps)


def main(argv: list[str]) -> int:
    global COUNTING
    counts_path = None
    if argv[:1] == ["--counts"] and len(argv) >= 2:
        counts_path, argv = os.path.abspath(argv[1]), argv[2:]
    if len(argv) != 2:
        print("usage: passthrough.py [--counts FILE] SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    source, mountpoint = argv
    COUNTING = counts_path is not None
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(Passthrough(source), mountpoint, options)
    try:
        trio.run(_main, counts_path)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
