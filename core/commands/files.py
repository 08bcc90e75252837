"""Open files: content I/O between open and close, committed as one write command.

All handles of one node in this process share one `OpenFile`, so every reader through the
mount sees the bytes written so far (as on a native filesystem), while readers of the
backend itself see the old content until the write command lands (close-to-open).

Where the bytes go (docs/design.md section 4 cost model):
- a new file, or a rewrite opened with O_TRUNC, is written to a staging file and renamed
  over the final name when the write command commits: nobody sees it half-written;
- an existing file opened without O_TRUNC (appends, page writes) is written in place; an
  intent is logged before the first byte changes and the command records the byte ranges.
A file with several hard links is always written in place (a rename would split it).

Backends without descriptors onto their files (S3: `executor.in_place` is false) stage every
change in a local spool file standing for the object: the executor fetches the parts of the
old content a read or write touches (`prepare`), and the write command uploads the changed
parts and copies the rest server-side. Committed content is read through the executor's
reader (ranged GETs, read-ahead, an on-disk cache keyed by node id and ETag).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time

from core.commands.commits import ContentCommits, OpenFile
from core.commands.orchestrator import Orchestrator
from core.commands.validation import may_open
from core.commands.writeback import SpoolReader, WriteBack
from core.errors import FsError, translated
from core.faults import crash_point
from core.journal.intents import Intent
from core.model import S_ISGID, Backend, Node, Principal, drops_sgid, new_request_id
from core.view.namespace import Namespace
from executors.base import ExecutorError, PermissionDenied, Stat
from executors.local import stat_from

_DAY_NS = 86_400 * 10**9


class FileTable:
    """Open files of one process. Used under the core lock: one thread at a time (docs/concurrency.md)."""

    def __init__(self, orchestrator: Orchestrator, ns: Namespace, writeback: WriteBack | None = None):
        self.orch = orchestrator
        self.ns = ns
        self.writeback = writeback  # S3 content recorded at close, uploaded in the background
        self.commits = ContentCommits(orchestrator, ns, writeback)
        self._by_node: dict[int, OpenFile] = {}
        # Descriptors of files whose last name was removed while the kernel may still hold
        # them (looked up, not yet forgotten): an open of such an inode works, as natively.
        self._retained: dict[int, int] = {}
        # S3 objects of such files (backend-relative path, size, ETag), read while S3 holds them
        self._retained_objects: dict[int, tuple[bytes, int, str]] = {}
        self._handles: dict[int, OpenFile] = {}
        self._next = itertools.count(1)

    # -- opening ----------------------------------------------------------------------
    def create(self, who: Principal, parent_id: int, name: bytes, mode: int, flags: int) -> tuple[int, object]:
        """A new file: in this mount at once, on the backend and in the journal at first close.

        The kernel asks for a create after it found the name free; another mount may have
        created it since (its announcement arriving in between). Without O_EXCL that is an
        open of the file there, as natively, not EEXIST."""
        existing = None if flags & os.O_EXCL else self.ns.child(parent_id, name)
        if existing is not None and existing.kind == "file":
            may_open(who, existing, flags)
            return self.open(who, existing.id, flags), existing
        pending = self.orch.create_deferred(who, parent_id, name, mode, exclusive=bool(flags & os.O_EXCL))
        of = OpenFile(pending.node.id, pending.backend, writable=True, fresh=True, pending=pending,
                      sync_writes=bool(flags & (os.O_SYNC | os.O_DSYNC)), who=who)
        self._by_node[pending.node.id] = of
        return self._new_handle(of), pending.node

    def settle(self, node_id: int, *, content: bool = False) -> None:
        """Put a file created here, or staged content, on the backend before another command
        changes the file (rename, link, unlink, setattr...): a hard link made to a file whose
        rewrite is staged would otherwise be split from it when the staged content lands.
        Content written back to S3 and not uploaded yet stays pending: names and attributes
        change without waiting for it (core.commands.writeback); with `content` (a size
        change), the upload lands first."""
        of = self._by_node.get(node_id)
        if of is not None:
            if of.pending is not None or (of.staging_id is not None and of.dirty):
                self.commits.commit(of, durable=False)
            if of.fd is None and not of.fresh and of.backend.executor.in_place:
                # The command may remove the name (unlink, rename over): an open file stays
                # readable and writable until its last close, so take its descriptor now.
                self._descriptor(of)
        if content:
            self._await_upload(node_id)

    def settle_tree(self, backend: Backend, rel: bytes = b"") -> None:
        """Before a directory at `rel` moves or goes on S3 (which lists the objects under it):
        uploads still being sent under it for files no longer there finish first (commands
        take `clear(under=...)`, which also orders them with the landings)."""
        if self.writeback is not None:
            self.writeback.wait_stale_under(backend, rel)

    # -- write-back: what commands on names and attributes ask (core.commands.writeback) --
    def clear(self, backend: Backend, *, keys: tuple[bytes, ...] = (), under: tuple[bytes, ...] = ()):
        """A context that orders a command on a backend that writes back with the uploads (see
        WriteBack.clear); a plain no-op elsewhere."""
        if self.writeback is None:
            return contextlib.nullcontext()
        return self.writeback.clear(backend, keys=keys, under=under)

    def pending_upload(self, node_id: int):
        """This mount's pending upload of the node (S3 content not uploaded yet), if any."""
        return self.writeback.pending_upload(node_id) if self.writeback is not None else None

    def cancel_upload(self, node_id: int) -> None:
        if self.writeback is not None:
            self.writeback.cancel(node_id)

    def moved(self) -> None:
        if self.writeback is not None:
            self.writeback.moved()

    def _await_upload(self, node_id: int) -> None:
        """Content of an S3 file recorded but not uploaded yet (here or by another mount) lands
        before anything else changes or reads the object (core.commands.writeback)."""
        if self.writeback is None:
            return
        node = self.ns.node(node_id)
        if node.kind == "file" and self.writeback.is_s3(self.ns.backend_of(node)):
            self.writeback.wait(node_id)

    RETAIN_COPY_BYTES = 1 << 20  # S3: a replaced file up to this size is kept whole (one GET)

    def retain(self, node_id: int, *, replaced: bool = False) -> None:
        """Called before a command removes a regular file's last name (unlink, rename over).

        A reader that looked the name up just before may open the inode just after, as a
        native open holds the inode it resolved; keep a descriptor until the kernel forgets.
        """
        node = self.ns.node(node_id)
        if node.kind != "file" or node.nlink > 1 or node_id in self._retained or node_id in self._retained_objects:
            return
        of = self._by_node.get(node_id)
        if of is not None and of.fresh:
            return
        backend, rel = self.ns.path_of(node_id)
        if not backend.executor.in_place:
            if of is not None:
                self._keep_open_copy(of, node, rel)
            # What a reader that looked the name up may still open. Content not uploaded yet
            # is kept (a descriptor onto its spool file: no copy); a small file replaced by a
            # rename (an editor's save, a config swapped in) is downloaded whole, as a reader
            # may be opening it now; any other object is remembered (key and ETag): it is read
            # while S3 still holds it there, or from the read cache.
            source = self.writeback.spool_fd(node_id) if self.writeback is not None else None
            if source is None and replaced and node.checksum is not None and node.size <= self.RETAIN_COPY_BYTES:
                staging_id = f"{os.getpid()}.retained-{new_request_id()}"
                try:
                    source = backend.executor.stage(staging_id, copy_of=rel, copy_size=node.size,
                                                    etag=node.checksum, whole=True)
                except ExecutorError:
                    source = None
                finally:
                    backend.executor.discard(staging_id)  # the name goes, the descriptor keeps it
            if source is not None:
                self._retained[node_id] = source
            elif node.checksum is not None:
                self._retained_objects[node_id] = (rel, node.size, node.checksum)
            return
        try:
            self._retained[node_id] = backend.executor.open_file(rel, write=not backend.read_only)
        except ExecutorError:
            pass  # nothing to keep: the removal itself will report what is wrong

    def _keep_open_copy(self, of: OpenFile, node: Node, rel: bytes) -> None:
        """A file open here whose object is about to go (S3 has no descriptor onto an object):
        its content is copied into a spool file the open file keeps until its last close, so
        it stays readable and writable as POSIX wants. The copy is local when the content is
        written back and not uploaded yet, else downloaded (whole: the object will be gone)."""
        if of.staging_id is not None:
            return  # it holds its content already
        staging_id = f"{os.getpid()}.kept-{new_request_id()}"
        executor = of.backend.executor
        source = self.writeback.spool_fd(node.id) if self.writeback is not None else None
        with translated():
            try:
                fd = executor.stage(staging_id, copy_fd=source) if source is not None else \
                    executor.stage(staging_id, copy_of=rel, copy_size=node.size, etag=node.checksum, whole=True)
            finally:
                if source is not None:
                    os.close(source)
        if of.reader is not None:
            of.reader.close()
            of.reader = None
        of.staging_id, of.fd = staging_id, fd

    def unrecorded_in(self, dir_id: int) -> list[tuple[int, bytes, Node]]:
        """Files created in this directory by this process and not recorded yet (namespace
        listings re-add them when they load the directory from the database)."""
        return [(of.pending.entry_id, of.pending.name, self.ns.nodes.get(of.node_id, of.pending.node))
                for of in self._by_node.values()
                if of.pending is not None and of.pending.parent_id == dir_id]

    def holds(self, node_id: int) -> bool:
        """True while this process has changes to the node that are not recorded yet."""
        of = self._by_node.get(node_id)
        return of is not None and (of.pending is not None or of.dirty or bool(of.attrs))

    def forget(self, node_id: int) -> None:
        """The kernel dropped its last reference to the inode: a retained descriptor goes."""
        self._retained_objects.pop(node_id, None)
        fd = self._retained.pop(node_id, None)
        if fd is not None:
            os.close(fd)

    def open(self, who: Principal, node_id: int, flags: int) -> int:
        node = self.ns.node(node_id)
        if node.kind != "file":
            raise FsError(errno.EISDIR if node.is_dir else errno.EINVAL)
        backend = self.ns.backend_of(node)
        # Linux truncates on O_TRUNC even with O_RDONLY (the kernel checked write permission)
        wants_write = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        if wants_write and backend.read_only:
            raise FsError(errno.EROFS)
        of = self._by_node.get(node_id)
        if of is None:
            of = OpenFile(node_id, backend, writable=not backend.read_only)
            self._by_node[node_id] = of
        if flags & (os.O_SYNC | os.O_DSYNC):
            of.sync_writes = True
        if wants_write:
            of.who = who
        handle = self._new_handle(of)
        try:
            if wants_write and flags & os.O_TRUNC:
                self._truncate(of, 0)
        except BaseException:
            self.release(handle)
            raise
        return handle

    def _new_handle(self, of: OpenFile) -> int:
        handle = next(self._next)
        of.handles += 1
        self._handles[handle] = of
        return handle

    def _get(self, handle: int) -> OpenFile:
        try:
            return self._handles[handle]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def _descriptor(self, of: OpenFile) -> int:
        if of.fd is None and of.node_id in self._retained:
            of.fd = os.dup(self._retained[of.node_id])
        if of.fd is None:
            backend, rel = self.ns.path_of(of.node_id)
            with translated():
                try:
                    of.fd = backend.executor.open_file(rel, write=of.writable)
                except PermissionDenied:
                    if not of.writable:
                        raise
                    of.writable = False  # the daemon may read but not write it: serve reads
                    of.fd = backend.executor.open_file(rel, write=False)
        return of.fd

    # -- content ----------------------------------------------------------------------
    def read(self, handle: int, offset: int, size: int) -> bytes:
        of = self._get(handle)
        if of.fresh and of.fd is None:
            return b""
        if of.fd is None and not of.backend.executor.in_place:
            with translated():
                data = self._reader(of).read(offset, size)
        else:
            self._prepare(of, offset, size)
            data = os.pread(self._descriptor(of), size, offset)
        self._accessed(of.node_id)
        return data

    def _accessed(self, node_id: int) -> None:
        """relatime, as Linux mounts by default: a read moves atime when it is not after the
        last change or is a day old; at most one database write per change of the file."""
        node = self.ns.node(node_id)
        now = time.time_ns()
        if node.atime_ns > max(node.mtime_ns, node.ctime_ns) and now - node.atime_ns < _DAY_NS:
            return
        self.ns.put(node.changed(atime_ns=now))
        if node.state != "DELETED":
            self.orch.record_atime(node_id, now)

    @staticmethod
    def _prepare(of: OpenFile, offset: int, length: int, *, truncate: bool = False) -> None:
        """Spooled content standing for an object: have the old bytes of that range in place."""
        if of.staging_id is None or of.backend.executor.in_place:
            return
        executor = of.backend.executor
        with translated():
            if truncate:
                executor.prepare_truncate(of.staging_id, of.fd, offset)
            else:
                executor.prepare(of.staging_id, of.fd, offset, length)

    def _reader(self, of: OpenFile):
        if of.reader is None and self.ns.parent_of(of.node_id) is None:
            # a file whose last name went just before it was opened (core.commands.files.retain)
            node = self.ns.node(of.node_id)
            if of.node_id in self._retained:
                of.reader = SpoolReader(os.dup(self._retained[of.node_id]))
            elif of.node_id in self._retained_objects:
                rel, size, etag = self._retained_objects[of.node_id]
                with translated():
                    of.reader = of.backend.executor.reader(rel, size=size, etag=etag, cache_key=f"{node.id}.{etag}")
        if of.reader is None:
            node = self.ns.node(of.node_id)
            wb = self.writeback
            if wb is not None and wb.is_s3(of.backend):
                of.reader = wb.reader(node.id)  # this mount's content not uploaded yet
                if of.reader is not None:
                    return of.reader
                if wb.wait(node.id) or node.checksum is None:  # another mount's upload landed
                    node = wb.refresh(node.id)
            backend, rel = self.ns.path_of(of.node_id)
            with translated():
                of.reader = backend.executor.reader(
                    rel, size=node.size, etag=node.checksum,
                    cache_key=f"{node.id}.{node.checksum}" if node.checksum else None)
        return of.reader

    def write(self, handle: int, offset: int, data: bytes) -> tuple[int, bool]:
        """pwrite; returns (bytes written, whether the caller must wait for `Pipeline.sync`:
        an O_SYNC/O_DSYNC write is recorded at once and durable when the call returns)."""
        of = self._get(handle)
        self._begin_change(of)
        self._prepare(of, offset, len(data))
        written = os.pwrite(of.fd, data, offset)
        of.ranges.append((offset, written))
        if of.staging_id is not None:
            crash_point("after_stage_write")
        if of.sync_writes:
            self.commits.commit(of, durable=True)
            return written, True
        return written, False

    def _begin_change(self, of: OpenFile) -> None:
        """Before the first byte of a change: stage (new file) or log the in-place intent."""
        if not of.writable:
            raise FsError(errno.EBADF)
        if of.dirty:
            return
        if of.fresh and of.fd is None:
            self._stage(of)
            return
        node = self.ns.node(of.node_id)
        if drops_sgid(node, of.who) and self.ns.parent_of(of.node_id) is not None:
            self.orch.setattr(of.who, of.node_id, mode=node.mode & ~S_ISGID)
        if of.staging_id is not None:  # a spool file holding the content already (kept open copy)
            of.request_id = new_request_id()
            return
        self._await_upload(of.node_id)  # the copy must start from the uploaded content
        if not of.backend.executor.in_place:
            self._stage(of, copy=True)
            return
        fd = self._descriptor(of)
        if not of.writable:
            raise FsError(errno.EACCES)
        of.request_id = new_request_id()
        if self.ns.parent_of(of.node_id) is not None:  # unlinked files change nothing named
            backend, rel = self.ns.path_of(of.node_id)
            self.orch.intents.record(Intent(of.request_id, "write", backend.id, (rel,)))
        del fd

    def _stage(self, of: OpenFile, *, copy: bool = False) -> None:
        """A staging file for new content; with `copy`, holding the current content first
        (backends without in-place writes)."""
        rid = new_request_id()
        staging_id = f"{os.getpid()}.{rid}"
        executor = of.backend.executor
        with translated():
            if copy and of.node_id in self._retained and self.ns.parent_of(of.node_id) is None:
                fd = executor.stage(staging_id, copy_fd=self._retained[of.node_id])
            elif copy and of.node_id in self._retained_objects and self.ns.parent_of(of.node_id) is None:
                rel, size, etag = self._retained_objects[of.node_id]
                fd = executor.stage(staging_id, copy_of=rel, copy_size=size, etag=etag, whole=True)
            elif copy:
                backend, rel = self.ns.path_of(of.node_id)
                node = self.ns.node(of.node_id)
                fd = executor.stage(staging_id, copy_of=rel, copy_size=node.size, etag=node.checksum)
            else:
                fd = executor.stage(staging_id)
        of.request_id, of.staging_id, of.fd = rid, staging_id, fd

    def _truncate(self, of: OpenFile, size: int) -> None:
        node = self.ns.node(of.node_id)
        with translated():
            of.backend.executor.check_size(size)
        if size == 0 and not of.dirty and of.fd is None and node.nlink <= 1:
            if of.fresh:
                return  # already empty
            self._await_upload(of.node_id)  # one pending upload per node: the new one lands after
            self._stage(of)  # a whole rewrite: staged, landed atomically at close
            return
        self._begin_change(of)
        self._prepare(of, size, 0, truncate=True)
        os.ftruncate(of.fd, size)
        of.ranges.append((size, 0))

    def truncate_open(self, node_id: int, size: int, handle: int | None = None) -> bool:
        """Apply a size change to the open content of a node, if this process has changes to
        it open, or through a handle (ftruncate) of a backend without in-place writes (S3:
        the change goes into the spool file and is recorded at close, as a write would be)."""
        of = self._by_node.get(node_id)
        if of is None:
            return False
        through_handle = handle is not None and self._handles.get(handle) is of and of.writable \
            and not of.backend.executor.in_place
        if not (of.dirty or of.fresh or through_handle or (of.staging_id is not None and of.fd is not None)):
            return False
        self._truncate(of, size)
        return True

    def absorb_attrs(self, node_id: int, *, mode: int | None = None, uid: int | None = None,
                     gid: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None) -> bool:
        """Fold attribute changes on a file whose new content is not committed yet into its
        write command (tar writes, then fchown, fchmod and utimensat, then closes: one command
        at close instead of four). True if absorbed; the change is applied to the open content
        now, so it survives the landing of staged content, and is visible at once in this mount.
        """
        of = self._by_node.get(node_id)
        if of is None or not of.dirty or of.fd is None:
            return False
        node = self.ns.node(node_id)
        if mode is not None:
            os.fchmod(of.fd, mode & 0o7777)
        executor = of.backend.executor
        if (uid is not None or gid is not None) and executor.owns_files and executor.in_place:
            os.fchown(of.fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if atime_ns is not None or mtime_ns is not None:
            st = os.fstat(of.fd)
            os.utime(of.fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                st.st_mtime_ns if mtime_ns is None else mtime_ns))
        self.ns.put(node.changed(mode=node.mode if mode is None else mode & 0o7777,
                                 uid=node.uid if uid is None else uid,
                                 gid=node.gid if gid is None else gid))
        changes = {k: v for k, v in (("mode", mode), ("uid", uid), ("gid", gid), ("atime_ns", atime_ns),
                                      ("mtime_ns", mtime_ns)) if v is not None}
        of.attrs.update(changes)
        return True

    def live_stat(self, node_id: int) -> Stat | None:
        """Size and times of content written but not yet committed."""
        of = self._by_node.get(node_id)
        if of is None or not of.dirty or of.fd is None:
            return None
        return stat_from(os.fstat(of.fd))

    # -- closing ----------------------------------------------------------------------
    def needs_commit(self, handle: int) -> bool:
        """Has close(2) of this handle anything to record?"""
        of = self._handles.get(handle)
        return of is not None and of.changed

    def commits_slowly(self, handle: int) -> bool:
        """Does recording this handle's changes wait for something remote (an S3 upload at
        close)? Such a close runs off the serving thread."""
        of = self._handles.get(handle)
        if of is None or not of.changed or of.staging_id is None or of.backend.executor.in_place:
            return False
        return not self.commits._writes_back(of.backend, of.staging_id, False)

    def flush(self, handle: int) -> None:
        """close(2): record what changed; answered once it is in the intent log."""
        of = self._get(handle)
        if of.changed:
            self.commits.commit(of, durable=False)

    def fsync(self, handle: int, datasync: bool) -> None:
        """The local half of fsync: data on disk and what changed recorded. The caller then
        waits for `Pipeline.sync()` (the records committed, the WAL flushed)."""
        of = self._get(handle)
        if of.changed:
            self.commits.commit(of, durable=True)
            return
        if of.fd is not None:
            (os.fdatasync if datasync else os.fsync)(of.fd)
        else:
            self._await_upload(of.node_id)  # fsync: durable in the backend, so uploaded

    def release(self, handle: int) -> None:
        of = self._handles.pop(handle, None)
        if of is None:
            return
        of.handles -= 1
        if of.handles > 0:
            return
        try:
            if of.changed:
                self.commits.commit(of, durable=False)
        finally:
            if of.staging_id is not None:
                of.backend.executor.discard(of.staging_id)
            if of.fd is not None:
                os.close(of.fd)
            if of.reader is not None:
                of.reader.close()
            self._by_node.pop(of.node_id, None)
