"""What every executor offers (the `Executor` protocol) and the domain errors it raises."""
from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class ExecutorError(Exception):
    """A physical operation failed; subclasses say how, core decides what the caller sees."""


class NotFound(ExecutorError): ...
class AlreadyExists(ExecutorError): ...
class NotEmpty(ExecutorError): ...
class NotADirectory(ExecutorError): ...
class IsADirectory(ExecutorError): ...
class PermissionDenied(ExecutorError): ...
class NotPermitted(ExecutorError):
    """The operation is not allowed at all for this caller (ownership changes, say)."""
class NoSpace(ExecutorError): ...
class FileTooLarge(ExecutorError):
    """A size past what the backend can hold (EFBIG): ext4's 16 TiB, S3's 5 TiB objects."""
class NameTooLong(ExecutorError): ...
class InvalidArgument(ExecutorError): ...
class CrossDevice(ExecutorError): ...
class ReadOnly(ExecutorError): ...
class OutsideRoot(ExecutorError):
    """The path would leave the backend root (a `..` or a symlink on the way)."""
class Unsupported(ExecutorError): ...
class Transient(ExecutorError):
    """Worth retrying: throttling, timeouts, connection resets."""
class RetriesExhausted(Transient):
    """A remote store kept failing after the bounded retries: the command fails with EIO."""
class PartlyDone(RetriesExhausted):
    """A change that was started, could not be finished and could not be undone (a directory
    rename on S3 cut off midway): the caller sees EIO, and recovery finishes it from the intent."""
class Superseded(ExecutorError):
    """An upload stopped on purpose midway (its file was renamed or removed meanwhile): its
    caller sends it again to the new name, or drops it."""
class Unavailable(RetriesExhausted):
    """The backend itself is not there (a local root gone or replaced, an S3 endpoint not
    answering): every operation on it fails with EIO until it is back (core.storage.availability)."""
class IllegalName(InvalidArgument):
    """A name the backend cannot hold (not UTF-8 on S3): EILSEQ, refused before any upload."""


# How the operating system's failures map onto the domain errors above.
_OS_FAILURES = {
    errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists, errno.ENOTEMPTY: NotEmpty,
    errno.ENOTDIR: NotADirectory, errno.EISDIR: IsADirectory, errno.EACCES: PermissionDenied,
    errno.EPERM: NotPermitted, errno.ENOSPC: NoSpace, errno.EDQUOT: NoSpace,
    errno.ENAMETOOLONG: NameTooLong, errno.EFBIG: FileTooLarge, errno.EINVAL: InvalidArgument, errno.EXDEV: CrossDevice,
    errno.EROFS: ReadOnly, errno.ELOOP: OutsideRoot,
    errno.EOPNOTSUPP: Unsupported, errno.EAGAIN: Transient, errno.EINTR: Transient,
    errno.EBUSY: Transient,
}


def from_os_error(exc: OSError) -> ExecutorError:
    cls = _OS_FAILURES.get(exc.errno or 0, ExecutorError)
    err = cls(str(exc))
    err.__cause__ = exc
    return err


@dataclass(frozen=True)
class Stat:
    kind: str  # file, dir, symlink, fifo, socket, chardev, blockdev
    size: int
    mode: int  # permission bits only
    uid: int
    gid: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 1
    target: bytes | None = None
    ino: int = 0  # the backend's own inode number (local disks), to recognise hard links
    checksum: str | None = None  # the S3 ETag of the content, where the backend has one


_KINDS = {
    stat_mod.S_IFREG: "file", stat_mod.S_IFDIR: "dir", stat_mod.S_IFLNK: "symlink",
    stat_mod.S_IFIFO: "fifo", stat_mod.S_IFSOCK: "socket", stat_mod.S_IFCHR: "chardev",
    stat_mod.S_IFBLK: "blockdev",
}
TYPE_BITS = {kind: bits for bits, kind in _KINDS.items()}


def kind_of(st_mode: int) -> str:
    return _KINDS[stat_mod.S_IFMT(st_mode)]


