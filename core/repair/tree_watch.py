"""The inotify watches of one local backend tree, read in batches by the watchers' loop.

One inotify instance per backend (nested backends would share watch descriptors in one), one
watch per directory, none in a staging area (`.filestore.staging` at any depth: ours, or that of
a backend nested in this one), so the mount's staged writes never reach Python. There is no
thread here: `read()` takes every event queued since the last call in one read(2) and returns
the paths to look at; the kernel merges identical events queued back to back meanwhile (a run of
writes to one file is one event).

What is asked of the kernel is only what can be drift: creations, removals, moves, content
(IN_MODIFY for every write, also to a file its writer keeps open; IN_CLOSE_WRITE for writes
made through mmap, which send nothing else) and attributes. Not asked: opens, reads and closes
without writing (every read through the mount makes them). IN_EXCL_UNLINK: nothing from files
already unlinked (a file the mount keeps open after its unlink).

Paths: each watch knows its parent watch and its name, so a directory moved inside the tree is
one relink, not a rewrite of every path below it. A move pairs IN_MOVED_FROM with the
IN_MOVED_TO of the same cookie; an IN_MOVED_FROM still alone at the end of the next read left
the tree (or went into a staging area): its path is looked at, and a directory's watches are
removed. A directory created or moved in is watched with everything below it and looked at
deep: what happened in it before its watch was added (up to one read later) was not reported,
so its listing is compared, and so is that of every directory found in it. When the kernel's
queue overflowed, events were lost: the watches are made again from a fresh walk and the whole
backend is audited.
"""
from __future__ import annotations

import errno
import logging
import os

from inotify_simple import INotify, flags

from executors.local import STAGING_NAME

log = logging.getLogger(__name__)

MASK = int(flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.MODIFY | flags.ATTRIB
           | flags.CLOSE_WRITE | flags.ONLYDIR | flags.DONT_FOLLOW | flags.EXCL_UNLINK)
ROOT_MASK = MASK | int(flags.DELETE_SELF)  # a subdirectory's removal is seen in its parent
_MOVED_FROM, _MOVED_TO, _CREATE = int(flags.MOVED_FROM), int(flags.MOVED_TO), int(flags.CREATE)
_ISDIR, _IGNORED, _OVERFLOW, _DELETE_SELF = int(flags.ISDIR), int(flags.IGNORED), int(flags.Q_OVERFLOW), \
    int(flags.DELETE_SELF)
_NO_PARENT = -1
AUDIT = {"deep": True, "source": "audit"}

Changes = dict[bytes, dict]  # relative path -> what the job needs besides it ({} or deep / from / source)


