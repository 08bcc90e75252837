"""`filestore role create`: a PostgreSQL login role for one scope, limited to some backends (D42)."""
from __future__ import annotations

import click

from core.access import roles, store
from core.access.gate import announce
from core.access.rules import SCOPES
from core.model import Principal
from core.service import database_url, open_database
from core.storage.db import connect

from . import main, one_line_errors, settings


@main.group()
def role() -> None:
    """PostgreSQL roles for the CLI and sidecars: the database enforces their scope (GRANTs) and
    the backends they see (row-level security). `filestore init` makes the group roles."""


@role.command("create")
@click.argument("name")
@click.option("--scope", required=True, type=click.Choice(SCOPES),
              help="read: look only; write: change trees (mounts, sidecars, repairs); admin: also backends and policies.")
@click.option("--backend", "backends", multiple=True, help="Only these backends are visible to it (repeatable).")
@click.option("--password", help="A password to log in with (else the server's other methods).")
@one_line_errors
def create(name: str, scope: str, backends: tuple[str, ...], password: str | None) -> None:
    """Make (or extend) login role NAME with SCOPE; with --backend, it sees only those backends'
    rows in journal, history, du and stats (each a journaled role grant, `policy list` shows it).

    Example: filestore role create ops --scope read --backend projects
    """
    conf = settings()
    db = open_database(conf)
    with connect(database_url(conf)) as conn:
        made = roles.create_login(conn, name, scope, password)
    for backend in backends:
        store.grant(db, Principal.current_process(), scope, "role", name, backend, "")
    if backends:
        announce(conf.redis_url)
    click.echo(f"{'created' if made else 'updated'} role {name}: member of {roles.GROUPS[scope]}"
               + (f", limited to {', '.join(backends)}" if backends else ""))
