"""Mounts and sidecars register in `filestore.processes` and beat a heartbeat (for `filestore status`)."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from core.storage.db import Database

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0


class Registration:
    def __init__(self, db: Database, role: str, home: str, *, mountpoint: str | None = None,
                 info: Callable[[], dict[str, Any]] = dict):
        self.db = db
        self.id = uuid.uuid4()
        self.info = info
        self._stop = threading.Event()
        db.query("INSERT INTO filestore.processes (id, role, host, pid, home, mountpoint, info)"
                 " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING 1",
                 (self.id, role, socket.gethostname(), os.getpid(), home, mountpoint, json.dumps(info())))
        self._thread = threading.Thread(target=self._beat, name="filestore-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.db.query("UPDATE filestore.processes SET heartbeat_at = now(), info = %s WHERE id = %s"
                              " RETURNING 1", (json.dumps(self.info(), default=str), self.id))
            except Exception as exc:  # the database is away: status will show a stale heartbeat
                log.debug("heartbeat failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(HEARTBEAT_SECONDS)
        try:
            self.db.query("UPDATE filestore.processes SET stopped_at = now(), heartbeat_at = now(), info = %s"
                          " WHERE id = %s RETURNING 1", (json.dumps(self.info(), default=str), self.id))
        except Exception as exc:
            log.warning("could not record the stop: %s", exc)
