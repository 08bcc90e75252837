"""What a long admin command reports while it works (issue 17): core counts and computes (the
count, the total or an estimate of it, the rate, the time left); the CLI only draws
(fsmount/cli/progress.py: a redrawn line on a terminal, JSON lines with --json, nothing otherwise).

A `Step` is where the work stands: units done, of how many when that is known (`estimated`: a
guess, drawn "about"), the rate of this run (a resumed import does not count what an earlier
run did as speed), the time left when there is a total, and what is being done when no unit is
counted (one long statement, such as a recount, has nothing to count until it ends)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    what: str
    count: int
    total: int | None
    estimated: bool
    rate_per_s: float
    elapsed_s: float
    left_s: float | None
    note: str
    done: bool

    def as_json(self) -> dict:
        return {"progress": self.what, "count": self.count, "total": self.total, "estimated": self.estimated,
                "rate_per_s": round(self.rate_per_s, 1), "elapsed_s": round(self.elapsed_s, 1),
                "left_s": None if self.left_s is None else round(self.left_s, 1), "note": self.note,
                "done": self.done}


Callback = Callable[[Step], None]


class Meter:
    """Turns counts into Steps for a callback (None: nothing is reported). `base`: units done
    before this run (a resumed import), counted in `count` but not in the rate."""

    def __init__(self, callback: Callback | None, what: str, *, base: int = 0):
        self.callback = callback
        self.what = what
        self.base = base
        self.started = time.monotonic()
        self.count = base
        self.total: int | None = None
        self.estimated = False

    def update(self, count: int, total: int | None = None, *, estimated: bool = False, note: str = "") -> None:
        self.count, self.total, self.estimated = count, total, estimated
        if self.callback is not None:
            self.callback(self._step(note, done=False))

    def note(self, note: str) -> None:
        """Something long with nothing to count (one statement) begins."""
        self.update(self.count, self.total, estimated=self.estimated, note=note)

    def finish(self) -> None:
        """The work is done: what was done is the total (a tree that changed meanwhile)."""
        if self.total is not None:
            self.total = self.count
        if self.callback is not None:
            self.callback(self._step("", done=True))

    def _step(self, note: str, *, done: bool) -> Step:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = max(self.count - self.base, 0) / elapsed
        left = None
        if self.total is not None and not done and rate > 0:
            left = max(self.total - self.count, 0) / rate
        return Step(self.what, self.count, self.total, self.estimated and not done, rate, elapsed, left, note, done)
