"""`filestore backend add|list|remove`."""
from __future__ import annotations

import json

import click

from core.service import open_database
from core.storage import backends

from . import emit_json, main, one_line_errors, settings
from .progress import Progress


@main.group()
def backend() -> None:
    """Manage the tracked trees (each appears in the mount as /NAME)."""


@backend.command("add")
@click.argument("name")
@click.argument("path")
@click.option("--read-only", is_flag=True, help="Every change through the mount answers EROFS.")
@click.option("--endpoint-url", help="S3 only: an S3-compatible endpoint (default: AWS).")
@click.option("--region", help="S3 only: the bucket's region (default: the usual boto3 configuration).")
@click.option("--xattrs", is_flag=True,
              help="Keep extended attributes (user.*, and the user.filestore.* rollup fields) on this backend; "
                   "a mount with such a backend answers xattr probes, which costs `ls -l` a round trip per entry.")
@click.option("--observe-only", is_flag=True,
              help="Rollout phase 1: changes made behind Filestore's back are journaled and published as drift and "
                   "their nodes marked INCONSISTENT, never adopted until `filestore drift adopt PATH`.")
@click.option("--json", "json_progress", is_flag=True,
              help="Progress as JSON lines on stdout (count, total, rate, time left), then the result, for scripts.")
@one_line_errors
def add(name: str, path: str, read_only: bool, endpoint_url: str | None, region: str | None, xattrs: bool,
        observe_only: bool, json_progress: bool) -> None:
    """Track the directory PATH, or the S3 prefix s3://BUCKET/PREFIX, as backend NAME,
    importing what it already holds. S3 credentials come the usual boto3 way (environment,
    profile, instance role).

    Examples: filestore backend add projects /srv/projects;
    filestore backend add archive s3://bucket/archive --endpoint-url http://127.0.0.1:9000
    """
    if (endpoint_url or region) and not path.startswith("s3://"):
        raise click.UsageError("--endpoint-url and --region apply to s3:// backends only")
    db = open_database(settings())
    added = backends.add(db, name, path, read_only=read_only, progress=Progress(json_lines=json_progress),
                         options={"endpoint_url": endpoint_url, "region": region, "xattrs": xattrs or None,
                                  "observe_only": observe_only or None})
    if json_progress:
        click.echo(json.dumps({"added": added.name, "root": added.root, "read_only": read_only,
                               "observe_only": observe_only}))
        return
    click.echo(f"added backend {added.name} -> {added.root}{' (read-only)' if read_only else ''}"
               f"{' (observe-only)' if observe_only else ''}")


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
