"""rename(2) and renameat2(2): a move, a move that replaces a name, and an exchange."""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from core.commands.deletes import deletes_of
from core.commands.template import Command, Template, idempotent, join, touch_cached
from core.commands.validation import check_backend_name, check_name, is_within
from core.errors import FsError
from core.journal.records import Change
from core.model import ROOT_INODE, Node, Principal, display_name, name_arg
from executors.local import STAGING_NAME


@dataclass
class Side:
    """One end of a rename: the directory, its backend-relative path, the name."""
    parent: Node
    parent_rel: bytes
    name: bytes

    @property
    def rel(self) -> bytes:
        return join(self.parent_rel, self.name)


@idempotent
def rename(t: Template, who: Principal, old_parent_id: int, old_name: bytes, new_parent_id: int,
           new_name: bytes, *, noreplace: bool = False, exchange: bool = False,
           idempotency_key: str | None = None) -> None:
    if ROOT_INODE in (old_parent_id, new_parent_id):
        raise FsError(errno.EPERM, "backends are renamed with the CLI, not through the mount")
    old = Side(t.ns.dir(old_parent_id), t.path(old_parent_id)[1], old_name)
    new = Side(t.ns.dir(new_parent_id), t.path(new_parent_id)[1], new_name)
    src_backend = t.ns.backend_of(old.parent)
    backend = t.ns.backend_of(new.parent)
    cmd = Command("rename", who, src_backend, path=display_name(old.rel),
                  args={"from": display_name(old.rel), "to": display_name(new.rel),
                        "old_parent_id": old_parent_id, "old_name": name_arg(old_name),
                        "new_parent_id": new_parent_id, "new_name": name_arg(new_name),
                        "noreplace": noreplace, "exchange": exchange},
                  paths=(old.rel, new.rel), idempotency_key=idempotency_key)
    src = t.ns.child(old_parent_id, old_name)
    cmd.node_id = src.id if src is not None else None
    _check(t, cmd, src, backend, src_backend, new)
    t.settle(src.id)
    dst = t.ns.child(new_parent_id, new_name)
    if dst is not None:
        t.settle(dst.id)
    if exchange:
        return _exchange(t, cmd, src, dst, old, new)
    if src.is_dir and is_within(t, new_parent_id, src.id):
        raise t.refuse(cmd, errno.EINVAL, "cannot move a directory into itself")
    if dst is not None:
        if noreplace:
            raise t.refuse(cmd, errno.EEXIST)
        if dst.id == src.id:
            return  # two names of one file, or the same name: POSIX says do nothing
        if src.is_dir and not dst.is_dir:
            raise t.refuse(cmd, errno.ENOTDIR)
        if not src.is_dir and dst.is_dir:
            raise t.refuse(cmd, errno.EISDIR)
        if dst.is_dir and t.ns.listing(dst.id).by_name:
            raise t.refuse(cmd, errno.ENOTEMPTY)
        t.files.retain(dst.id, replaced=True)
    _move(t, cmd, src, dst, old, new, noreplace)


def _check(t: Template, cmd: Command, src: Node | None, backend, src_backend, new: Side) -> None:
    """What refuses a rename before anything is touched (each journaled as failed)."""
    if src is None:  # the kernel looked it up; a name its cache still holds may be gone here
        raise t.refuse(cmd, errno.ENOENT)
    if src_backend.id != backend.id:
        raise t.refuse(cmd, errno.EXDEV, "rename across backends")
    check_name(new.name)
    if backend.read_only:
        raise t.refuse(cmd, errno.EROFS)
    try:
        check_backend_name(t, backend, new.parent.id, new.name)
    except FsError as exc:
        raise t.refuse(cmd, exc.errno, str(exc)) from None
    if new.name == STAGING_NAME:
        raise t.refuse(cmd, errno.EINVAL, "name reserved for the executor's staging area")


def _move(t: Template, cmd: Command, src: Node, dst: Node | None, old: Side, new: Side, noreplace: bool) -> None:
    """On S3, a file whose upload is pending is renamed as it is: the object it had (if any)
    goes, and the upload lands under the new key (core.commands.writeback); a directory waits
    only for uploads still being sent under either name for files no longer there; a file
    copied onto a key waits for a send still under way to that key."""
    files = t.files
    deletes = deletes_of(files)
    if deletes is not None:
        # S3: deletions still queued at the new key, or under either directory (a directory
        # rename lists and copies them), are sent first (core.commands.deletes)
        deletes.flush(cmd.backend, keys=(new.rel,), under=(old.rel, new.rel) if src.is_dir else ())
    for _ in range(3):
        copies = not src.is_dir and files.pending_upload(src.id) is None
        keys = (new.rel,) if copies else ()
        under = (old.rel, new.rel) if src.is_dir else ()
        with files.clear(cmd.backend, keys=keys, under=under):
            moving = None if src.is_dir else files.pending_upload(src.id)
            if moving is None and not copies and not src.is_dir:
                continue  # it landed meanwhile: now the copy onto the key needs it clear
            replaced = files.pending_upload(dst.id) if dst is not None and dst.nlink <= 1 else None
            _moved(t, cmd, src, dst, old, new, noreplace, moving, replaced)
            if replaced is not None:
                files.cancel_upload(dst.id)
            files.moved()
            return
    raise t.refuse(cmd, errno.EIO, "uploads kept landing under the rename")


