"""The local-disk executor.

Safety: every path is resolved beneath the backend root in the kernel with openat2
(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so neither `..` nor a symlink planted in the tree can
lead an operation outside the root; the last component is always acted on through its
parent's descriptor without following symlinks. Where openat2 is missing, the same walk is
done one component at a time with O_NOFOLLOW.

Staging: new files and whole rewrites are written to `<root>/.filestore.staging/<command id>`
(same filesystem, so landing is one atomic rename) and renamed over the final name when the
write command commits. Appends and in-place writes go to the file itself.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from contextlib import contextmanager

from .base import (
    TYPE_BITS,
    AlreadyExists,
    ExecutorError,
    InvalidArgument,
    NotFound,
    Stat,
    Unavailable,
    Unsupported,
    from_os_error,
    kind_of,
    validate_name,
)

STAGING_NAME = b".filestore.staging"
LIST_PAGE = 1000  # entries a page of listdir_pages

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share it
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_have_openat2 = True
# Declared once: ctypes converts undeclared arguments by inspecting them on every call, which
# on a file's landing (renameat2) cost as much as the system call.
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_libc.renameat2.restype = ctypes.c_int
_syscall_openat2 = _libc.syscall
_syscall_openat2.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_syscall_openat2.restype = ctypes.c_long


def _openat2(dir_fd: int, path: bytes, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall_openat2(_SYS_OPENAT2, dir_fd, path, ctypes.addressof(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _renameat2(src_fd: int, src: bytes, dst_fd: int, dst: bytes, flags: int) -> None:
    if _libc.renameat2(src_fd, src, dst_fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


@contextmanager
def _os_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc) from exc


def stat_from(st: os.stat_result, target: bytes | None = None) -> Stat:
    return Stat(
        kind=kind_of(st.st_mode), size=st.st_size, mode=stat_mod.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, rdev=st.st_rdev, atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, nlink=st.st_nlink, target=target,
        ino=st.st_ino,
    )


class LocalExecutor:
    """The Executor of a local directory (executors.base.Executor)."""

    kind = "local"
    in_place = True  # files are written through descriptors onto them (see core.commands.files)
    stamps_ctime = True
    moves_objects_one_by_one = False  # rename(2) moves a directory whole
    writes_back = False

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False):
        self.root = os.fsencode(os.path.abspath(root))
        try:
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_os_error(exc) from exc
        self.owns_files = os.geteuid() == 0  # only root can give files to their callers
        self._creator = (os.geteuid(), os.getegid())  # owner of what the daemon creates in the staging area
        self._staging_fd = -1  # a read-only backend never stages, and may live on a read-only disk
        if not read_only:
            with _os_errors():
                try:
                    os.mkdir(STAGING_NAME, 0o700, dir_fd=self._root_fd)
                except FileExistsError:
                    pass
                self._staging_fd = _openat2(self._root_fd, STAGING_NAME, os.O_PATH | os.O_DIRECTORY)

    def probe(self) -> None:
        """The root is still where it was registered, and is the directory this executor holds:
        a root renamed away, removed or unmounted is Unavailable (operations through the
        descriptor held would reach a directory that is not the backend any more). A directory
        there again (the same, or a new one: a disk mounted again) is opened again."""
        try:
            there = os.stat(self.root)
        except OSError as exc:
            raise Unavailable(f"root {os.fsdecode(self.root)}: {exc.strerror}") from exc
        if not stat_mod.S_ISDIR(there.st_mode):
            raise Unavailable(f"root {os.fsdecode(self.root)} is not a directory")
        held = os.fstat(self._root_fd)
        if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
            return
        # Another directory at the root's path. Taken for the backend only if it is on the same
        # file system, or carries the staging area every writable root was given when opened:
        # an empty mount point left by an unmounted disk is neither, and taking it would make
        # every file look deleted.
        if there.st_dev != held.st_dev and not self._has_staging():
            raise Unavailable(f"root {os.fsdecode(self.root)} is another directory now (not the"
                              f" backend's: an unmounted disk's mount point?)")
        self._reopen()

    def _has_staging(self) -> bool:
        if self._staging_fd < 0:
            return False
        try:
            return stat_mod.S_ISDIR(os.lstat(os.path.join(self.root, STAGING_NAME)).st_mode)
        except OSError:
            return False

    def _reopen(self) -> None:
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Unavailable(f"root {os.fsdecode(self.root)}: {exc.strerror}") from exc
        staging_fd = -1
        if self._staging_fd >= 0:
            try:
                try:
                    os.mkdir(STAGING_NAME, 0o700, dir_fd=root_fd)
                except FileExistsError:
                    pass
                staging_fd = _openat2(root_fd, STAGING_NAME, os.O_PATH | os.O_DIRECTORY)
            except OSError as exc:
                os.close(root_fd)
                raise Unavailable(f"root {os.fsdecode(self.root)}: staging area: {exc.strerror}") from exc
        old = (self._root_fd, self._staging_fd)
        self._root_fd, self._staging_fd = root_fd, staging_fd
        for fd in old:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        for fd in (self._staging_fd, self._root_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    # -- path resolution ---------------------------------------------------------------
    @contextmanager
    def _dir(self, rel: bytes) -> Iterator[int]:
        """An O_PATH descriptor of directory `rel` (b'' is the root), resolved beneath the root."""
        fd = self._resolve(rel, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _resolve(self, rel: bytes, flags: int) -> int:
        global _have_openat2
        rel = rel.strip(b"/")
        if not rel:
            return os.open(b".", flags | os.O_CLOEXEC, dir_fd=self._root_fd)
        if any(part in (b"..", b".", b"") for part in rel.split(b"/")):
            raise InvalidArgument(f"path component not allowed: {rel!r}")
        if rel.split(b"/", 1)[0] == STAGING_NAME:
            raise NotFound("staging area")
        with _os_errors():
            if _have_openat2:
                try:
                    return _openat2(self._root_fd, rel, flags)
                except OSError as exc:
                    if exc.errno != errno.ENOSYS:
                        raise
                    _have_openat2 = False
            return self._walk(rel, flags)

    def _walk(self, rel: bytes, flags: int) -> int:
        fd = os.open(b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root_fd)
        parts = rel.split(b"/")
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                want = (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC
                nxt = os.open(part, want, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _split(rel: bytes) -> tuple[bytes, bytes]:
        rel = rel.strip(b"/")
        parent, _, name = rel.rpartition(b"/")
        return parent, name

    # -- reading ----------------------------------------------------------------------
    def check_name(self, parent: bytes, name: bytes) -> None:
        """Every POSIX name fits a local directory (core checks length and bytes)."""

    def stat(self, rel: bytes) -> Stat:
        rel = rel.strip(b"/")
        if not rel:
            with _os_errors():
                return stat_from(os.stat(self._root_fd))
        parent, name = self._split(rel)
        with self._dir(parent) as pfd, _os_errors():
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=pfd) if stat_mod.S_ISLNK(st.st_mode) else None
            return stat_from(st, target)

    def listdir(self, rel: bytes) -> list[tuple[bytes, Stat]]:
        return [item for page in self.listdir_pages(rel) for item in page]

    def listdir_pages(self, rel: bytes, skip=None,
                      page_size: int = LIST_PAGE) -> Iterator[list[tuple[bytes, Stat]]]:
        """The entries of a directory, `page_size` names at a time from a scandir of its
        descriptor (executors.base.Executor.listdir_pages): the staging area and names gone
        before their stat are left out, as are those `skip` returns, before any stat."""
        with self._dir(rel) as pfd, _os_errors():
            dfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            try:
                with os.scandir(dfd) as it:  # reads the directory a buffer at a time
                    names: list[bytes] = []
                    for entry in it:
                        name = os.fsencode(entry.name)
                        if name == STAGING_NAME:  # ours, or a nested backend's: never part of the tree
                            continue
                        names.append(name)
                        if len(names) >= page_size:
                            yield self._stat_page(pfd, names, skip)
                            names = []
                    if names:
                        yield self._stat_page(pfd, names, skip)
            finally:
                os.close(dfd)

    @staticmethod
    def _stat_page(pfd: int, names: list[bytes], skip) -> list[tuple[bytes, Stat]]:
        leave = skip(names) if skip is not None else ()
        out = []
        for name in names:
            if name in leave:
                continue
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=pfd) if stat_mod.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:  # gone since the directory was read
                continue
            out.append((name, stat_from(st, target)))
        return out

    def count_tree(self, stop) -> int | None:
        """Every name below the root (not following symlinks, the staging area left out): a
        scandir walk, whose d_type spares a stat per entry (executors.base.Executor.count_tree)."""
        count, todo = 0, [self.root]
        while todo:
            if stop.is_set():
                return None
            try:
                with os.scandir(todo.pop()) as it:
                    for entry in it:
                        if entry.name == STAGING_NAME:
                            continue
                        count += 1
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                todo.append(entry.path)
                        except OSError:
                            pass
            except OSError:
                continue  # unreadable or gone: the import will say so
        return count

    def readlink(self, rel: bytes) -> bytes:
        parent, name = self._split(rel)
        with self._dir(parent) as pfd, _os_errors():
            return os.readlink(name, dir_fd=pfd)

    def open_file(self, rel: bytes, *, write: bool) -> int:
        """A descriptor for reading (and writing) an existing regular file, never a symlink."""
        # One openat2 beneath the root (no symlink in any component, the last included) rather
        # than the parent's descriptor, then the name, then a close: three system calls on
        # every open and on every unlink (which keeps a descriptor for a late reader, core).
        fd = self._resolve(rel, (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW)
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"not a regular file: {rel!r}")
        return fd

    def statfs(self) -> os.statvfs_result:
        with _os_errors():
            return os.statvfs(self._root_fd)

    # -- changing ---------------------------------------------------------------------
    def _own(self, name: bytes, dir_fd: int, uid: int, gid: int) -> None:
        if self.owns_files:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def mkdir(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat:
        validate_name(name)
        with self._dir(parent) as pfd, _os_errors():
            os.mkdir(name, mode, dir_fd=pfd)
            os.chmod(name, mode, dir_fd=pfd)  # not filtered by the daemon's umask
            self._own(name, pfd, uid, gid)
            return stat_from(os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def create_file(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat:
        """Create an empty regular file; fails with AlreadyExists if the name is taken."""
        validate_name(name)
        with self._dir(parent) as pfd, _os_errors():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=pfd)
            try:
                os.fchmod(fd, mode)
                if self.owns_files:
                    os.fchown(fd, uid, gid)
                return stat_from(os.fstat(fd))
            finally:
                os.close(fd)

    def symlink(self, parent: bytes, name: bytes, target: bytes, uid: int, gid: int) -> Stat:
        validate_name(name)
        with self._dir(parent) as pfd, _os_errors():
            os.symlink(target, name, dir_fd=pfd)
            self._own(name, pfd, uid, gid)
            return stat_from(os.stat(name, dir_fd=pfd, follow_symlinks=False), target)

    def mknod(self, parent: bytes, name: bytes, kind: str, mode: int, rdev: int, uid: int, gid: int) -> Stat:
        """A FIFO, socket, device or empty file, as mknod(2) makes it (devices need privilege)."""
        validate_name(name)
        with self._dir(parent) as pfd, _os_errors():
            os.mknod(name, TYPE_BITS[kind] | mode, rdev, dir_fd=pfd)
            os.chmod(name, mode, dir_fd=pfd)  # not filtered by the daemon's umask
            self._own(name, pfd, uid, gid)
            return stat_from(os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def link(self, src: bytes, parent: bytes, name: bytes) -> Stat:
        """A new name for an existing file; neither name is followed if it is a symlink."""
        validate_name(name)
        src_parent, src_name = self._split(src)
        with self._dir(src_parent) as sfd, self._dir(parent) as dfd, _os_errors():
            os.link(src_name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            return stat_from(os.stat(name, dir_fd=dfd, follow_symlinks=False))

    def unlink(self, parent: bytes, name: bytes) -> None:
        with self._dir(parent) as pfd, _os_errors():
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, parent: bytes, name: bytes) -> None:
        with self._dir(parent) as pfd, _os_errors():
            os.rmdir(name, dir_fd=pfd)

    def rename(self, src_parent: bytes, src_name: bytes, dst_parent: bytes, dst_name: bytes,
               *, noreplace: bool = False, exchange: bool = False) -> None:
        validate_name(dst_name)
        flags = (_RENAME_NOREPLACE if noreplace else 0) | (_RENAME_EXCHANGE if exchange else 0)
        with self._dir(src_parent) as sfd, self._dir(dst_parent) as dfd, _os_errors():
            if flags:
                _renameat2(sfd, src_name, dfd, dst_name, flags)
            else:
                os.rename(src_name, dst_name, src_dir_fd=sfd, dst_dir_fd=dfd)

    def check_size(self, size: int) -> None:
        """The disk decides (ftruncate answers EFBIG past the filesystem's limit)."""

    def set_attrs(self, rel: bytes, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None,
                  times_ns: tuple[int, int] | None = None, known: Stat | None = None) -> Stat:
        parent, name = self._split(rel)
        if not name:  # the backend root itself, reached through its trusted absolute path
            parent, name = b"", self.root
        with self._dir(parent) as pfd, _os_errors():
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            is_link = stat_mod.S_ISLNK(st.st_mode)
            if size is not None:
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            if (uid is not None or gid is not None) and self.owns_files:
                os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                         dir_fd=pfd, follow_symlinks=False)
            if mode is not None and not is_link:
                os.chmod(name, mode, dir_fd=pfd)
            if times_ns is not None:
                os.utime(name, ns=times_ns, dir_fd=pfd, follow_symlinks=False)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            return stat_from(st, os.readlink(name, dir_fd=pfd) if is_link else None)

    # -- extended attributes ------------------------------------------------------------
    def _magic_path(self, fd: int) -> str:
        # *xattr(2) take no dir_fd and refuse O_PATH descriptors; the /proc link of the
        # descriptor names the very inode that was resolved beneath the root.
        return f"/proc/self/fd/{fd}"

    def set_xattr(self, rel: bytes, name: bytes, value: bytes) -> Stat:
        """Set an extended attribute on a file or directory. Raises Unsupported or NoSpace
        when this disk cannot keep it (no user xattrs, or a value over its per-inode room)."""
        fd = self._resolve(rel, os.O_PATH)
        try:
            with _os_errors():
                try:
                    os.setxattr(self._magic_path(fd), name, value)
                except OSError as exc:
                    if exc.errno in (errno.E2BIG, errno.ERANGE):
                        raise OSError(errno.EOPNOTSUPP, f"this disk cannot keep {name!r}") from exc
                    raise
                return stat_from(os.stat(fd))
        finally:
            os.close(fd)

    def remove_xattr(self, rel: bytes, name: bytes) -> Stat:
        """Remove an extended attribute; one the disk never had is not an error."""
        fd = self._resolve(rel, os.O_PATH)
        try:
            with _os_errors():
                try:
                    os.removexattr(self._magic_path(fd), name)
                except OSError as exc:
                    if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                        raise
                return stat_from(os.stat(fd))
        finally:
            os.close(fd)

    def xattrs(self, rel: bytes) -> dict[bytes, bytes]:
        """The user.* extended attributes the disk keeps on a file or directory."""
        fd = self._resolve(rel, os.O_PATH)
        try:
            path = self._magic_path(fd)
            try:
                names = [n for n in os.listxattr(path) if n.startswith("user.")]
                return {os.fsencode(n): os.getxattr(path, n) for n in names}
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENODATA):
                    return {}
                raise from_os_error(exc) from exc
        finally:
            os.close(fd)

    def stat_node(self, rel: bytes) -> Stat:
        """Stat of the file or directory at rel (for a change kept in the database only)."""
        fd = self._resolve(rel, os.O_PATH)
        try:
            with _os_errors():
                return stat_from(os.stat(fd))
        finally:
            os.close(fd)

    def _carry_xattrs(self, staged: bytes, pfd: int, name: bytes) -> None:
        """A rewrite lands by rename over the old file: give the new inode its user xattrs."""
        old = f"/proc/self/fd/{pfd}/".encode() + name
        try:
            names = [n for n in os.listxattr(old, follow_symlinks=False) if n.startswith("user.")]
        except OSError:
            return  # no old file, or no xattrs on this disk
        target = f"/proc/self/fd/{self._staging_fd}/".encode() + staged
        for n in names:
            try:
                os.setxattr(target, n, os.getxattr(old, n, follow_symlinks=False))
            except OSError:
                pass  # best effort: the database holds them

    def finish_rename(self, src_rel: bytes, dst_rel: bytes) -> int:
        raise Unsupported("rename(2) is atomic here: nothing is ever left half done")

    def reader(self, rel: bytes, *, size: int, etag: str | None, cache_key: str | None):
        raise Unsupported("files are read through their descriptors (in_place)")

    # -- staging ----------------------------------------------------------------------
    def stage(self, staging_id: str, *, copy_of: bytes | None = None, copy_size: int | None = None,
              etag: str | None = None, copy_fd: int | None = None, whole: bool = False) -> int:
        """A new, empty staging file opened read-write; `staging_id` names it. (Changes to an
        existing file are written in place, so nothing is ever copied here: `copy_of` and
        `copy_fd` are for backends without `in_place`.)"""
        if copy_of is not None or copy_fd is not None:
            raise Unsupported("changes to an existing file are written in place")
        with _os_errors():
            return os.open(staging_id.encode(), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                           dir_fd=self._staging_fd)

    def land(self, staging_id: str, parent: bytes, name: bytes, *, mode: int, uid: int, gid: int,
             times_ns: tuple[int, int] | None, durable: bool, noreplace: bool = False) -> Stat:
        """Atomically put the staged file at `parent/name` with the node's metadata, replacing
        what is there, or with `noreplace` failing with AlreadyExists if the name is taken."""
        with self._dir(parent) as pfd, _os_errors():
            sname = staging_id.encode()
            os.chmod(sname, mode, dir_fd=self._staging_fd)
            if self.owns_files and (uid, gid) != self._creator:  # the staging file is the daemon's
                os.chown(sname, uid, gid, dir_fd=self._staging_fd)
            if times_ns is not None:
                os.utime(sname, ns=times_ns, dir_fd=self._staging_fd)
            if durable:
                fd = os.open(sname, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._staging_fd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if noreplace:
                _renameat2(self._staging_fd, sname, pfd, name, _RENAME_NOREPLACE)
            else:
                self._carry_xattrs(sname, pfd, name)
                os.rename(sname, name, src_dir_fd=self._staging_fd, dst_dir_fd=pfd)
            if durable:
                self._fsync_dir(pfd)
            return stat_from(os.stat(name, dir_fd=pfd, follow_symlinks=False))

    def prepare(self, staging_id: str, fd: int, offset: int, length: int) -> None:
        """Nothing to fetch: a staging file here holds all of its content."""

    def prepare_truncate(self, staging_id: str, fd: int, size: int) -> None:
        """Nothing to fetch: a staging file here holds all of its content."""

    def discard(self, staging_id: str) -> None:
        try:
            os.unlink(staging_id.encode(), dir_fd=self._staging_fd)
        except FileNotFoundError:
            pass

    def staged(self) -> list[str]:
        if self._staging_fd < 0:
            return []
        with _os_errors():
            dfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._staging_fd)
            try:
                return [os.fsdecode(n) for n in os.listdir(dfd)]
            finally:
                os.close(dfd)

    def sync_dir(self, rel: bytes) -> None:
        with self._dir(rel) as pfd, _os_errors():
            self._fsync_dir(pfd)

    @staticmethod
    def _fsync_dir(pfd: int) -> None:
        dfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def syncfs(self) -> None:
        with _os_errors():
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root_fd)
            try:
                _libc.syncfs(fd)
            finally:
                os.close(fd)


__all__ = ["LocalExecutor", "STAGING_NAME", "AlreadyExists", "ExecutorError", "NotFound"]
