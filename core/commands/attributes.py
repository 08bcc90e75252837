"""Commands that change a node's attributes: setattr (chmod, chown, utimens, truncate) and
extended attributes; and a read's relatime update, which is no command at all."""
from __future__ import annotations

import errno
from typing import Any

from core.commands.template import Command, Template, idempotent
from core.commands.xattrs import check_namespace, check_writable
from core.errors import FsError
from core.journal.records import Change
from core.model import ROOT_INODE, S_ISGID, Node, Principal, display_name, drops_sgid, name_arg
from executors.base import NoSpace, Stat, Unsupported
from executors.s3_common import now_ns


@idempotent
def setattr(t: Template, who: Principal, node_id: int, *, mode: int | None = None, uid: int | None = None,
            gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
            mtime_ns: int | None = None, idempotency_key: str | None = None) -> Node:
    if node_id == ROOT_INODE:
        raise FsError(errno.EPERM)
    t.files.settle(node_id, content=size is not None)  # a size change starts from uploaded content
    node = t.ns.node(node_id)
    if size is not None and mode is None and drops_sgid(node, who):
        mode = node.mode & ~S_ISGID
    backend, rel = t.path(node_id)
    changes = {k: v for k, v in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size),
                                  ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)) if v is not None}
    cmd = Command("setattr", who, backend, node_id=node_id, path=display_name(rel), args=changes,
                  paths=(rel,), idempotency_key=idempotency_key)
    if backend.read_only:
        raise t.refuse(cmd, errno.EROFS)
    if size is not None and node.kind != "file":
        raise t.refuse(cmd, errno.EISDIR if node.is_dir else errno.EINVAL)
    times = None
    if atime_ns is not None or mtime_ns is not None:
        times = (node.atime_ns if atime_ns is None else atime_ns, node.mtime_ns if mtime_ns is None else mtime_ns)
    executor = backend.executor
    with t.files.clear(backend):  # S3: ordered with the landings of uploads
        # A file whose S3 upload is pending changes only in the records: its landing applies
        # the node's attributes as they are then (core.commands.writeback).
        pending = t.files.pending_upload(node_id) if size is None else None
        # `tar -x` ends each directory with a chmod and a chown to what it has already: on S3
        # each was a HEAD and a PUT of the directory's marker, for nothing to change.
        unchanged = not executor.stamps_ctime and size is None and (mode is None or mode & 0o7777 == node.mode) \
            and (uid is None or uid == node.uid) and (gid is None or gid == node.gid) \
            and (times is None or times == (node.atime_ns, node.mtime_ns))

        def execute() -> Stat:
            if pending is not None:
                cmd.args["upload"] = "pending"
            elif unchanged:
                cmd.args["object"] = "unchanged"
            if pending is not None or unchanged:
                # the kernel's coarse clock, as S3 stamps ctime (executors.s3_common.now_ns): a
                # UTIME_NOW the kernel computes next must not come before this ctime
                now = now_ns()
                return Stat(node.kind, node.size, node.mode if mode is None else mode & 0o7777,
                            node.uid if uid is None else uid, node.gid if gid is None else gid, node.rdev,
                            times[0] if times else node.atime_ns, times[1] if times else node.mtime_ns, now)
            known = Stat(node.kind, node.size, node.mode, node.uid, node.gid, node.rdev, node.atime_ns,
                         node.mtime_ns, node.ctime_ns, checksum=node.checksum)
            return executor.set_attrs(rel, mode=mode & 0o7777 if mode is not None else None, uid=uid,
                                      gid=gid, size=size, times_ns=times, known=known)
        return _record_setattr(t, cmd, node_id, mode, uid, gid, size, times, execute)


def _record_setattr(t: Template, cmd: Command, node_id: int, mode, uid, gid, size, times, execute) -> Node:

    def record(st: Stat):
        current = t.ns.node(node_id)
        after = current.changed(
            mode=(mode & 0o7777) if mode is not None else current.mode,
            uid=current.uid if uid is None else uid, gid=current.gid if gid is None else gid,
            size=st.size if current.kind == "file" else current.size,
            atime_ns=_set_atime(st, times) if times else current.atime_ns,
            mtime_ns=st.mtime_ns if (times or size is not None) else current.mtime_ns,
            ctime_ns=st.ctime_ns, checksum=st.checksum or current.checksum, version=current.version + 1)
        change = Change()
        change.update(after, current.version)

        def apply():
            t.ns.put(after)
            return after
        return change, apply

    return t.run(cmd, execute, record)


