"""Applies schema.sql idempotently and records its version."""
from __future__ import annotations

from pathlib import Path

import psycopg

from core.errors import ConfigError

SCHEMA_VERSION = 13  # 6: filestore.uploads (S3 write-back, D34); 7: record_commands (group commit, D36);
# 8: counters by directory node id, snapshot-window folds, drift index (D40); 9: name_adoptions (D43);
# 10: access_rules and access_version (policies: principals, scopes, path allow-lists, D42);
# 11: the journal hash chain (chain_prev, hash, its triggers and lock) and the time-travel indexes (D41);
# 12: the chain's row hash functions STABLE, so that the row trigger inlines them;
# 13: entries.is_dir and its partial index (directory link counts without probing every child)
_LOCK_KEY = 0x46494C45  # "FILE": serialises concurrent starts


def schema_sql() -> str:
    core = Path(__file__).resolve().parent.parent
    for candidate in (core.parent / "schema.sql", core / "schema.sql"):
        if candidate.exists():
            return candidate.read_text()
    raise FileNotFoundError("schema.sql not found next to the core package")


def apply(conn: psycopg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; safe to call from many processes at once.
    A role that does not own the schema (`filestore role create`, D42) uses it as it is."""
    if not _owns_schema(conn):
        version = current_version(conn)
        if version is None or version < SCHEMA_VERSION:
            raise ConfigError(f"the schema is at version {version}, this code needs {SCHEMA_VERSION}: "
                              f"run `filestore init` as its owner")
        return version
    version = current_version(conn)
    if version is not None and version >= SCHEMA_VERSION:
        # Up to date (or newer): no DDL. schema.sql's DDL takes locks that an admin command run
        # beside a live mount deadlocked on (`filestore history` against a mount's group commit),
        # so every change to schema.sql comes with a new SCHEMA_VERSION.
        return version
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(schema_sql())
        conn.execute(
            "INSERT INTO filestore.schema_versions (version) VALUES (%s) ON CONFLICT DO NOTHING",
            (SCHEMA_VERSION,))
    return SCHEMA_VERSION


def _owns_schema(conn: psycopg.Connection) -> bool:
    """True for the schema's owner (or a member of it, or a superuser), and before it exists."""
    row = conn.execute("SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace"
                       " WHERE nspname = 'filestore'").fetchone()
    return row is None or row[0]


def current_version(conn: psycopg.Connection) -> int | None:
    row = conn.execute(
        "SELECT to_regclass('filestore.schema_versions') IS NOT NULL").fetchone()
    if not row[0]:
        return None
    return conn.execute("SELECT max(version) FROM filestore.schema_versions").fetchone()[0]
