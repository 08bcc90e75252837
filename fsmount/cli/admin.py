"""`filestore init`, `history`, `journal`, `db stop`."""
from __future__ import annotations

import os

import click

from core.access import principals
from core.access import roles as access_roles
from core.journal import history as journal_queries
from core.service import database_url, open_database
from core.storage import embedded_pg, schema
from core.storage.db import connect

from ..mount import filestore_mounts
from . import emit_json, main, one_line_errors, settings


@main.command()
@one_line_errors
def init() -> None:
    """Create or upgrade the database schema (also done automatically at start).

    Example: DATABASE_URL=postgresql://db/filestore filestore init
    """
    conf = settings()
    conf.ensure_dirs()
    with connect(database_url(conf)) as conn:
        version = schema.apply(conn)
        made = access_roles.ensure_or_say(conn)
    click.echo(f"schema at version {version}")
    click.echo(made, err=True)  # stdout stays one line for scripts


def _row_text(row: dict) -> str:
    who = row["actor"] if row["uid"] is None else f"{row['actor']} uid={row['uid']} gid={row['gid']} pid={row['pid']}"
    detail = ""
    if row["status"] == "failed":
        detail = f"  [{row['error']}]"
    elif row["command"] == "write":
        detail = f"  {row['args'].get('bytes', 0)} bytes ({row['args'].get('mode')})"
    elif row["command"] == "rename":
        detail = f"  -> {row['args'].get('to')}"
    elif row["command"] in ("drift", "reconcile") and row["args"]:
        detail = f"  {row['args'].get('outcome') or 'found'}"
    if row.get("state") and row["state"] != "ACTIVE":
        detail += f"  -> {row['state']}"
    when = row["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{row['id']:>8}  {when}  {row['command']:<10} {row['status']:<9} {row['path'] or '':<40} {who}{detail}"


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def history(path: str, as_json: bool) -> None:
    """The journal of one node: PATH inside a mount, or BACKEND:/PATH.

    Example: filestore history /mnt/filestore/projects/report.txt
    """
    db = open_database(settings())
    backend, rel = journal_queries.split_target(path, filestore_mounts())
    node_id = journal_queries.resolve_any(db, backend, rel)
    rows = journal_queries.history(db, node_id)
    state = journal_queries.node_state(db, node_id)
    if as_json:
        emit_json({"node_id": node_id, "backend": backend, "path": os.fsdecode(rel), "state": state,
                   "entries": rows})
        return
    click.echo(f"node {node_id} ({backend}:/{os.fsdecode(rel)}) {state}")
    for row in rows:
        click.echo(_row_text(row))


@main.command()
@click.option("--since", type=int, default=None, help="Entries after this journal id.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--user", "user", help="Only the commands of this user (name or uid).")
@click.option("--group", "group", help="Only the commands of this group (name or gid: the caller's gid).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def journal(since: int | None, limit: int, user: str | None, group: str | None, as_json: bool) -> None:
    """The journal: the most recent entries, or those after --since.

    Example: filestore journal --since 1200 --limit 100 --json; filestore journal --user ingest
    """
    db = open_database(settings())
    rows = journal_queries.recent(db, since, limit, uid=principals.user_id(user) if user else None,
                                  gid=principals.group_id(group) if group else None)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(_row_text(row))


@main.group()
def db() -> None:
    """The embedded PostgreSQL (used when DATABASE_URL is unset)."""


@db.command("stop")
@one_line_errors
def db_stop() -> None:
    """Stop the embedded PostgreSQL of this FILESTORE_HOME.

    Example: FILESTORE_HOME=~/fs filestore db stop
    """
    conf = settings()
    if conf.database_url:
        click.echo("DATABASE_URL is set: there is no embedded server to stop")
        return
    stopped = embedded_pg.stop(conf.pgdata)
    click.echo("stopped the embedded PostgreSQL" if stopped else "the embedded PostgreSQL was not running")