@idempotent
def setxattr(t: Template, who: Principal, node_id: int, name: bytes, value: bytes, *, flags: int = 0,
             idempotency_key: str | None = None) -> Node:
    """setxattr(2) in the user namespace; flags XATTR_CREATE (1) and XATTR_REPLACE (2)."""
    return _xattr_change(t, "setxattr", who, node_id, name, value, flags, idempotency_key)


@idempotent
def removexattr(t: Template, who: Principal, node_id: int, name: bytes, *,
                idempotency_key: str | None = None) -> Node:
    return _xattr_change(t, "removexattr", who, node_id, name, None, 0, idempotency_key)


def _xattr_change(t: Template, command: str, who: Principal, node_id: int, name: bytes, value: bytes | None,
                  flags: int, idempotency_key: str | None) -> Node:
    if node_id == ROOT_INODE:
        raise FsError(errno.EPERM)
    check_namespace(name)  # not journaled: what a filesystem without these answers
    node = t.ns.node(node_id)
    backend, rel = t.path(node_id)
    args: dict[str, Any] = {"name": name_arg(name)}
    if value is not None:
        args.update(size=len(value), flags=flags)
    cmd = Command(command, who, backend, node_id=node_id, path=display_name(rel), args=args, paths=(rel,),
                  idempotency_key=idempotency_key)
    try:
        check_writable(name, value)
    except FsError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            # cp -p and mv probe system.posix_acl_* and security.* on every file they copy:
            # a namespace this filesystem has no place for is not a change to journal.
            raise
        raise t.refuse(cmd, exc.errno, str(exc)) from None
    if backend.read_only:
        raise t.refuse(cmd, errno.EROFS)
    if node.kind not in ("file", "dir"):  # Linux keeps user xattrs on files and directories only
        raise t.refuse(cmd, errno.EPERM, f"user xattrs on a {node.kind}")
    present = name in t.xattrs.of(node_id)
    if (value is None or flags & 2) and not present:
        raise t.refuse(cmd, errno.ENODATA)
    if flags & 1 and present:
        raise t.refuse(cmd, errno.EEXIST)
    t.settle(node_id)
    executor = backend.executor

    def execute() -> Stat | None:
        # The database holds the attribute; the disk keeps a copy where it can (D18).
        try:
            st = executor.set_xattr(rel, name, value) if value is not None else executor.remove_xattr(rel, name)
            cmd.args["on_disk"] = True
        except (Unsupported, NoSpace):
            st = None  # nothing changed on the backend (S3 keeps none: its object may not exist yet)
            cmd.args["on_disk"] = False
        return st

    def record(st: Stat):
        current = t.ns.node(node_id)
        ctime = st.ctime_ns if cmd.args["on_disk"] else max(now_ns(), current.ctime_ns)
        after = current.changed(ctime_ns=ctime, version=current.version + 1)
        change = Change(xattrs=[(node_id, name, value)])
        change.update(after, current.version)

        def apply():
            t.ns.put(after)
            if value is None:
                t.xattrs.drop(node_id, name)
            else:
                t.xattrs.put(node_id, name, value)
            return after
        return change, apply

    return t.run(cmd, execute, record)


def record_atime(t: Template, node_id: int, atime_ns: int) -> None:
    """A read's relatime update: not a change anyone made, so no command, no journal row and
    no new version (as Linux does not bump i_version for atime); sent with the next group
    commit, so a read never waits for the database."""
    t.pipeline.record_atime(node_id, atime_ns)


def _set_atime(st: Stat, times: tuple[int, int]) -> int:
    """The atime a utimensat set. The stat taken after it may already show a later one (a
    directory read on the disk meanwhile moves it, relatime): where the disk kept the mtime
    asked for to the nanosecond, it kept the atime asked for too."""
    return times[0] if st.mtime_ns == times[1] else st.atime_ns
