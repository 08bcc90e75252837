"""Errors that carry the errno a native filesystem would give."""
from __future__ import annotations

import contextlib
import errno as _errno
import os
from collections.abc import Iterator

from executors import base
from executors.base import ExecutorError as ExecutorFailure  # noqa: F401  (the CLI reports these in one line)


class FsError(Exception):
    """A command refused or failed with a POSIX errno; nothing was changed."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or os.strerror(errno))
        self.errno = errno

    @property
    def code(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


class ConfigError(Exception):
    """Bad configuration or unreachable dependency: the CLI prints it as one line."""


def errno_for(exc: Exception) -> int:
    """The errno a caller sees for an executor's domain error (unknown failures are EIO)."""
    table = {
        base.NotFound: _errno.ENOENT, base.AlreadyExists: _errno.EEXIST,
        base.NotEmpty: _errno.ENOTEMPTY, base.NotADirectory: _errno.ENOTDIR,
        base.IsADirectory: _errno.EISDIR, base.PermissionDenied: _errno.EACCES,
        base.NotPermitted: _errno.EPERM,
        base.NoSpace: _errno.ENOSPC, base.FileTooLarge: _errno.EFBIG, base.NameTooLong: _errno.ENAMETOOLONG,
        base.InvalidArgument: _errno.EINVAL, base.CrossDevice: _errno.EXDEV,
        base.ReadOnly: _errno.EROFS, base.OutsideRoot: _errno.EACCES,
        base.Unsupported: _errno.EOPNOTSUPP, base.Transient: _errno.EAGAIN,
        base.RetriesExhausted: _errno.EIO, base.IllegalName: _errno.EILSEQ,
    }
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return _errno.EIO


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Executor errors raised inside become the FsError a caller sees: the one translation of
    executor failures into errnos (unknown ones are EIO)."""
    try:
        yield
    except base.ExecutorError as exc:
        raise FsError(errno_for(exc), str(exc)) from exc