def _moved(t: Template, cmd: Command, src: Node, dst: Node | None, old: Side, new: Side, noreplace: bool,
           moving, replaced_upload) -> None:
    executor = cmd.backend.executor

    def execute() -> None:
        if moving is not None:
            # Pending content lands under the new name; the object the old one had (if any)
            # goes now, unless a send to it is under way (it deletes it when it stops).
            if moving.sending != old.rel:
                executor.unlink(old.parent_rel, old.name)
            return
        executor.rename(old.parent_rel, old.name, new.parent_rel, new.name, noreplace=noreplace)

    def record(_):
        now = time.time_ns()
        moved = t.ns.node(src.id)
        moved_after = moved.changed(ctime_ns=now, version=moved.version + 1)
        change = Change(unlinks=[(old.parent.id, old.name, src.id)], touches=[(old.parent.id, now)])
        replaced_after = None
        if dst is not None:
            replaced = t.ns.node(dst.id)
            links = 0 if replaced.is_dir else replaced.nlink - 1
            replaced_after = replaced.changed(nlink=max(links, 0), ctime_ns=now, version=replaced.version + 1,
                                              state="DELETED" if links <= 0 else replaced.state)
            change.unlinks.append((new.parent.id, new.name, dst.id))
            change.update(replaced_after, replaced.version, parent_id=new.parent.id, name=name_arg(new.name),
                          removed_entry=True)
            if replaced_upload is not None:  # its content never lands: the row goes with this command
                change.uploads_landed.append((dst.id, replaced_upload.pending_id))
                cmd.args["replaced_upload"] = "cancelled"
        if moving is not None:
            cmd.args["upload"] = "pending"  # lands under the new name, journaled after this
        entry_id = t.add_entry(change, new.parent.id, new.name, src.id)
        change.update(moved_after, moved.version, parent_id=new.parent.id, name=name_arg(new.name),
                      from_parent_id=old.parent.id, from_name=name_arg(old.name))
        if new.parent.id != old.parent.id:
            change.touches.append((new.parent.id, now))

        def apply():
            t.ns.unlink(old.parent.id, old.name, src.id)
            if replaced_after is not None:
                t.ns.unlink(new.parent.id, new.name, dst.id)
                t.ns.put(replaced_after)
                if replaced_after.is_dir:
                    new.parent.nlink -= 1
                    t.ns.forget_listing(dst.id)
            if moved_after.is_dir:
                t.ns.parents[src.id] = (new.parent.id, new.name)
                old.parent.nlink -= 1
                new.parent.nlink += 1
            t.ns.link(new.parent.id, new.name, entry_id, moved_after)
            touch_cached(old.parent, now)
            touch_cached(new.parent, now)
        return change, apply

    t.run(cmd, execute, record)


def _exchange(t: Template, cmd: Command, src: Node, dst: Node | None, old: Side, new: Side) -> None:
    """renameat2(RENAME_EXCHANGE): both names exist and swap atomically; nothing is removed."""
    if dst is None:
        raise t.refuse(cmd, errno.ENOENT)
    if dst.id == src.id:
        return
    if (src.is_dir and is_within(t, new.parent.id, src.id)) or (dst.is_dir and is_within(t, old.parent.id, dst.id)):
        raise t.refuse(cmd, errno.EINVAL, "cannot move a directory into itself")
    executor = cmd.backend.executor

    def execute() -> None:
        executor.rename(old.parent_rel, old.name, new.parent_rel, new.name, exchange=True)

    def record(_):
        now = time.time_ns()
        a, b = t.ns.node(src.id), t.ns.node(dst.id)
        a_after = a.changed(ctime_ns=now, version=a.version + 1)
        b_after = b.changed(ctime_ns=now, version=b.version + 1)
        change = Change(unlinks=[(old.parent.id, old.name, a.id), (new.parent.id, new.name, b.id)],
                        touches=[(old.parent.id, now)] + ([(new.parent.id, now)] if new.parent.id != old.parent.id
                                                         else []))
        a_entry = t.add_entry(change, new.parent.id, new.name, a.id)
        b_entry = t.add_entry(change, old.parent.id, old.name, b.id)
        change.update(a_after, a.version, parent_id=new.parent.id, name=name_arg(new.name), exchanged=True)
        change.update(b_after, b.version, parent_id=old.parent.id, name=name_arg(old.name), exchanged=True)

        def apply():
            t.ns.unlink(old.parent.id, old.name, a.id)
            t.ns.unlink(new.parent.id, new.name, b.id)
            for node in (a_after, b_after):
                if node.is_dir:
                    t.ns.parents.pop(node.id, None)
            t.ns.link(new.parent.id, new.name, a_entry, a_after)
            t.ns.link(old.parent.id, old.name, b_entry, b_after)
            if new.parent.id != old.parent.id and a.is_dir != b.is_dir:
                moved_dir_to_new = 1 if a.is_dir else -1
                new.parent.nlink += moved_dir_to_new
                old.parent.nlink -= moved_dir_to_new
            touch_cached(old.parent, now)
            touch_cached(new.parent, now)
        return change, apply

    t.run(cmd, execute, record)
