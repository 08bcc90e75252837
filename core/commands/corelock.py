"""One thread at a time runs core code; a committing file lets go while the database works.

The mount serves requests on one trio thread, and core code (namespace, open files, the
orchestrator) is written for one thread at a time. That made every writer wait for every
other writer's commit round trip (issue 6). Now the commit of a closed file runs on a worker
thread that holds this lock like the serving thread does, except while its transaction is at
the database: then the serving thread (and other committing workers) go on. Measured with the
database 1 ms away: 2 and 4 writers 1.56x and 1.66x one writer, where they made 1.0x before;
on a local database one writer already keeps the process's Python busy (docs/architecture.md D35).

What may happen in such a window, and the rules that keep it correct:
- the committing file itself: every other use of it waits until the commit is over
  (`core.commands.files`: `OpenFile.committing`);
- rollup deltas name the directory chain as it was when the command was derived, so a
  directory rename waits until no commit is at the database (`quiesce`);
- everything else a command reads was validated under the lock, and the database's own
  constraints refuse a conflicting commit as before.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager


class CoreLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._local = threading.local()
        self.at_database = 0  # commits whose transaction is at the database now

    def __enter__(self) -> "CoreLock":
        self._cond.acquire()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        self._local.depth -= 1
        self._cond.release()

    @contextmanager
    def committing(self):
        """Run core code on this worker thread; its transactions let go of the lock."""
        with self:
            self._local.may_release = True
            try:
                yield
            finally:
                self._local.may_release = False

    @contextmanager
    def at_the_database(self):
        """Around one transaction's round trip: other threads run core code meanwhile."""
        if not getattr(self._local, "may_release", False):
            yield
            return
        depth = self._local.depth
        self.at_database += 1
        for _ in range(depth):
            self._cond.release()
        try:
            yield
        finally:
            for _ in range(depth):
                self._cond.acquire()
            self.at_database -= 1
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (letting go of the lock) until predicate holds; call with the lock held."""
        if not predicate():
            self._cond.wait_for(predicate)

    def notify(self) -> None:
        self._cond.notify_all()

    def quiesce(self) -> None:
        """Wait until no commit is at the database (called with the lock held)."""
        self.wait_until(lambda: self.at_database == 0)
