"""`filestore backend add|list|remove`."""
from __future__ import annotations

import sys

import click

from core import backends
from core.service import open_database

from . import emit_json, main, one_line_errors, settings


@main.group()
def backend() -> None:
    """Manage the tracked trees (each appears in the mount as /NAME)."""


@backend.command("add")
@click.argument("name")
@click.argument("path")
@click.option("--read-only", is_flag=True, help="Every change through the mount answers EROFS.")
@one_line_errors
def add(name: str, path: str, read_only: bool) -> None:
    """Track the directory PATH as backend NAME, importing what it already holds.

    Example: filestore backend add projects /srv/projects
    """
    db = open_database(settings())
    show = sys.stderr.isatty()

    def progress(count: int) -> None:
        if show:
            click.echo(f"\rimported {count} entries", nl=False, err=True)

    added = backends.add(db, name, path, read_only=read_only, progress=progress)
    if show:
        click.echo("", err=True)
    click.echo(f"added backend {added.name} -> {added.root}{' (read-only)' if read_only else ''}")


@backend.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def list_(as_json: bool) -> None:
    """List the tracked backends.

    Example: filestore backend list --json
    """
    db = open_database(settings())
    found = backends.list_backends(db)
    if as_json:
        emit_json([{"id": b.id, "name": b.name, "kind": b.kind, "root": b.root, "read_only": b.read_only,
                    "root_node_id": b.root_node_id} for b in found])
        return
    if not found:
        click.echo("no backends; add one with `filestore backend add NAME PATH`")
    for b in found:
        click.echo(f"{b.name:20} {b.kind:6} {'ro' if b.read_only else 'rw'}  {b.root}")


@backend.command("remove")
@click.argument("name")
@one_line_errors
def remove(name: str) -> None:
    """Stop tracking backend NAME (its files stay where they are; its history stays).

    Example: filestore backend remove projects
    """
    db = open_database(settings())
    backends.remove(db, name)
    click.echo(f"removed backend {name}")
