"""Commands that commit file content: a write, and a new file's create (+ its first write).

The bytes are written between open and close by core.commands.files; these record them at
close or fsync, landing staged content first (`land`).
"""
from __future__ import annotations

import errno
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.commands.template import Command, Template, touch_cached, write_args
from core.commands.validation import new_owner, parent_for_new_name
from core.journal.records import Change, Upload
from core.model import Backend, Node, Principal, display_name, name_arg
from core.observe import metrics
from executors.base import Stat


@dataclass
class PendingCreate:
    """A file created in the mount and not yet on the backend (see create_deferred)."""
    node: Node
    parent_id: int
    name: bytes
    who: Principal
    backend: Backend
    entry_id: int
    # O_EXCL: its landing must not replace a name another mount took meanwhile (EEXIST at
    # close); without it, it replaces that file, as an open of it would have written over it.
    exclusive: bool = True


def write(t: Template, who: Principal, node_id: int, *, land: Callable[[], Stat],
          ranges: Sequence[tuple[int, int]], request_id: uuid.UUID, staged: bool,
          paths: tuple[bytes, ...], durable: bool, attrs: dict[str, int] | None = None,
          upload: Callable[[], Upload] | None = None) -> Node:
    """Record content already written to the backend (in place) or staged (landed by `land`).
    With `upload`, `land` kept the content for a write-back upload (core.commands.writeback)
    and the upload's row goes into the command's transaction."""
    node = t.ns.node(node_id)
    backend = t.ns.backend_of(node)
    args = write_args(ranges, staged=staged, durable=durable, attrs=attrs)
    if upload is not None:
        args["upload"] = "pending"
    written = args["bytes"]
    cmd = Command("write", who, backend, node_id=node_id, path=display_name(paths[0]) if paths else None,
                  args=args, paths=paths, request_id=request_id)

    def record(st: Stat):
        current = t.ns.node(node_id)
        # mode, uid and gid folded in by FileTable.absorb_attrs are already on `current`
        after = current.changed(size=st.size, mtime_ns=st.mtime_ns, ctime_ns=landed_ctime(st, staged, attrs),
                                atime_ns=st.atime_ns if attrs and "atime_ns" in attrs else current.atime_ns,
                                checksum=st.checksum, version=current.version + 1)
        change = Change(uploads_added=[upload()] if upload is not None else [])
        change.update(after, current.version)

        def apply():
            t.ns.put(after)
            metrics.bound(metrics.BYTES_WRITTEN, backend.name).inc(written)
            return after
        return change, apply

    return t.run(cmd, land, record)


def create_deferred(t: Template, who: Principal, parent_id: int, name: bytes, mode: int, *,
                    exclusive: bool = True) -> PendingCreate:
    """A new regular file, in this mount's view at once; it reaches the backend and the
    journal at its first close or fsync (`finish_create`), in one transaction with its
    first content. Nothing is on the backend before: no reader there ever sees it empty
    or half-written, and a crash before the close leaves nothing behind."""
    parent, backend = parent_for_new_name(t, parent_id, name)
    if t.ns.child(parent_id, name) is not None:
        _, parent_rel = t.path(parent_id)
        rel = parent_rel + b"/" + name if parent_rel else name
        raise t.refuse(Command("create", who, backend, path=display_name(rel),
                               args={"parent_id": parent_id, "name": name_arg(name)}), errno.EEXIST)
    uid, gid, mode = new_owner(who, parent, "file", mode & 0o7777)
    now = time.time_ns()
    node = Node(t.ids.take(), backend.id, "file", 0, mode, uid, gid, 0, now, now, now)
    entry_id = t.entry_ids.take()
    t.ns.link(parent_id, name, entry_id, node)
    touch_cached(parent, now)
    return PendingCreate(node, parent_id, name, who, backend, entry_id, exclusive)


def finish_create(t: Template, pending: PendingCreate, *, land: Callable[[bytes, bytes], Stat],
                  write: dict[str, Any] | None, writer: Principal | None, request_id: uuid.UUID,
                  upload: Callable[[], Upload] | None = None) -> Node:
    """Put a deferred file on the backend (`land(parent_rel, name)`, which must not replace
    anything unless the create was not exclusive) and record its create, and its first write if any, in one transaction. With
    `upload`, `land` only kept the content for a write-back upload (see `write`)."""
    node, parent_id, name, backend = pending.node, pending.parent_id, pending.name, pending.backend
    _, parent_rel = t.path(parent_id)
    rel = parent_rel + b"/" + name if parent_rel else name
    cmd = Command("create", pending.who, backend, node_id=node.id, path=display_name(rel),
                  args={"parent_id": parent_id, "name": name_arg(name), "mode": node.mode},
                  paths=(rel,), request_id=request_id)
    write_cmd = None
    if upload is not None and write is None:
        cmd.args["upload"] = "pending"
    if write is not None:
        if upload is not None:
            write = {**write, "upload": "pending"}
        write_cmd = Command("write", writer or pending.who, backend, node_id=node.id, path=display_name(rel),
                            args=write, paths=(rel,))

    def execute() -> Stat:
        return land(parent_rel, name)

    def record(st: Stat):
        current = t.ns.node(node.id)  # mode and owner may have changed while it was open
        created_link = Change(links=[(parent_id, name, node.id, pending.entry_id)],
                              touches=[(parent_id, node.ctime_ns)])
        if write_cmd is None:  # an empty file: the create alone, as the backend has it
            final = current.changed(size=st.size, atime_ns=st.atime_ns, mtime_ns=st.mtime_ns,
                                    ctime_ns=st.ctime_ns, checksum=st.checksum, version=1)
            created_link.insert(final, parent_id=parent_id, name=name_arg(name))
            if upload is not None:  # written back: an empty object uploaded after (D48)
                created_link.uploads_added.append(upload())
            pairs = [(cmd, created_link)]
        else:  # version 1 as created (empty), version 2 with the content that landed
            created = current.changed(size=0, version=1, atime_ns=node.atime_ns,
                                      mtime_ns=node.ctime_ns, ctime_ns=node.ctime_ns)
            created_link.insert(created, parent_id=parent_id, name=name_arg(name))
            # the times the backend gave the landed file: the clock of our own create
            # (fine-grained) can be ahead of the disk's (coarse), and atime must not pass mtime
            final = created.changed(size=st.size, mtime_ns=st.mtime_ns,
                                    ctime_ns=landed_ctime(st, True, write.get("attrs")),
                                    atime_ns=st.atime_ns, checksum=st.checksum, version=2)
            content = Change(uploads_added=[upload()] if upload is not None else [])
            content.update(final, 1)
            pairs = [(cmd, created_link), (write_cmd, content)]

        def apply():
            t.ns.put(final)
            if write_cmd is not None:
                metrics.bound(metrics.BYTES_WRITTEN, backend.name).inc(write.get("bytes", 0))
            return final
        return pairs, apply

    try:
        return t.run(cmd, execute, record)
    except Exception:
        t.ns.unlink(parent_id, name, node.id)  # it never existed outside this mount
        raise


def landed_ctime(st: Stat, staged: bool, attrs: dict | None) -> int:
    """A staged file's ctime as its writer made it: landing (chmod, chown, rename) is the
    daemon's own work and moves the disk's ctime past the last write, which a native file
    never shows; attribute changes the writer made itself keep the disk's ctime."""
    if staged and not attrs:
        return st.mtime_ns
    return st.ctime_ns
