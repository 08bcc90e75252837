"""One progress display for the long admin commands (issue 17): a line redrawn on a terminal
(count, rate, elapsed, and the time left when the total is known), JSON lines with `--json` for
scripts, nothing otherwise."""
from __future__ import annotations

import json
import sys
import time

import click


class Progress:
    def __init__(self, what: str, *, json_lines: bool = False, interval: float = 0.5):
        self.what = what
        self.json_lines = json_lines
        self.show = not json_lines and sys.stderr.isatty()
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self.count = 0
        self.total: int | None = None
        self.note = ""

    def update(self, count: int, *, total: int | None = None, note: str = "") -> None:
        self.count, self.total, self.note = count, total, note
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def done(self) -> None:
        self._emit(final=True)
        if self.show:
            click.echo("", err=True)

    def _emit(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.count / elapsed
        left = (self.total - self.count) / rate if self.total and rate > 0 and not final else None
        if self.json_lines:
            click.echo(json.dumps({"progress": self.what, "count": self.count, "total": self.total,
                                   "rate_per_s": round(rate, 1), "elapsed_s": round(elapsed, 1),
                                   "left_s": None if left is None else round(left, 1), "done": final}))
        elif self.show:
            of = f" of {self.total:,}" if self.total else ""
            eta = f", {_clock(left)} left" if left is not None else ""
            note = f" ({self.note})" if self.note and not final else ""
            click.echo(f"\r{self.what}: {self.count:,}{of}, {rate:,.0f}/s, {_clock(elapsed)}{eta}{note}\033[K",
                       nl=False, err=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02}"
