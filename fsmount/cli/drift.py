"""`filestore drift ls|scan|purge|adopt`: changes made behind Filestore's back, seen and acted on."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import click

from core.journal import history as journal_queries
from core.model import Principal
from core.repair import drift
from core.service import open_database

from ..mounts import filestore_mounts
from . import emit_json, main, one_line_errors, settings
from .progress import Progress


def _target(path: str | None) -> tuple[str | None, bytes]:
    if path is None:
        return None, b""
    if ":" not in path and not path.startswith("/") and not os.path.exists(path):
        return path, b""  # a backend name
    return journal_queries.split_target(path, filestore_mounts())


@contextlib.contextmanager
def _acting_on(path: str) -> Iterator[tuple]:
    """(db, session, backend, rel) for a command that changes what PATH names."""
    conf = settings()
    db = open_database(conf, apply_schema=False)
    backend, rel = _target(path)
    if backend is None:
        raise click.UsageError("name a backend or a path")
    session = drift.Session(db, conf)
    try:
        yield db, session, backend, rel
    finally:
        session.close()


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _detail(d: drift.Drifted) -> str:
    observed, recorded = d.observed, d.recorded
    if d.state == drift.UNTRACKED:
        return f"not adopted (observe-only): {observed.get('kind')} of {observed.get('size')} bytes on the backend" \
            if observed else "not adopted (observe-only)"
    if observed is None and d.found_by is not None:
        return "gone from the backend" + (" (observe-only: not adopted)" if d.state == "INCONSISTENT" else "")
    if observed and recorded:
        changed = [k for k in ("kind", "size", "mode", "uid", "gid", "mtime_ns") if observed.get(k) != recorded.get(k)]
        return ", ".join(f"{k} {recorded.get(k)} -> {observed.get(k)}" for k in changed) or "attributes differ"
    return ""


@main.group("drift")
def drift_group() -> None:
    """Changes made behind Filestore's back: see them, purge what is gone, adopt what was observed."""


@drift_group.command("ls")
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def ls(path: str | None, as_json: bool) -> None:
    """Nodes not ACTIVE at or under PATH (a path in a mount, BACKEND:/PATH or BACKEND; every
    backend by default): INCONSISTENT (drift seen, not adopted), MISSING (gone from the
    backend) and UNTRACKED (made behind Filestore's back on an observe-only backend), with
    when and by whom (watcher, audit) it was found.

    Example: filestore drift ls local:/projects --json
    """
    db = open_database(settings(), apply_schema=False)
    backend, rel = _target(path)
    found = drift.pending(db, backend, rel)
    if as_json:
        emit_json({"path": path, "drift": [d.as_json() for d in found]})
        return
    if not found:
        click.echo("no drift" + (f" under {path}" if path else ""))
        return
    for d in found:
        found_by = f"{_when(d.found_at)} by {d.found_by}" if d.found_by else f"since {_when(d.since)}"
        click.echo(f"{d.state:<12} {d.kind or '-':<8} {found_by:<32} {d.backend}:/{d.path}  {_detail(d)}".rstrip())


@drift_group.command("purge")
@click.argument("path")
@one_line_errors
def purge(path: str) -> None:
    """Confirm that what is MISSING at or under PATH is gone for good: MISSING -> DELETED
    (a MISSING directory with its subtree), journaled as `purge`; the history stays.

    Example: filestore drift purge local:/old-reports
    """
    with _acting_on(path) as (db, session, backend, rel):
        purged = drift.purge(db, session.pipeline, backend, rel, Principal.current_process())
    for d in purged:
        click.echo(f"purged {d.backend}:/{d.path} (node {d.node_id})")
    click.echo(f"{len(purged)} node(s) MISSING -> DELETED")


@drift_group.command("adopt")
@click.argument("path")
@one_line_errors
def adopt(path: str) -> None:
    """Adopt what was observed at or under PATH (on an observe-only backend: new files, changes,
    removals), as the reconciler does on other backends; journaled as `reconcile` rows that name
    you. A running mount or sidecar does the work (so a mount shows it); with none, this process.

    Example: filestore drift adopt local:/incoming
    """
    with _acting_on(path) as (db, session, backend, rel):
        adopted = drift.adopt(db, backend, rel, Principal.current_process(), run_here=session.run_reconcilers)
    for d in adopted:
        click.echo(f"adopted {d.backend}:/{d.path} ({d.state.lower()})")
    click.echo(f"{len(adopted)} path(s) adopted")


@drift_group.command("scan")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines on stdout: the progress (directories scanned of those recorded, rate, time left),"
                   " then the result.")
@one_line_errors
def scan(path: str, as_json: bool) -> None:
    """Compare the backend with the database at and under PATH (BACKEND, BACKEND:/DIR or a
    directory in a mount), directory by directory, now, and list what differs: new on the
    backend, gone from it, changed. Changes nothing (a mount or sidecar reconciles drift; on an
    observe-only backend, `drift adopt`). Exits 1 when something differs. Progress is drawn on
    a terminal: directories scanned of those recorded there.

    Example: filestore drift scan local:/projects
    """
    conf = settings()
    db = open_database(conf, apply_schema=False)
    backend, rel = _target(path)
    found = drift.scan(db, backend, rel, home=conf.home, progress=Progress(json_lines=as_json))
    if as_json:
        click.echo(json.dumps({"path": path, "differences": [f.as_json() for f in found]}))
    else:
        for f in found:
            click.echo(f"{f.what:<8} {f.backend}:/{f.path}")
        click.echo(f"{len(found)} difference(s) under {path}")
    if found:
        raise SystemExit(1)