def validate_name(name: bytes) -> None:
    """A single path component as POSIX allows it; the kernel already checked most of this."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid name {name!r}")
    if len(name) > 255:
        raise NameTooLong(f"name of {len(name)} bytes")


@runtime_checkable
class Executor(Protocol):
    """The physical I/O of one backend (a local directory, an S3 prefix). Paths are backend-
    relative bytes (b"" is the root); every failure is one of the domain errors above, which
    core translates into errnos in one place (core.errors.translated). Executors know nothing
    of PostgreSQL or FUSE.

    Capabilities, which core reads instead of asking for methods:
    - `in_place`: files are written through descriptors onto them (`open_file`); without it,
      changes go through a local spool copy (`stage(copy_of=...)`, `prepare`) and committed
      content is read with `reader`;
    - `owns_files`: the owner and mode a command asks for are kept, whoever the daemon runs as;
    - `moves_objects_one_by_one`: a directory rename copies what is below it entry by entry and
      can be cut off midway (`PartlyDone`); `finish_rename` completes it;
    - `writes_back`: content can be kept locally and uploaded after close (the `WriteBackStore`
      methods below);
    - `stamps_ctime`: the backend keeps a change time of its own, so an attribute change that
      changes no value still reaches it (chmod to the same mode moves a local file's ctime);
      without it (S3 metadata holds none) such a change is only recorded.
    """

    kind: str
    in_place: bool
    owns_files: bool
    moves_objects_one_by_one: bool
    writes_back: bool
    stamps_ctime: bool

    def close(self) -> None: ...
    def probe(self) -> None:
        """Cheaply check that the backend is there (its root, its endpoint); raise Unavailable if
        not. May reconnect (a local root mounted again is opened again)."""
    # -- names and attributes
    def check_name(self, parent: bytes, name: bytes) -> None:
        """Refuse a name this backend cannot hold (IllegalName, NameTooLong) before any I/O."""
    def stat(self, rel: bytes) -> Stat: ...
    def stat_node(self, rel: bytes) -> Stat:
        """Like `stat`, for the node the last component names (never following a symlink)."""
    def listdir(self, rel: bytes) -> list[tuple[bytes, Stat]]:
        """Every entry of directory `rel` (the concatenation of `listdir_pages`)."""
    def listdir_pages(self, rel: bytes, skip: Callable[[list[bytes]], Collection[bytes]] | None = None,
                      page_size: int = 1000) -> Iterator[list[tuple[bytes, Stat]]]:
        """The entries of directory `rel` in pages of about `page_size` (a directory of any size
        is never held whole: what reads the directory reads it a page at a time, so a page is
        listed only when the one before has been taken). `skip`, if given, is called with each
        page's names before anything per entry is asked of the backend (a stat, a HEAD) and
        returns the names to leave out (those a resumed import already has). Entries gone
        between the listing and their stat are left out; a page may come out empty."""
    def count_tree(self, stop: threading.Event) -> int | None:
        """How many names the whole tree holds (every entry below the root, as `listdir` would
        give them, directory by directory), counted cheaply: no stat per entry. None if `stop`
        was set first. Optional: core estimates without it (backend import progress)."""
    def readlink(self, rel: bytes) -> bytes: ...
    def statfs(self) -> os.statvfs_result: ...
    def mkdir(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat: ...
    def create_file(self, parent: bytes, name: bytes, mode: int, uid: int, gid: int) -> Stat: ...
    def symlink(self, parent: bytes, name: bytes, target: bytes, uid: int, gid: int) -> Stat: ...
    def mknod(self, parent: bytes, name: bytes, kind: str, mode: int, rdev: int, uid: int, gid: int) -> Stat: ...
    def link(self, src: bytes, parent: bytes, name: bytes) -> Stat: ...
    def unlink(self, parent: bytes, name: bytes) -> None: ...
    def rmdir(self, parent: bytes, name: bytes) -> None: ...
    def rename(self, src_parent: bytes, src_name: bytes, dst_parent: bytes, dst_name: bytes, *,
               noreplace: bool = False, exchange: bool = False) -> None: ...
    def finish_rename(self, src_rel: bytes, dst_rel: bytes) -> int: ...
    def set_attrs(self, rel: bytes, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                  size: int | None = None, times_ns: tuple[int, int] | None = None,
                  known: Stat | None = None) -> Stat:
        """`known`: the entry's attributes as the caller recorded them, which an executor may use
        instead of reading them first (S3 rewrites a directory's marker without a HEAD)."""
    def set_xattr(self, rel: bytes, name: bytes, value: bytes) -> Stat:
        """Keep a user xattr on the backend's copy too; Unsupported or NoSpace where it cannot."""
    def remove_xattr(self, rel: bytes, name: bytes) -> Stat: ...
    def xattrs(self, rel: bytes) -> dict[bytes, bytes]: ...
    # -- content
    def open_file(self, rel: bytes, *, write: bool) -> int: ...
    def reader(self, rel: bytes, *, size: int, etag: str | None, cache_key: str | None): ...
    def stage(self, staging_id: str, *, copy_of: bytes | None = None, copy_size: int | None = None,
              etag: str | None = None, copy_fd: int | None = None, whole: bool = False) -> int:
        """A staging (spool) file; `copy_of` a path's content (`whole`: all of it fetched now,
        never left to fetch later), or `copy_fd` a local file's."""
    def check_size(self, size: int) -> None:
        """FileTooLarge for a size the backend cannot hold, before anything changes."""
    def prepare(self, staging_id: str, fd: int, offset: int, length: int) -> None: ...
    def prepare_truncate(self, staging_id: str, fd: int, size: int) -> None: ...
    def land(self, staging_id: str, parent: bytes, name: bytes, *, mode: int, uid: int, gid: int,
             times_ns: tuple[int, int] | None, durable: bool, noreplace: bool = False) -> Stat: ...
    def discard(self, staging_id: str) -> None: ...
    def staged(self) -> list[str]: ...
    # -- durability
    def sync_dir(self, rel: bytes) -> None: ...
    def syncfs(self) -> None: ...


@runtime_checkable
class WriteBackStore(Protocol):
    """An executor with `writes_back`: content kept in a local pending file at close, uploaded
    later by core.commands.writeback."""

    def can_keep(self, staging_id: str) -> bool: ...
    def keep(self, staging_id: str, fd: int, *, sync: bool = True) -> str:
        """Move a spool file to `pending`; with `sync`, durable first (else: `sync_pending`)."""
    def keep_empty(self, staging_id: str) -> str:
        """A pending id for empty content: no file at all (nothing to write, sync or remove)."""
    def sync_pending(self, pending_ids: list[str]) -> None:
        """Make kept files (content and names) durable, in one batch."""
    def pending_ids(self) -> list[str]: ...
    def pending_stat(self, pending_id: str) -> os.stat_result | None: ...
    def open_pending(self, pending_id: str) -> int | None: ...
    def upload_pending(self, pending_id: str, rel: bytes, *, mode: int, uid: int, gid: int,
                       times_ns: tuple[int, int] | None = None, stop=None) -> Stat:
        """Send a kept file to `rel`; `stop()` is asked between parts: True raises Superseded."""
    def drop_pending(self, pending_id: str) -> None: ...
