"""Recording what an open file changed: at close, at fsync, or before another command needs it.

A file's changes become one command: a new file's create (+ write), or a write of staged or
in-place content; an S3 file written back records its upload as pending (core.commands.writeback).
Staged content is landed (renamed into place) first; the command is then answered like any
other and committed by the pipeline's next group: `close(2)` never waits for the database.
A durable commit (fsync, O_SYNC) flushes the data here; its caller then waits for
`Pipeline.sync()` (off the serving thread), so fsync keeps its meaning end to end.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.commands.content import PendingCreate
from core.commands.template import write_args
from core.faults import crash_point
from core.model import Backend, Principal, new_request_id
from core.view.namespace import Namespace
from executors.base import AlreadyExists, Stat
from executors.local import stat_from

if TYPE_CHECKING:
    from core.commands.orchestrator import Orchestrator
    from core.commands.writeback import WriteBack


@dataclass
class OpenFile:
    node_id: int
    backend: Backend
    fd: int | None = None  # None until first needed (a new empty file needs no descriptor)
    writable: bool = False
    staging_id: str | None = None  # set while the content lives in a staging file
    request_id: uuid.UUID | None = None  # the pending write command, once something changed
    ranges: list[tuple[int, int]] = field(default_factory=list)
    handles: int = 0
    fresh: bool = False  # created by this process and still empty on the backend
    sync_writes: bool = False
    who: Principal | None = None  # the last writer to open it: the principal of its write command
    attrs: dict = field(default_factory=dict)  # attribute changes folded into the pending write
    pending: PendingCreate | None = None  # created here, not yet on the backend nor journaled
    reader: object | None = None  # ranged reads of committed content (backends without descriptors)

    @property
    def dirty(self) -> bool:
        return self.request_id is not None

    @property
    def changed(self) -> bool:
        """Has it anything to record?"""
        return self.dirty or self.pending is not None


class ContentCommits:
    def __init__(self, orch: "Orchestrator", ns: Namespace, writeback: "WriteBack | None"):
        self.orch = orch
        self.ns = ns
        self.writeback = writeback

    def commit(self, of: OpenFile, *, durable: bool) -> None:
        """Record what the file changed; with `durable`, its data is on disk first."""
        if of.pending is None and self.ns.parent_of(of.node_id) is None:
            # Unlinked while open: the content dies with the last handle (a spool file holding
            # it stays with the open file until then); nothing to record.
            if of.request_id is not None:
                self.orch.intents.resolved([of.request_id])
            if durable and of.fd is not None:
                os.fsync(of.fd)
            of.request_id, of.ranges, of.attrs = None, [], {}
            return
        try:
            if of.pending is not None:
                self._created(of, durable=durable)
            else:
                self._written(of, durable=durable)
        except BaseException:
            self._drop_staged(of)
            raise
        finally:
            self._committed(of)

    def _written(self, of: OpenFile, *, durable: bool) -> None:
        backend, rel = self.ns.path_of(of.node_id)
        parent_rel, _, name = rel.rpartition(b"/")
        node = self.ns.node(of.node_id)
        staged = of.staging_id is not None
        executor = backend.executor
        write_back = self._writes_back(backend, of.staging_id, durable)
        kept = []

        def land() -> Stat:
            if write_back:  # fsynced locally and recorded as pending; uploaded in the background
                upload, st = self.writeback.keep(backend, node, of.staging_id, of.fd, rel, of.request_id)
                kept.append(upload)
                return st
            if staged:
                st = executor.land(of.staging_id, parent_rel, name, mode=node.mode, uid=node.uid,
                                   gid=node.gid, times_ns=None, durable=durable)
                crash_point("after_land")
                return st
            if durable:
                os.fsync(of.fd)
            return stat_from(os.fstat(of.fd))

        self.orch.write(of.who or Principal.system("fuse"), of.node_id, land=land, ranges=of.ranges,
                        request_id=of.request_id, staged=staged, paths=(rel,), durable=durable, attrs=of.attrs,
                        upload=(lambda: kept[0].row) if write_back else None)

    def _created(self, of: OpenFile, *, durable: bool) -> None:
        """First close (or fsync) of a file created here: land it and record create (+ write)."""
        executor = of.backend.executor
        node = self.ns.node(of.node_id)
        request_id = of.request_id or new_request_id()
        written = of.staging_id is not None
        # An empty new file written back (D48, D58): uploaded like any content, so its close
        # waits for no PUT (it was one synchronous PUT with If-None-Match, on the serving thread),
        # and kept without a spool file (its content is known).
        empty_kept = not written and not durable and self._writes_back_new(of.backend)
        staging_id = of.staging_id
        write_back = empty_kept or self._writes_back(of.backend, staging_id, durable)
        kept = []

        def land(parent_rel: bytes, name: bytes) -> Stat:
            if write_back:  # recorded as pending (its file fsynced before the commit); uploaded in the background
                rel = parent_rel + b"/" + name if parent_rel else name
                if empty_kept:
                    upload, st = self.writeback.keep_empty(of.backend, node, rel, request_id)
                else:
                    upload, st = self.writeback.keep(of.backend, node, staging_id, of.fd, rel, request_id)
                kept.append(upload)
                return st
            rel = parent_rel + b"/" + name if parent_rel else name
            exclusive = of.pending.exclusive
            with self._key_clear(of.backend, rel):  # S3: a stale upload to that key lands first
                if staging_id is None:
                    try:
                        return executor.create_file(parent_rel, name, node.mode, node.uid, node.gid)
                    except AlreadyExists:
                        # Another mount created it meanwhile: an empty open of a file changes nothing.
                        st = None if exclusive else executor.stat(rel)
                        if st is None or st.kind != "file":
                            raise
                        return st
                st = executor.land(staging_id, parent_rel, name, mode=node.mode, uid=node.uid, gid=node.gid,
                                   times_ns=None, durable=durable, noreplace=exclusive)
            crash_point("after_land")
            return st

        write = write_args(of.ranges, staged=True, durable=durable, attrs=of.attrs) if written else None
        self.orch.finish_create(of.pending, land=land, write=write, writer=of.who, request_id=request_id,
                                upload=(lambda: kept[0].row) if write_back else None)

    def _key_clear(self, backend: Backend, rel: bytes):
        if self.writeback is None:
            return contextlib.nullcontext()
        return self.writeback.clear(backend, keys=(rel,))

    def _writes_back_new(self, backend: Backend) -> bool:
        """Is an empty new file on this backend written back (S3, write-back on and running)?"""
        wb = self.writeback
        return wb is not None and wb.on and wb.running and wb.is_s3(backend)

    def _writes_back(self, backend: Backend, staging_id: str | None, durable: bool) -> bool:
        wb = self.writeback
        return staging_id is not None and not durable and wb is not None and wb.applies(backend, staging_id)

    @staticmethod
    def _drop_staged(of: OpenFile) -> None:
        """Staged content that could not land is dropped with the error of its command."""
        if of.staging_id is not None:
            of.backend.executor.discard(of.staging_id)
            os.close(of.fd)
            of.fd = None

    @staticmethod
    def _committed(of: OpenFile) -> None:
        """Landed (or dropped): the descriptor, if any, now refers to the file at its name."""
        if of.reader is not None:
            of.reader.close()  # it read the previous content
            of.reader = None
        if of.fd is not None and not of.backend.executor.in_place:
            os.close(of.fd)  # a spool file, partly sparse: reads go to the new object now
            of.fd = None
        of.pending = None
        of.staging_id = None
        of.request_id = None
        of.ranges = []
        of.attrs = {}
        of.fresh = False
