"""Configuration of the event relay and the reference consumers (environment variables).

Kept apart from core.config so the relay's knobs stay in one place; docs/consumers.md lists them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.config import Settings


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "on", "yes", "true")


@dataclass(frozen=True)
class EventSettings:
    redis_url: str  # "inline": in-process publisher, consumers read the journal directly
    channel: str  # pub/sub channel
    stream: str  # Redis stream key (consumers that resume read it)
    stream_maxlen: int  # approximate cap of the stream
    poll_seconds: float  # how often an idle relay looks at the journal
    batch_rows: int  # journal rows per relay batch
    relay_in_mount: bool  # inline mode: the mount runs the relay in-process
    metadata_sync: bool
    metadata_sync_path: Path
    activity: bool
    activity_path: Path

    @property
    def inline(self) -> bool:
        return self.redis_url == "inline"

    @property
    def position_key(self) -> str:
        """The relay position row: the stream key, or inline:<channel> without Redis."""
        return f"inline:{self.channel}" if self.inline else self.stream


def load(settings: Settings, env: dict[str, str] | None = None) -> EventSettings:
    env = os.environ if env is None else env
    consumers = settings.home / "consumers"
    return EventSettings(
        redis_url=settings.redis_url,
        channel=settings.event_channel,
        stream=env.get("FILESTORE_EVENT_STREAM") or "filestore:events",
        stream_maxlen=int(env.get("FILESTORE_EVENT_STREAM_MAXLEN") or 1_000_000),
        poll_seconds=float(env.get("FILESTORE_RELAY_POLL_SECONDS") or 0.025),
        batch_rows=int(env.get("FILESTORE_RELAY_BATCH") or 500),
        relay_in_mount=_flag(env.get("FILESTORE_RELAY_IN_MOUNT"), True),
        metadata_sync=_flag(env.get("FILESTORE_METADATA_SYNC"), False),
        metadata_sync_path=Path(env.get("FILESTORE_METADATA_SYNC_PATH") or consumers / "metadata-sync.sqlite3"),
        activity=_flag(env.get("FILESTORE_ACTIVITY"), False),
        activity_path=Path(env.get("FILESTORE_ACTIVITY_PATH") or consumers / "activity.duckdb"),
    )
