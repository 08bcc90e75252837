"""Commands that add or remove a name: mkdir, create, symlink, mknod, link, unlink, rmdir.

Each is a method of core.commands.orchestrator.Orchestrator (a Template), written here as a
function of the template.
"""
from __future__ import annotations

import errno
import time
from typing import Any

from core.commands.deletes import deletes_of
from core.commands.template import Command, Template, idempotent, touch_cached
from core.commands.validation import new_owner, new_path, parent_for_new_name
from core.journal.records import Change
from core.model import Node, Principal, display_name, name_arg
from executors.base import Stat


@idempotent
def mkdir(t: Template, who: Principal, parent_id: int, name: bytes, mode: int, *,
          idempotency_key: str | None = None) -> Node:
    return _add_name(t, "mkdir", who, parent_id, name, mode, idempotency_key=idempotency_key)


@idempotent
def create(t: Template, who: Principal, parent_id: int, name: bytes, mode: int, *,
           idempotency_key: str | None = None) -> Node:
    return _add_name(t, "create", who, parent_id, name, mode, idempotency_key=idempotency_key)


@idempotent
def symlink(t: Template, who: Principal, parent_id: int, name: bytes, target: bytes, *,
            idempotency_key: str | None = None) -> Node:
    return _add_name(t, "symlink", who, parent_id, name, 0o777, target=target, idempotency_key=idempotency_key)


@idempotent
def mknod(t: Template, who: Principal, parent_id: int, name: bytes, kind: str, mode: int, rdev: int = 0, *,
          idempotency_key: str | None = None) -> Node:
    """A FIFO, socket, character or block device (or an empty regular file), as mknod(2)."""
    return _add_name(t, "mknod", who, parent_id, name, mode, kind=kind, rdev=rdev, idempotency_key=idempotency_key)


def _add_name(t: Template, command: str, who: Principal, parent_id: int, name: bytes, mode: int, *,
              target: bytes | None = None, kind: str | None = None, rdev: int = 0,
              idempotency_key: str | None = None) -> Node:
    parent, backend = parent_for_new_name(t, parent_id, name)
    parent_rel, rel = new_path(t, parent_id, name)
    kind = kind or {"mkdir": "dir", "create": "file", "symlink": "symlink"}[command]
    uid, gid, mode = new_owner(who, parent, kind, mode & 0o7777)
    args: dict[str, Any] = {"parent_id": parent_id, "name": name_arg(name), "mode": mode}
    if target is not None:
        args["target"] = name_arg(target)
    if command == "mknod":
        args.update(kind=kind, rdev=rdev)
    cmd = Command(command, who, backend, path=display_name(rel), args=args, paths=(rel,),
                  idempotency_key=idempotency_key)
    if t.ns.child(parent_id, name) is not None:
        raise t.refuse(cmd, errno.EEXIST)
    node_id = t.ids.take()
    cmd.node_id = node_id
    executor = backend.executor

    def execute() -> Stat:
        with t.files.clear(backend, keys=(rel,)):  # S3: a stale upload to that key lands first
            return put()

    def put() -> Stat:
        if kind == "dir":
            return executor.mkdir(parent_rel, name, mode, uid, gid)
        if kind == "file":
            return executor.create_file(parent_rel, name, mode, uid, gid)
        if kind == "symlink":
            return executor.symlink(parent_rel, name, target, uid, gid)
        return executor.mknod(parent_rel, name, kind, mode, rdev, uid, gid)

    def record(st: Stat):
        node = Node(node_id, backend.id, kind, st.size if kind != "dir" else 0, mode, uid, gid, st.rdev,
                    st.atime_ns, st.mtime_ns, st.ctime_ns, target=target, checksum=st.checksum,
                    nlink=2 if kind == "dir" else 1)
        change = Change(touches=[(parent_id, st.ctime_ns)])
        entry_id = t.add_entry(change, parent_id, name, node_id)
        change.insert(node, parent_id=parent_id, name=name_arg(name))

        def apply():
            t.ns.link(parent_id, name, entry_id, node, new_dir=kind == "dir")
            touch_cached(parent, st.ctime_ns)
            if kind == "dir":
                parent.nlink += 1
            return node
        return change, apply

    return t.run(cmd, execute, record)


