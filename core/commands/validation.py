"""Checks every command shares: names, the directory a name goes into, owners of new entries."""
from __future__ import annotations

import errno
import os

from core.commands.template import Template, join
from core.errors import FsError, translated
from core.model import ROOT_INODE, S_ISGID, Backend, Node, Principal
from executors.local import STAGING_NAME


def check_name(name: bytes) -> None:
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name!r}")


def parent_for_new_name(t: Template, parent_id: int, name: bytes) -> tuple[Node, Backend]:
    """The directory a new name goes into, checked for every command that adds one."""
    if parent_id == ROOT_INODE:
        raise FsError(errno.EPERM, "the mount root lists backends; add one with `filestore backend add`")
    parent = t.ns.dir(parent_id)
    backend = t.ns.backend_of(parent)
    check_name(name)
    if name == STAGING_NAME:  # reserved in every directory: nested backends keep theirs there
        raise FsError(errno.EINVAL, "name reserved for the executor's staging area")
    if backend.read_only:
        raise FsError(errno.EROFS)
    check_backend_name(t, backend, parent_id, name)
    return parent, backend


def check_backend_name(t: Template, backend: Backend, parent_id: int, name: bytes) -> None:
    """Names the backend cannot hold (S3: not UTF-8, key too long) are refused before anything
    is uploaded, even for a file that reaches the backend only at its close."""
    with translated():
        backend.executor.check_name(t.path(parent_id)[1], name)


def new_owner(who: Principal, parent: Node, kind: str, mode: int) -> tuple[int, int, int]:
    """Owner of a new entry: the caller, with the group of a setgid directory."""
    uid = who.uid if who.uid is not None else 0
    gid = who.gid if who.gid is not None else 0
    if parent.mode & S_ISGID:
        gid = parent.gid
        if kind == "dir":
            mode |= S_ISGID
    return uid, gid, mode


def is_within(t: Template, node_id: int, ancestor_id: int) -> bool:
    current = node_id
    while current is not None:
        if current == ancestor_id:
            return True
        if current in t.ns.backend_roots:
            return False
        link = t.ns.parent_of(current)
        current = link[0] if link else None
    return False


def new_path(t: Template, parent_id: int, name: bytes) -> tuple[bytes, bytes]:
    """(parent's backend-relative path, the new name's)."""
    _, parent_rel = t.path(parent_id)
    return parent_rel, join(parent_rel, name)


def may_open(who: Principal, node: Node, flags: int) -> None:
    """The permission check the kernel makes before opening an existing file, for the one open
    it leaves to us: an O_CREAT that finds the name taken (see FileTable.create)."""
    if who.uid is None or who.uid == 0:
        return
    wanted = {os.O_RDONLY: 0o4, os.O_WRONLY: 0o2, os.O_RDWR: 0o6}[flags & os.O_ACCMODE]
    if flags & os.O_TRUNC:
        wanted |= 0o2
    if who.uid == node.uid:
        granted = node.mode >> 6
    elif who.in_group(node.gid):
        granted = node.mode >> 3
    else:
        granted = node.mode
    if wanted & ~granted & 0o7:
        raise FsError(errno.EACCES)
