"""Policies in the database: read, compiled, and changed as journaled commands (D42).

Every change is one transaction: the rule row(s), the policy generation +1, and a journal row
(`policy.grant`, `policy.revoke`, `policy.protect`, `policy.unprotect`) with its principal, from
which the relay derives the change's `filestore.command.completed` event.
"""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg

from core.access import roles
from core.access.rules import SCOPES, Policy, Rule
from core.errors import ConfigError
from core.journal import records
from core.model import Principal
from core.storage.db import Database

COLUMNS = "id, kind, scope, subject_kind, subject, backend, prefix, action"


def parse_target(target: str) -> tuple[str, str]:
    """BACKEND:/PREFIX -> (backend, prefix without leading or trailing slash)."""
    backend, sep, rest = target.partition(":")
    if not sep or not backend:
        raise ConfigError(f"expected BACKEND:/PREFIX, got {target!r}")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"a policy prefix is a plain path: {target!r}")
    return backend, "/".join(parts)


def load(db: Database) -> Policy:
    with db.pool.connection() as conn, conn.transaction():
        version = conn.execute("SELECT version FROM filestore.access_version").fetchone()
        rows = conn.execute(f"SELECT {COLUMNS} FROM filestore.access_rules").fetchall()
    return Policy([Rule(*row) for row in rows], version[0] if version else 0)


def version(db: Database) -> int:
    row = db.query("SELECT version FROM filestore.access_version")
    return row[0][0] if row else 0


def _backend_id(conn, backend: str | None) -> int | None:
    if backend is None:
        return None
    row = conn.execute("SELECT id FROM filestore.backend_mounts WHERE name = %s AND state = 'active'",
                       (backend,)).fetchone()
    if row is None:
        raise ConfigError(f"no backend named {backend!r}")
    return row[0]


def _journal(conn, who: Principal, command: str, backend: str | None, prefix: str, args: dict,
             result: dict) -> None:
    conn.execute("UPDATE filestore.access_version SET version = version + 1")
    records.record_in(conn, [records.Record(records.Journal(
        command, "committed", who, uuid.uuid4(), _backend_id(conn, backend), None,
        prefix if backend is not None else None, args, result=result))])


def grant(db: Database, who: Principal, scope: str, subject_kind: str, subject: str | None,
          backend: str | None, prefix: str) -> Rule:
    _check_scope(scope)
    args = {"scope": scope, "subject_kind": subject_kind, "subject": subject, "backend": backend, "prefix": prefix}
    if subject_kind == "role" and prefix:
        raise ConfigError("a role's grant covers whole backends: --path BACKEND:/ (the database limits rows by backend)")
    with _changing(db) as conn:
        _backend_id(conn, backend)
        if subject_kind == "role":  # the database enforces the scope: membership of its group role
            roles.grant_scope(conn, subject, scope)
        row = conn.execute(
            "INSERT INTO filestore.access_rules (kind, scope, subject_kind, subject, backend, prefix)"
            " VALUES ('grant', %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
            f" RETURNING {COLUMNS}", (scope, subject_kind, subject, backend, prefix)).fetchone()
        if row is None:
            raise ConfigError("that grant exists already")
        rule = Rule(*row)
        _journal(conn, who, "policy.grant", backend, prefix, args, {"rule": rule.id})
    return rule


def revoke(db: Database, who: Principal, scope: str, subject_kind: str, subject: str | None,
           backend: str | None, prefix: str) -> Rule:
    _check_scope(scope)
    args = {"scope": scope, "subject_kind": subject_kind, "subject": subject, "backend": backend, "prefix": prefix}
    with _changing(db) as conn:
        row = conn.execute(
            "DELETE FROM filestore.access_rules WHERE kind = 'grant' AND scope = %s AND subject_kind = %s"
            " AND subject IS NOT DISTINCT FROM %s AND backend IS NOT DISTINCT FROM %s AND prefix = %s"
            f" RETURNING {COLUMNS}", (scope, subject_kind, subject, backend, prefix)).fetchone()
        if row is None:
            raise ConfigError("no such grant (see `filestore policy list`)")
        rule = Rule(*row)
        if subject_kind == "role" and not conn.execute(
                "SELECT 1 FROM filestore.access_rules WHERE kind = 'grant' AND subject_kind = 'role'"
                " AND subject = %s AND scope = %s", (subject, scope)).fetchone():
            roles.revoke_scope(conn, subject, scope)
        _journal(conn, who, "policy.revoke", backend, prefix, args, {"rule": rule.id})
    return rule


def protect(db: Database, who: Principal, backend: str, prefix: str, needs: dict[str, str | None]) -> list[Rule]:
    """Set (scope) or clear (None) the elevated scope that delete and move need at backend:/prefix."""
    changed: list[Rule] = []
    with _changing(db) as conn:
        _backend_id(conn, backend)
        for action, scope in needs.items():
            if scope is None:
                row = conn.execute(
                    "DELETE FROM filestore.access_rules WHERE kind = 'protect' AND backend = %s AND prefix = %s"
                    f" AND action = %s RETURNING {COLUMNS}", (backend, prefix, action)).fetchone()
            else:
                _check_scope(scope)
                row = conn.execute(
                    "INSERT INTO filestore.access_rules (kind, scope, backend, prefix, action)"
                    " VALUES ('protect', %s, %s, %s, %s)"
                    " ON CONFLICT (backend, prefix, action) WHERE kind = 'protect' DO UPDATE SET scope = excluded.scope"
                    f" RETURNING {COLUMNS}", (scope, backend, prefix, action)).fetchone()
            if row is not None:
                changed.append(Rule(*row))
        if not changed:
            raise ConfigError(f"no protection at {backend}:/{prefix} to remove")
        _journal(conn, who, "policy.protect", backend, prefix, {"backend": backend, "prefix": prefix, **needs},
                 {"rules": [r.id for r in changed]})
    return changed


@contextlib.contextmanager
def _changing(db: Database) -> Iterator[psycopg.Connection]:
    """One transaction for a policy change (a role without the right fails at its first
    statement: the CLI says so in one line)."""
    with db.pool.connection() as conn, conn.transaction():
        yield conn


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}")
