"""Threshold watches on directory totals (`filestore watch`; docs/architecture.md D41).

A watch names a directory, a metric of its rollup (recursive bytes or files) and a threshold.
Its side (value >= threshold) is set when it is added, from the exact totals; from then on the
rollup folds check it in their own transaction (trigger filestore.watch_crossings): a fold
that moves the folded value to the other side flips it and records one `threshold.crossed`
journal row, from which the relay derives a `filestore.threshold.crossed` event. So an event
comes at most once per crossing, in either direction, and none while the value stays on one
side however often it changes.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from core.errors import ConfigError, FsError
from core.journal import history
from core.storage.db import Database

METRICS = {"bytes": "size_bytes", "files": "file_count"}


@dataclass
class Watch:
    id: int
    backend: str
    path: str
    node_id: int
    metric: str
    threshold: int
    above: bool
    value: int
    crossings: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def add(db: Database, backend: str, rel: bytes, metric: str, threshold: int) -> Watch:
    node_id = history.resolve(db, backend, rel)
    kind = db.query("SELECT kind FROM filestore.nodes WHERE id = %s", (node_id,))[0][0]
    if kind != "dir":
        raise FsError(errno.ENOTDIR, f"{backend}:/{rel.decode(errors='replace')}: a watch is on a directory")
    column = METRICS[metric]
    (watch_id,) = db.query(
        f"INSERT INTO filestore.watches (node_id, backend_id, metric, threshold, above)"
        f" SELECT %(node)s, n.backend_id, %(metric)s, %(threshold)s, t.{column} >= %(threshold)s"
        f"   FROM filestore.nodes n, filestore.rollup_totals(%(node)s) t WHERE n.id = %(node)s RETURNING id",
        {"node": node_id, "metric": column, "threshold": threshold})[0]
    return listed(db, watch_id)[0]


_LIST = """
SELECT w.id, b.name, filestore.node_path(w.node_id), w.node_id, w.metric, w.threshold, w.above,
       CASE w.metric WHEN 'size_bytes' THEN t.size_bytes ELSE t.file_count END, w.crossings
  FROM filestore.watches w JOIN filestore.backend_mounts b ON b.id = w.backend_id
  CROSS JOIN LATERAL filestore.rollup_totals(w.node_id) t
 WHERE %(id)s::int IS NULL OR w.id = %(id)s
 ORDER BY w.id
"""


def listed(db: Database, watch_id: int | None = None) -> list[Watch]:
    return [Watch(*row) for row in db.query(_LIST, {"id": watch_id})]


def remove(db: Database, watch_id: int) -> None:
    if not db.query("DELETE FROM filestore.watches WHERE id = %s RETURNING id", (watch_id,)):
        raise ConfigError(f"no watch {watch_id}")
