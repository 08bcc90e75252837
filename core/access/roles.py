"""Database roles for the scopes (D42): the database enforces them too, whatever our code does.

`filestore init` makes three group roles and their GRANTs (run it again after an upgrade: GRANTs
name the tables that exist when it runs):
- filestore_read: read every table (row-level security limits a role that role grants limit to
  some backends: schema.sql, filestore.backend_visible);
- filestore_write: read, plus change the tree's tables (nodes, journal rows appended only,
  rollups, counters, jobs...): what mounts, sidecars and repair commands write;
- filestore_admin: write, plus backends and access policies.
`filestore role create NAME --scope S [--backend B]` makes a login role that is a member of one
of them, with a role grant per backend (journaled, core.access.store) that limits what it sees.
"""
from __future__ import annotations

import psycopg
from psycopg import sql

from core.errors import ConfigError

GROUPS = {"read": "filestore_read", "write": "filestore_write", "admin": "filestore_admin"}
ADMIN_TABLES = ("backend_mounts", "access_rules", "access_version")


def ensure(conn: psycopg.Connection) -> None:
    """Create the group roles if missing and (re)grant what each may do; needs CREATEROLE."""
    with conn.transaction():
        for role in GROUPS.values():
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute("GRANT filestore_read TO filestore_write")
        conn.execute("GRANT filestore_write TO filestore_admin")
        conn.execute("GRANT USAGE ON SCHEMA filestore TO filestore_read")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA filestore TO filestore_read")
        conn.execute("GRANT SELECT ON ALL SEQUENCES IN SCHEMA filestore TO filestore_read")
        conn.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA filestore TO filestore_read")
        conn.execute("GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA filestore TO filestore_write")
        conn.execute("GRANT USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA filestore TO filestore_write")
        admin_only = sql.SQL(", ").join(sql.Identifier("filestore", t) for t in ADMIN_TABLES)
        conn.execute(sql.SQL("REVOKE INSERT, UPDATE, DELETE ON {} FROM filestore_write").format(admin_only))
        conn.execute("REVOKE UPDATE, DELETE ON filestore.journal_entries FROM filestore_write")  # append-only
        conn.execute(sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO filestore_admin").format(admin_only))


def ensure_or_say(conn: psycopg.Connection) -> str:
    """For `filestore init`: the roles made, or why not (an owner without CREATEROLE still
    gets its schema)."""
    try:
        ensure(conn)
    except psycopg.errors.InsufficientPrivilege as exc:
        return f"roles not made ({str(exc).strip().splitlines()[0]}): run `filestore init` as a role with CREATEROLE"
    return "roles " + ", ".join(GROUPS.values()) + " ready"


def create_login(conn: psycopg.Connection, name: str, scope: str, password: str | None) -> bool:
    """A login role (made if missing: True) that is a member of the scope's group role."""
    with conn.transaction():
        made = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None
        if made:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        grant_scope(conn, name, scope)
    return made


def grant_scope(conn: psycopg.Connection, role: str, scope: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (GROUPS[scope],)).fetchone() is None:
        raise ConfigError(f"role {GROUPS[scope]} does not exist: run `filestore init` first")
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        raise ConfigError(f"no PostgreSQL role named {role!r} (make one with `filestore role create`)")
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(GROUPS[scope]), sql.Identifier(role)))


def revoke_scope(conn: psycopg.Connection, role: str, scope: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None:
        conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(GROUPS[scope]), sql.Identifier(role)))
