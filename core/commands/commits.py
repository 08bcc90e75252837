"""Committing open files: close, fsync and the write commands they record (core.commands.files).

A file's changes become one command at its close: a new file's create (+ write), or a write
of staged or in-place content; an S3 file written back records its upload as pending
(core.commands.writeback). `flush` may run on a worker thread (core.commands.corelock), so nothing here holds a
lock of the file table while a commit waits for the database; the file itself is marked
`committing` meanwhile, and every other use of it waits.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.commands.orchestrator import write_args
from core.faults import crash_point
from core.model import Principal
from executors.base import Stat
from executors.local import stat_from

if TYPE_CHECKING:
    from core.commands.files import OpenFile


class Committing:
    """The committing half of core.files.FileTable (a mixin: it uses the table's state)."""

    def needs_commit(self, handle: int) -> bool:
        """Has close(2) of this handle anything to commit (or to wait for)?"""
        of = self._handles.get(handle)
        return of is not None and (of.dirty or of.pending is not None or of.committing)

    def flush(self, handle: int) -> None:
        """close(2): commit what changed. May run on a worker thread (core.commands.corelock), so it
        holds no lock of this table while the commit waits for the database."""
        of = self._get(handle)
        if of.dirty or of.pending is not None:
            self._commit(of, durable=False)

    def fsync(self, handle: int, datasync: bool) -> None:
        of = self._get(handle)
        if of.dirty or of.pending is not None:
            self._commit(of, durable=True)
            return
        if of.fd is not None:
            (os.fdatasync if datasync else os.fsync)(of.fd)
        else:
            self._await_upload(of.node_id)  # fsync: durable in the backend, so uploaded
        self.orch.db.flush_wal()

    def _commit(self, of: OpenFile, *, durable: bool) -> None:
        of.committing = True
        try:
            self._commit_now(of, durable=durable)
        finally:
            of.committing = False
            self.notify()

    def _commit_now(self, of: OpenFile, *, durable: bool) -> None:
        if of.pending is not None:
            self._commit_created(of, durable=durable)
            return
        link = self.ns.parent_of(of.node_id)
        if link is None:
            # Unlinked while open: the content dies with the last handle; nothing to record.
            self.orch.intents.resolved(of.request_id)
            of.request_id = None
            of.ranges = []
            return
        backend, rel = self.ns.path_of(of.node_id)
        parent_rel, _, name = rel.rpartition(b"/")
        node = self.ns.node(of.node_id)
        staged = of.staging_id is not None
        executor = backend.executor
        wb = self.writeback
        write_back = staged and not durable and wb is not None and wb.applies(backend, of.staging_id)
        kept = []

        def land() -> Stat:
            if write_back:  # fsynced locally and recorded as pending; uploaded in the background
                upload, st = wb.keep(backend, node, of.staging_id, of.fd, rel, of.request_id)
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

        self._record(of, kept, lambda pending_upload: self.orch.write(
            of.who or Principal.system("fuse"), of.node_id, land=land, ranges=of.ranges,
            request_id=of.request_id, staged=staged, paths=(rel,), durable=durable, attrs=of.attrs,
            pending_upload=pending_upload if write_back else None))

    def _commit_created(self, of: OpenFile, *, durable: bool) -> None:
        """First close (or fsync) of a file created here: land it and record create (+ write)."""
        pending = of.pending
        executor = of.backend.executor
        node = self.ns.node(of.node_id)
        staging_id = of.staging_id
        wb = self.writeback
        write_back = staging_id is not None and not durable and wb is not None and wb.applies(of.backend, staging_id)
        request_id = of.request_id or uuid.uuid4()
        kept = []

        def land(parent_rel: bytes, name: bytes) -> Stat:
            if write_back:  # fsynced locally and recorded as pending; uploaded in the background
                rel = parent_rel + b"/" + name if parent_rel else name
                upload, st = wb.keep(of.backend, node, staging_id, of.fd, rel, request_id)
                kept.append(upload)
                return st
            if staging_id is None:
                return executor.create_file(parent_rel, name, node.mode, node.uid, node.gid)
            st = executor.land(staging_id, parent_rel, name, mode=node.mode, uid=node.uid, gid=node.gid,
                               times_ns=None, durable=durable, noreplace=True)
            crash_point("after_land")
            return st

        write = None
        if staging_id is not None:
            write = write_args(of.ranges, staged=True, durable=durable, attrs=of.attrs)
        self._record(of, kept, lambda pending_upload: self.orch.finish_create(
            pending, land=land, write=write, writer=of.who, request_id=request_id, durable=durable,
            pending_upload=pending_upload if write_back else None))

    def _record(self, of: OpenFile, kept: list, record: Callable[[Callable[[], list]], None]) -> None:
        """Run the command. A write-back upload kept by its `land` goes into the command's
        transaction (`pending_upload`), is queued once that committed, and is abandoned if not;
        staged content that could not land is dropped with the command's error."""
        wb = self.writeback
        try:
            record(lambda: [wb.row(kept[0])])
            if kept:
                wb.enqueue(kept[0])
        except BaseException:
            if kept:
                wb.abandon(kept[0])
            self._drop_staged(of)
            raise
        finally:
            self._committed(of)

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

