"""The domain objects core hands around."""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from executors.base import TYPE_BITS

ROOT_INODE = 1  # the mount root: a virtual directory listing the backends

_IDS = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _IDS.seed(os.urandom(32)))  # no shared ids after fork


def new_request_id() -> uuid.UUID:
    """A new request id (a random UUID): from a generator seeded once, not a getrandom(2) call
    for each of the two or three ids a small file takes on the serving thread."""
    return uuid.UUID(int=_IDS.getrandbits(128), version=4)


@dataclass(frozen=True)
class Principal:
    """Who asked for a change: a process through the mount, the CLI, recovery or the reconciler."""
    uid: int | None
    gid: int | None
    pid: int | None
    actor: str = "fuse"

    @classmethod
    def current_process(cls, actor: str = "cli") -> "Principal":
        return cls(os.getuid(), os.getgid(), os.getpid(), actor)

    @classmethod
    def system(cls, actor: str) -> "Principal":
        return cls(None, None, None, actor)

    def in_group(self, gid: int) -> bool:
        """Whether the caller belongs to `gid`: its gid or a supplementary group, read from
        /proc because FUSE passes only uid, gid and pid."""
        if self.gid == gid:
            return True
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return str(gid) in line.split()[1:]
        except OSError:
            pass
        return False


S_ISGID, S_IXGRP = 0o2000, 0o010


def drops_sgid(node: "Node", who: Principal | None) -> bool:
    """A write or truncate by `who` clears the setgid bit of a file without group exec
    (Linux 6 setattr_should_drop_sgid). The kernel's FUSE side clears setuid, and setgid with
    group exec, itself; this is the remaining case, done by the daemon."""
    if node.kind != "file" or not node.mode & S_ISGID or node.mode & S_IXGRP:
        return False
    if who is None or who.uid in (None, 0):
        return False
    return not who.in_group(node.gid)


@dataclass
class Node:
    id: int
    backend_id: int
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    version: int = 1
    state: str = "ACTIVE"
    target: bytes | None = None
    checksum: str | None = None
    nlink: int = 1

    @property
    def st_mode(self) -> int:
        return TYPE_BITS[self.kind] | self.mode

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def changed(self, **fields: Any) -> "Node":
        """A copy with some fields changed (dataclasses.replace re-runs __init__: 5x the cost,
        on every command's path)."""
        new = object.__new__(Node)
        new.__dict__ = {**self.__dict__, **fields}
        return new

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        data = {
            "kind": self.kind, "size": self.size, "mode": self.mode, "uid": self.uid, "gid": self.gid,
            "rdev": self.rdev, "atime_ns": self.atime_ns, "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns, "state": self.state, "checksum": self.checksum,
            "nlink": self.nlink,
        }
        if self.target is not None:
            data["target"] = display_name(self.target)
        data.update(extra)
        return data


@dataclass
class Backend:
    id: int
    name: str
    kind: str
    root: str
    read_only: bool
    root_node_id: int
    options: dict = field(default_factory=dict)
    executor: Any = None


def display_name(raw: bytes) -> str:
    """Bytes as text for journals and output: undecodable bytes appear as \\xNN escapes."""
    return raw.decode("utf-8", "backslashreplace")


def name_arg(raw: bytes) -> str | dict[str, str]:
    """A name as a JSON value that loses nothing: text when it is UTF-8, else its hex."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": raw.hex()}
