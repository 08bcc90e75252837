"""Applies schema.sql idempotently and records its version."""
from __future__ import annotations

from pathlib import Path

import psycopg

SCHEMA_VERSION = 9  # 6: filestore.uploads (S3 write-back, D34); 7: record_commands (group commit, D36);
# 8: counters by directory node id, snapshot-window folds, drift index (D40);
# 9: the journal hash chain (chain_prev, hash, its triggers and lock) and the time-travel indexes (D41)
_LOCK_KEY = 0x46494C45  # "FILE": serialises concurrent starts


def schema_sql() -> str:
    core = Path(__file__).resolve().parent.parent
    for candidate in (core.parent / "schema.sql", core / "schema.sql"):
        if candidate.exists():
            return candidate.read_text()
    raise FileNotFoundError("schema.sql not found next to the core package")


def apply(conn: psycopg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; safe to call from many processes at once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(schema_sql())
        conn.execute(
            "INSERT INTO filestore.schema_versions (version) VALUES (%s) ON CONFLICT DO NOTHING",
            (SCHEMA_VERSION,))
    return SCHEMA_VERSION


def current_version(conn: psycopg.Connection) -> int | None:
    row = conn.execute(
        "SELECT to_regclass('filestore.schema_versions') IS NOT NULL").fetchone()
    if not row[0]:
        return None
    return conn.execute("SELECT max(version) FROM filestore.schema_versions").fetchone()[0]
