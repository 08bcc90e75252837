"""One progress display for the long admin commands (issue 17). Core computes each Step (count,
total or estimate, rate, time left: core.observe.progress); this only draws it: a line redrawn on a
terminal (stderr), JSON lines on stdout with `--json` (for scripts: every line of a command run
with `--json` is one JSON document, the progress ones with a "progress" key, the result last),
nothing otherwise."""
from __future__ import annotations

import json
import sys
import time

import click

from core.observe.progress import Step


class Progress:
    """A core.observe.progress callback. Steps are drawn at most every `interval` seconds; the last one
    (done) always, and so is a step that starts something with nothing counted (a new note at
    the same count: a long statement begins)."""

    def __init__(self, *, json_lines: bool = False, interval: float = 0.5):
        self.json_lines = json_lines
        self.show = not json_lines and sys.stderr.isatty()
        self.interval = interval
        self._last = 0.0
        self._drawn: tuple[int, str] | None = None  # count and note of the last step drawn

    def __call__(self, step: Step) -> None:
        now = time.monotonic()
        phase = self._drawn is not None and self._drawn == (step.count, self._drawn[1]) and step.note != self._drawn[1]
        if not step.done and not phase and now - self._last < self.interval:
            return
        self._last, self._drawn = now, (step.count, step.note)
        if self.json_lines:
            click.echo(json.dumps(step.as_json()))
        elif self.show:
            click.echo(f"\r{_line(step)}\033[K", nl=step.done, err=True)


def _line(step: Step) -> str:
    of = ""
    if step.total is not None:
        of = f" of {'about ' if step.estimated else ''}{step.total:,}"
    left = f", {'about ' if step.estimated else ''}{_clock(step.left_s)} left" if step.left_s is not None else ""
    note = f" ({step.note})" if step.note and not step.done else ""
    return f"{step.what}: {step.count:,}{of}, {step.rate_per_s:,.0f}/s, {_clock(step.elapsed_s)}{left}{note}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02}"
