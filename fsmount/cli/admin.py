"""`filestore init`, `history`, `journal`, `db stop`."""
from __future__ import annotations

import os

import click

from core.access import principals
from core.access import roles as access_roles
from core.journal import history as journal_queries
from core.journal import timetravel
from core.service import database_url, open_database
from core.storage import embedded_pg, schema
from core.storage.db import connect

from ..mounts import filestore_mounts
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
@click.option("--user", default=None, help="Only what this user did (a name or a numeric uid).")
@click.option("--since", default=None, metavar="TIME", help="From this time on (ISO 8601, an age such as 2h or 3d, or @JOURNAL_ID).")
@click.option("--until", default=None, metavar="TIME", help="Up to this time (same forms as --since).")
@click.option("--type", "types", multiple=True, metavar="COMMAND", help="Only these commands (repeatable): create, write, rename, unlink, setattr, ...")
@click.option("--recursive", "-r", is_flag=True, help="Everything under PATH (by the path each command ran on), not one node.")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def history(path: str, user: str | None, since: str | None, until: str | None, types: tuple[str, ...],
            recursive: bool, limit: int, as_json: bool) -> None:
    """The journal of one node, or of a subtree with --recursive: PATH inside a mount, or BACKEND:/PATH.

    Examples: filestore history /mnt/filestore/projects/report.txt;
    filestore history -r --user alice --since 1d --type write projects:/releases
    """
    db = open_database(settings())
    backend, rel = journal_queries.split_target(path, filestore_mounts())
    # Filters (schema 11, D41): TIMEs are read by the one parser of core.journal.timetravel.
    wanted = timetravel.HistoryFilter(
        since=timetravel.resolve_time(db, since) if since is not None else None,
        until=timetravel.resolve_time(db, until) if until is not None else None,
        uid=timetravel.uid_of(user) if user is not None else None, commands=types, limit=limit)
    if wanted.since is not None and since is not None and not since.startswith("@"):
        wanted.since += 1  # a date or an age: the rows written after it
    if recursive:
        rows = timetravel.subtree_history(db, backend, rel, wanted)
        if as_json:
            emit_json({"backend": backend, "path": os.fsdecode(rel), "recursive": True, "entries": rows})
            return
        for row in rows:
            click.echo(_row_text(row))
        return
    node_id = journal_queries.resolve_any(db, backend, rel)
    rows = timetravel.node_history(db, node_id, wanted)
    state = journal_queries.node_state(db, node_id)
    if as_json:
        emit_json({"node_id": node_id, "backend": backend, "path": os.fsdecode(rel), "state": state,
                   "entries": rows})
        return
    click.echo(f"node {node_id} ({backend}:/{os.fsdecode(rel)}) {state}")
    for row in rows:
        click.echo(_row_text(row))


# A group since schema 11 (its subcommand `verify` lives in timetravel.py); alone it lists as before.
@main.group(invoke_without_command=True)
@click.option("--since", type=int, default=None, help="Entries after this journal id.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--user", "user", help="Only the commands of this user (name or uid).")
@click.option("--group", "group", help="Only the commands of this group (name or gid: the caller's gid).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
@one_line_errors
def journal(ctx: click.Context, since: int | None, limit: int, user: str | None, group: str | None,
            as_json: bool) -> None:
    """The journal: the most recent entries, or those after --since; `journal verify` checks its hash chain.

    Example: filestore journal --since 1200 --limit 100 --json; filestore journal --user ingest
    """
    if ctx.invoked_subcommand is not None:
        return
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