@idempotent
def link(t: Template, who: Principal, node_id: int, new_parent_id: int, new_name: bytes, *,
         idempotency_key: str | None = None) -> Node:
    """A new name for an existing file (link(2)): one node, several entries."""
    node = t.ns.node(node_id)
    new_parent, backend = parent_for_new_name(t, new_parent_id, new_name)
    parent_rel, rel = new_path(t, new_parent_id, new_name)
    cmd = Command("link", who, backend, node_id=node_id, path=display_name(rel),
                  args={"parent_id": new_parent_id, "name": name_arg(new_name)}, idempotency_key=idempotency_key)
    if node.is_dir:
        raise t.refuse(cmd, errno.EPERM, "hard links to directories are not allowed")
    if node.backend_id != backend.id:
        raise t.refuse(cmd, errno.EXDEV, "hard link across backends")
    if t.ns.child(new_parent_id, new_name) is not None:
        raise t.refuse(cmd, errno.EEXIST)
    t.settle(node_id)
    _, src_rel = t.path(node_id)
    cmd.paths = (src_rel, rel)
    executor = backend.executor

    def execute() -> Stat:
        return executor.link(src_rel, parent_rel, new_name)

    def record(st: Stat):
        current = t.ns.node(node_id)
        after = current.changed(nlink=current.nlink + 1, ctime_ns=st.ctime_ns, version=current.version + 1)
        change = Change(touches=[(new_parent_id, st.ctime_ns)])
        entry_id = t.add_entry(change, new_parent_id, new_name, node_id)
        change.update(after, current.version, parent_id=new_parent_id, name=name_arg(new_name), added_entry=True)

        def apply():
            t.ns.link(new_parent_id, new_name, entry_id, after)
            touch_cached(new_parent, st.ctime_ns)
            return after
        return change, apply

    return t.run(cmd, execute, record)


@idempotent
def unlink(t: Template, who: Principal, parent_id: int, name: bytes, *, idempotency_key: str | None = None) -> None:
    _remove_name(t, "unlink", who, parent_id, name, idempotency_key)


@idempotent
def rmdir(t: Template, who: Principal, parent_id: int, name: bytes, *, idempotency_key: str | None = None) -> None:
    _remove_name(t, "rmdir", who, parent_id, name, idempotency_key)


def _remove_name(t: Template, command: str, who: Principal, parent_id: int, name: bytes,
                 idempotency_key: str | None) -> None:
    parent, backend = parent_for_new_name(t, parent_id, name)
    parent_rel, rel = new_path(t, parent_id, name)
    cmd = Command(command, who, backend, path=display_name(rel),
                  args={"parent_id": parent_id, "name": name_arg(name)}, paths=(rel,),
                  idempotency_key=idempotency_key)
    node = t.ns.child(parent_id, name)
    if node is None:
        raise t.refuse(cmd, errno.ENOENT)
    cmd.node_id = node.id
    t.settle(node.id)
    if command == "unlink" and node.is_dir:
        raise t.refuse(cmd, errno.EISDIR)
    if command == "rmdir":
        if not node.is_dir:
            raise t.refuse(cmd, errno.ENOTDIR)
        if t.ns.listing(node.id).by_name:
            raise t.refuse(cmd, errno.ENOTEMPTY)
    if command == "unlink":
        t.retain(node.id)
    executor = backend.executor
    # S3: an rmdir lists the prefix, so uploads still being sent under it for files no longer
    # there finish first; an unlink of a file whose upload is pending cancels it (writeback).
    deletes = deletes_of(t.files)
    with t.files.clear(backend, under=(rel,) if command == "rmdir" else ()):
        upload = t.files.pending_upload(node.id) if command == "unlink" and node.nlink <= 1 else None
        # S3: the object's deletion is queued with the command and sent in a batch once it is
        # committed (core.commands.deletes); an rmdir lists nothing (the listing above says empty)
        queued = deletes is not None and deletes.applies(backend) and (command == "rmdir" or node.nlink <= 1)
        _remove(t, cmd, command, node, parent, parent_id, parent_rel, name, rel, executor, upload,
                deletes if queued else None)
        if upload is not None:
            t.files.cancel_upload(node.id)


def _remove(t: Template, cmd: Command, command: str, node: Node, parent: Node, parent_id: int, parent_rel: bytes,
            name: bytes, rel: bytes, executor, upload, deletes=None) -> None:
    sent_away = upload is not None and upload.sending == rel
    if sent_away:
        deletes = None  # the send under way to that key deletes it once it stops (writeback)

    def execute() -> None:
        if sent_away or deletes is not None:
            return
        (executor.rmdir if command == "rmdir" else executor.unlink)(parent_rel, name)

    def record(_):
        now = time.time_ns()
        current = t.ns.node(node.id)
        links = 0 if current.is_dir else current.nlink - 1
        after = current.changed(nlink=max(links, 0), ctime_ns=now, version=current.version + 1,
                                state="DELETED" if links <= 0 else current.state)
        change = Change(unlinks=[(parent_id, name, node.id)], touches=[(parent_id, now)])
        change.update(after, current.version, parent_id=parent_id, name=name_arg(name), removed_entry=True)
        if upload is not None:  # its content never lands: the row goes with this command
            change.uploads_landed.append((node.id, upload.pending_id))
            cmd.args["upload"] = "cancelled"
        if deletes is not None:  # after the cancelled upload's row: they share the node's key
            change.uploads_added.append(deletes.queue(cmd.backend, node.id, rel, is_dir=command == "rmdir",
                                                      request_id=cmd.request_id))
            cmd.args["object"] = "queued"

        def apply():
            t.ns.unlink(parent_id, name, node.id)
            t.ns.put(after)
            touch_cached(parent, now)
            if current.is_dir:
                parent.nlink -= 1
                t.ns.forget_listing(node.id)
        return change, apply

    t.run(cmd, execute, record)
