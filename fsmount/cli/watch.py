"""`filestore watch add|ls|remove`: an event when a directory's totals cross a threshold (D41)."""
from __future__ import annotations

import click

from core.journal import history as journal_queries
from core.rollups import watches
from core.service import open_database

from ..mounts import filestore_mounts
from . import emit_json, main, one_line_errors, settings


@main.group("watch")
def watch_group() -> None:
    """Thresholds on directory totals: a filestore.threshold.crossed event at each crossing."""


@watch_group.command("add")
@click.argument("path")
@click.option("--bytes", "size", type=click.IntRange(0), default=None, help="Threshold on the recursive size in bytes.")
@click.option("--files", type=click.IntRange(0), default=None, help="Threshold on the recursive number of files.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def watch_add(path: str, size: int | None, files: int | None, as_json: bool) -> None:
    """Watch a directory: an event when its total goes to or over N, and when it goes back under.

    Example: filestore watch add /mnt/filestore/projects/releases --bytes 10000000000
    """
    if (size is None) == (files is None):
        raise click.UsageError("give one of --bytes N or --files N")
    db = open_database(settings())
    backend, rel = journal_queries.split_target(path, filestore_mounts())
    watch = watches.add(db, backend, rel, "bytes" if size is not None else "files",
                        size if size is not None else files)
    if as_json:
        emit_json(watch.as_dict())
        return
    click.echo(f"watch {watch.id}: {watch.backend}:/{watch.path} {watch.metric} >= {watch.threshold}"
               f" (now {watch.value}: {'over' if watch.above else 'under'})")


@watch_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def watch_ls(as_json: bool) -> None:
    """The watches, with each directory's value now and how often it crossed.

    Example: filestore watch ls --json
    """
    rows = watches.listed(open_database(settings()))
    if as_json:
        emit_json([w.as_dict() for w in rows])
        return
    for w in rows:
        click.echo(f"{w.id:>4}  {w.backend}:/{w.path}  {w.metric} >= {w.threshold}  now {w.value}"
                   f" ({'over' if w.above else 'under'}), {w.crossings} crossings")


@watch_group.command("remove")
@click.argument("watch_id", type=int)
@one_line_errors
def watch_remove(watch_id: int) -> None:
    """Stop watching (by the id `watch ls` shows).

    Example: filestore watch remove 3
    """
    watches.remove(open_database(settings()), watch_id)