class TreeWatch:
    def __init__(self, root: str | bytes):
        """Watch every directory of the tree from now on. Raises OSError if the root cannot be
        watched, or when the tree has more directories than fs.inotify.max_user_watches allows."""
        self.root = os.fsencode(root).rstrip(b"/") or b"/"
        self._ino = INotify(nonblocking=True)
        self._dirs: dict[int, tuple[int, bytes]] = {}  # wd -> (parent wd, name); the root's parent: -1
        self._children: dict[int, dict[bytes, int]] = {}  # wd -> {name: wd of a watched subdirectory}
        self._paths: dict[int, bytes] = {}  # wd -> path relative to the root (a cache, dropped on moves)
        # cookie -> (path, the directory's watch or None, seen by an earlier read)
        self._moved_from: dict[int, tuple[bytes, int | None, bool]] = {}
        self._full_reported = False
        try:
            self._root_wd = self._watch_tree(b"", _NO_PARENT, b"", strict=True)
        except BaseException:
            self._ino.close()
            raise

    @property
    def watched(self) -> int:
        """How many directories are watched."""
        return len(self._dirs)

    def close(self) -> None:
        self._ino.close()

    # -- events ------------------------------------------------------------------------------
    def read(self) -> tuple[int, Changes]:
        """Everything queued since the last call: (number of events, paths to look at)."""
        events = self._ino.read(timeout=0)
        changes: Changes = {}
        for wd, mask, cookie, text in events:
            if mask & _OVERFLOW:
                self._rebuild()
                return len(events), {b"": dict(AUDIT)}
            if mask & _IGNORED:  # the directory is gone, or its watch was removed
                self._forget(wd)
                continue
            name = os.fsencode(text)
            if name == STAGING_NAME:
                continue
            where = self._path(wd)
            if where is None:
                continue
            if mask & _DELETE_SELF:  # the root
                changes.setdefault(b"", {})
                continue
            rel = (where + b"/" + name if where else name) if name else where
            is_dir = bool(mask & _ISDIR)
            if mask & _MOVED_FROM:  # (its name may be taken again before the pair is seen)
                self._moved_from[cookie] = (rel, self._children.get(wd, {}).get(name) if is_dir else None, False)
                continue
            extra = changes.setdefault(rel, {})
            if mask & _MOVED_TO:
                source = self._moved_from.pop(cookie, None)
                if source is not None:
                    extra["from"] = source[0].hex()
                    if is_dir and source[1] is not None:
                        self._link(source[1], wd, name)
                    elif is_dir:  # was not watched (the watch limit): watch it now
                        self._watch_tree(rel, wd, name)
                elif is_dir:
                    self._watch_tree(rel, wd, name)
                if is_dir:
                    extra["deep"] = True
            elif mask & _CREATE and is_dir:
                self._watch_tree(rel, wd, name, found=changes)
                extra["deep"] = True
        for cookie, (rel, moved, old) in list(self._moved_from.items()):
            if not old:  # its IN_MOVED_TO may be in the next read
                self._moved_from[cookie] = (rel, moved, True)
                continue
            del self._moved_from[cookie]  # moved out of the tree, or into a staging area
            changes.setdefault(rel, {})
            self._unwatch(moved)
        return len(events), changes

    # -- the map of watches ------------------------------------------------------------------
    def _path(self, wd: int) -> bytes | None:
        path = self._paths.get(wd)
        if path is not None:
            return path
        names = []
        at = wd
        while at != self._root_wd:
            entry = self._dirs.get(at)
            if entry is None:
                return None
            at, name = entry
            names.append(name)
        path = self._paths[wd] = b"/".join(reversed(names))
        return path

    def _watch_tree(self, rel: bytes, parent: int, name: bytes, *, strict: bool = False,
                    found: Changes | None = None) -> int | None:
        """Watch `rel` and every directory below it (a staging area excepted), and put every
        entry listed below it in `found` (directories deep). The watch comes before the listing,
        so an entry made meanwhile is either listed or reported."""
        top = None
        todo = [(rel, parent, name)]
        while todo:
            rel, parent, name = todo.pop()
            path = self.root + b"/" + rel if rel else self.root
            try:
                wd = self._ino.add_watch(path, MASK if rel else ROOT_MASK)
            except OSError as exc:
                if strict and (not rel or exc.errno == errno.ENOSPC):
                    raise
                if exc.errno == errno.ENOSPC and not self._full_reported:
                    self._full_reported = True
                    log.error("cannot watch %s: more directories than fs.inotify.max_user_watches (%d"
                              " watched); changes below it are found by audits only", path, len(self._dirs))
                continue  # gone already, or not readable: nothing to watch
            self._link(wd, parent, name)
            if top is None:
                top = wd
            try:
                with os.scandir(path) as listing:
                    for entry in listing:
                        if entry.name == STAGING_NAME:
                            continue
                        below = rel + b"/" + entry.name if rel else entry.name
                        is_dir = entry.is_dir(follow_symlinks=False)
                        if found is not None:
                            listed = found.setdefault(below, {})
                            if is_dir:
                                listed["deep"] = True
                        if is_dir:
                            todo.append((below, wd, entry.name))
            except OSError:
                continue
        return top

    def _link(self, wd: int, parent: int, name: bytes) -> None:
        before = self._dirs.get(wd)
        if before == (parent, name):
            return
        if before is not None:  # known under another name: moved
            self._detach(wd, before)
            self._paths.clear()
        self._dirs[wd] = (parent, name)
        if parent != _NO_PARENT:
            self._children.setdefault(parent, {})[name] = wd

    def _detach(self, wd: int, entry: tuple[int, bytes]) -> None:
        siblings = self._children.get(entry[0])
        if siblings is not None and siblings.get(entry[1]) == wd:
            del siblings[entry[1]]

    def _forget(self, wd: int | None) -> list[int]:
        """Drop a directory and what is known below it from the map; returns their watches."""
        gone = []
        todo = [] if wd is None else [wd]
        while todo:
            at = todo.pop()
            entry = self._dirs.pop(at, None)
            if entry is None:
                continue
            self._detach(at, entry)
            todo.extend(self._children.pop(at, {}).values())
            gone.append(at)
        if gone:
            self._paths.clear()
        return gone

    def _unwatch(self, wd: int | None) -> None:
        """A directory left the tree: its watches (which follow it) are removed."""
        for at in self._forget(wd):
            try:
                self._ino.rm_watch(at)
            except OSError:
                pass  # already gone with its directory

    def _rebuild(self) -> None:
        log.warning("the inotify queue of %s overflowed: watching it anew, and auditing it whole",
                    os.fsdecode(self.root))
        self._ino.close()
        self._ino = INotify(nonblocking=True)
        self._dirs.clear()
        self._children.clear()
        self._paths.clear()
        self._moved_from.clear()
        self._full_reported = False
        self._root_wd = self._watch_tree(b"", _NO_PARENT, b"")
