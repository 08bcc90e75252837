"""Reference event consumers (docs/consumers.md), each switched on by configuration."""
from __future__ import annotations

from core.events.consumers.base import Checkpoint, Consumer, JournalSource, RedisStreamSource, fresh, source_for
from core.events.settings import EventSettings
from core.storage.db import Database

__all__ = ["Checkpoint", "Consumer", "JournalSource", "RedisStreamSource", "fresh", "source_for", "enabled"]


def enabled(db: Database, conf: EventSettings) -> list[tuple[str, Consumer]]:
    """(name, consumer) for each reference consumer the configuration switches on."""
    out: list[tuple[str, Consumer]] = []
    backfill = None if conf.inline else JournalSource(db)
    if conf.metadata_sync:
        from core.events.consumers.metadata_sync import MetadataSync
        out.append(("metadata-sync", Consumer(MetadataSync(conf.metadata_sync_path), source_for(conf, db),
                                              backfill=backfill)))
    if conf.activity:
        from core.events.consumers.activity import Activity
        out.append(("activity", Consumer(Activity(conf.activity_path), source_for(conf, db), backfill=backfill)))
    return out
