"""What every executor offers and the domain errors it raises."""
from __future__ import annotations

import errno
import stat as stat_mod
from dataclasses import dataclass


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
class IllegalName(InvalidArgument):
    """A name the backend cannot hold (not UTF-8 on S3): EILSEQ, refused before any upload."""


# How the operating system's failures map onto the domain errors above.
_OS_FAILURES = {
    errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists, errno.ENOTEMPTY: NotEmpty,
    errno.ENOTDIR: NotADirectory, errno.EISDIR: IsADirectory, errno.EACCES: PermissionDenied,
    errno.EPERM: NotPermitted, errno.ENOSPC: NoSpace, errno.EDQUOT: NoSpace,
    errno.ENAMETOOLONG: NameTooLong, errno.EINVAL: InvalidArgument, errno.EXDEV: CrossDevice,
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
