"""The event loops a process runs in the background: the relay and the enabled consumers.

The sidecar runs them (each has `run(stop)`); in inline mode (REDIS_URL=inline) the mount
runs them in daemon threads, started after recovery and stopped after the unmount.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field

from core.events.settings import EventSettings
from core.events.settings import load as load_event_settings

log = logging.getLogger(__name__)

IN_MOUNT_POLL_SECONDS = 0.5
# Each relay read costs the mount ~0.4 ms of CPU (measured): in a burst, read at most 20 times a second.
IN_MOUNT_COALESCE_SECONDS = 0.05


@dataclass
class Loops:
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    wakers: list = field(default_factory=list)

    def start(self, name: str, target) -> None:
        thread = threading.Thread(target=target, args=(self.stop_event,), name=f"filestore-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for wake in self.wakers:
            wake()
        for thread in self.threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s did not stop within %.0fs", thread.name, timeout)


def loops_for(fs, conf: EventSettings | None = None, *, relay: bool = True) -> list[tuple[str, object]]:
    """(name, object with run(stop)) for the relay and every consumer the configuration switches on.

    The sidecar calls this with the defaults; several sidecars may each run all of them (the
    relays share the work through their lock, see core.events.relay)."""
    from core.events.relay import Relay

    conf = conf or load_event_settings(fs.settings)
    out: list[tuple[str, object]] = []
    if relay:
        out.append(("relay", Relay(fs.db, conf=conf, settings=fs.settings)))
    from core.events import consumers
    out += consumers.enabled(fs.db, conf)
    return out


def start_in_mount(fs) -> Loops:
    """Inline mode: the mount is the only process, so it runs the loops itself."""
    loops = Loops()
    conf = load_event_settings(fs.settings)
    if not conf.inline:
        return loops  # with Redis the sidecar runs them
    # This process's own commits wake the relay; polling only catches other writers (the CLI),
    # and a poll costs the mount ~0.3 ms of CPU: 40 a second was a fifth of the relay's cost.
    conf = dataclasses.replace(conf, poll_seconds=max(conf.poll_seconds, IN_MOUNT_POLL_SECONDS))
    for name, loop in loops_for(fs, conf, relay=conf.relay_in_mount):
        if hasattr(loop, "coalesce_seconds"):
            loop.coalesce_seconds = IN_MOUNT_COALESCE_SECONDS
        if hasattr(loop, "wake"):
            fs.pipeline.listeners.append(loop)  # AfterCommit: this process's commits wake it
            loops.wakers.append(loop.wake)
        loops.start(name, loop.run)
    return loops

