"""Wiring: one `Filestore` per process holds the database, the tree view and the commands."""
from __future__ import annotations

import logging

from . import backends, embedded_pg, recovery, schema, store
from .config import Settings
from .db import Database, connect
from .errors import ConfigError
from .files import FileTable
from .intents import IntentLog
from .namespace import Namespace
from .orchestrator import Orchestrator

log = logging.getLogger(__name__)


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded_pg.ensure_running(settings.pgdata)


def open_database(settings: Settings, *, apply_schema: bool = True) -> Database:
    """Connect (starting the embedded server if that is the configuration) and migrate."""
    settings.ensure_dirs()
    url = database_url(settings)
    with connect(url) as conn:
        if apply_schema:
            schema.apply(conn)
        elif schema.current_version(conn) is None:
            raise ConfigError("the database has no filestore schema; run `filestore init`")
    db = Database(url)
    if settings.backends_path is not None:
        backends.apply_config_file(db, settings.backends_path)
    return db


class Filestore:
    """Everything a mount (or the sidecar) needs to run commands against the tracked trees."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = open_database(settings)
        self.ns = Namespace(self.db)
        self.intents = IntentLog(settings.intents_path, before_compact=self.db.flush_wal)
        self.orch = Orchestrator(self.db, self.ns, self.intents)
        self.files = FileTable(self.orch, self.ns)
        self.orch.heal = lambda intent: recovery.heal(self, intent)
        self.unavailable: dict[str, str] = {}
        self.reload_backends()

    def reload_backends(self) -> None:
        current = {b.id: b for b in self.ns.backends.values()}
        fresh = []
        for backend in store.load_backends(self.db):
            if "import" in (backend.options or {}):
                # An import cut off midway: a partial tree is not served; `backend add` resumes it.
                self.unavailable[backend.name] = "import not finished"
                continue
            known = current.get(backend.id)
            if known is not None and known.executor is not None:
                backend.executor = known.executor
            else:
                try:
                    backend.executor = backends.make_executor(backend, self.settings.home)
                except Exception as exc:  # a missing root must not take the other backends down
                    self.unavailable[backend.name] = str(exc)
                    log.error("backend %s unavailable: %s", backend.name, exc)
                    continue
            self.unavailable.pop(backend.name, None)
            fresh.append(backend)
        self.ns.set_backends(fresh)

    def close(self) -> None:
        for backend in self.ns.backends.values():
            if backend.executor is not None:
                backend.executor.close()
        self.intents.close()
        self.db.close()
