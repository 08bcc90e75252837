"""Crash points for tests: a real crash between two steps cannot be produced on demand.

FILESTORE_CRASH_AT=<point>[,<point>...] makes the process SIGKILL itself when it reaches a
named point. Points: `after_execute:<command>` (physical change made, not yet committed),
`after_land` (staged content renamed into place, write not yet committed),
`after_stage_write` (bytes written to a staging file). Read once at start; free otherwise.
"""
from __future__ import annotations

import os
import signal

_POINTS = frozenset(p.strip() for p in os.environ.get("FILESTORE_CRASH_AT", "").split(",") if p.strip())


def crash_point(name: str) -> None:
    if _POINTS and name in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)
