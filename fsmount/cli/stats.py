"""`filestore du`, `filestore rollups verify|repair` and `filestore stats`: answers without a walk."""
from __future__ import annotations

import json
import os
import time

import click

from core.journal import history as journal_queries
from core.model import Principal
from core.rollups import counters, folder, totals
from core.service import open_database
from core.storage.queue import JobQueue

from ..mounts import filestore_mounts
from . import emit_json, main, one_line_errors, settings
from .progress import Progress


def _human(size: int) -> str:
    """Sizes as `du -h` prints them: 1K = 1024, one decimal under 10."""
    value = float(size)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1024 or unit == "P":
            if unit == "":
                return f"{int(value)}"
            return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return str(size)


def _target(path: str) -> tuple[object, str, bytes, int]:
    db = open_database(settings(), apply_schema=False)
    backend, rel = journal_queries.split_target(path, filestore_mounts())
    return db, backend, rel, journal_queries.resolve(db, backend, rel)


@main.command()
@click.argument("path")
@click.option("--depth", "-d", type=click.IntRange(0), default=0, show_default=True,
              help="Also print directories down to this many levels below PATH (like du -d).")
@click.option("--bytes", "-b", "exact", is_flag=True, help="Sizes in bytes instead of human units.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def du(path: str, depth: int, exact: bool, as_json: bool) -> None:
    """Recursive size, file and directory counts of PATH from the rollups, without walking it.

    PATH is a directory inside a mount or BACKEND:/PATH. Values are exact at the moment of
    asking (folded rollups plus the changes not folded yet).

    Example: filestore du /mnt/filestore/projects --depth 1

    PATH may be a mount point itself: the totals of every backend together (local and S3), and
    with --depth 1 each backend's (D41).
    """
    if os.path.abspath(path) in filestore_mounts():
        _du_mount(os.path.abspath(path), depth, exact, as_json)
        return
    db, backend, rel, top = _target(path)
    started = time.perf_counter()
    dirs, values = totals.subtree(db, top, depth)
    elapsed_ms = (time.perf_counter() - started) * 1000
    base = os.fsdecode(rel)
    rows = []
    for dir_id, sub in sorted(dirs, key=lambda item: item[1], reverse=True):
        t = values[dir_id]
        shown = "/".join(p for p in (base, os.fsdecode(sub)) if p)
        rows.append({"path": f"{backend}:/{shown}", "node_id": dir_id, "size_bytes": t.size_bytes,
                     "file_count": t.file_count, "dir_count": t.dir_count, "consistency_state": t.state,
                     "last_calculated_at": t.last_calculated_at})
    if as_json:
        emit_json({"backend": backend, "path": base, "query_ms": round(elapsed_ms, 3), "directories": rows})
        return
    _print_du(rows, exact)


def _print_du(rows: list[dict], exact: bool) -> None:
    for row in rows:
        size = str(row["size_bytes"]) if exact else _human(row["size_bytes"])
        click.echo(f"{size}\t{row['file_count']} files\t{row['dir_count']} dirs\t{row['consistency_state']}\t{row['path']}")


def _du_mount(mountpoint: str, depth: int, exact: bool, as_json: bool) -> None:
    """du of a mount root: every active backend's totals, added up (each backend root counts as a directory)."""
    db = open_database(settings(), apply_schema=False)
    started = time.perf_counter()
    per_backend = totals.backends(db)
    elapsed_ms = (time.perf_counter() - started) * 1000
    rows = [{"path": f"{name}:/", "node_id": root, "size_bytes": t.size_bytes, "file_count": t.file_count,
             "dir_count": t.dir_count, "consistency_state": t.state, "last_calculated_at": t.last_calculated_at}
            for name, root, t in per_backend] if depth >= 1 else []
    states = {t.state for _, _, t in per_backend}
    rows.append({"path": mountpoint, "node_id": 1, "size_bytes": sum(t.size_bytes for _, _, t in per_backend),
                 "file_count": sum(t.file_count for _, _, t in per_backend),
                 "dir_count": sum(t.dir_count + 1 for _, _, t in per_backend),
                 "consistency_state": "exact" if states <= {"exact"} else "pending" if "stale" not in states else "stale",
                 "last_calculated_at": None})
    if as_json:
        emit_json({"mountpoint": mountpoint, "query_ms": round(elapsed_ms, 3), "directories": rows})
        return
    _print_du(rows, exact)


@main.group("rollups")
def rollups_group() -> None:
    """Check or rebuild directory rollups."""


@rollups_group.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def verify(path: str, as_json: bool) -> None:
    """Recount the subtree at PATH and report every directory whose rollup differs.

    Exits 1 when a difference is found. Example: filestore rollups verify local:/projects
    """
    db, backend, rel, top = _target(path)
    differences = totals.verify(db, top)
    if as_json:
        emit_json({"backend": backend, "path": os.fsdecode(rel), "differences": differences})
    else:
        for d in differences:
            click.echo(f"node {d['node_id']}: recorded {d['recorded']}, recount {d['expected']}")
        click.echo(f"{len(differences)} difference(s) under {backend}:/{os.fsdecode(rel)}")
    if differences:
        raise SystemExit(1)


@rollups_group.command("repair")
@click.argument("path")
@click.option("--queue", "queued", is_flag=True,
              help="Queue the recount on filestore_rollup_queue (a mount or sidecar runs it) and return.")
@click.option("--json", "as_json", is_flag=True,
              help="Progress as JSON lines on stdout (directories written of the subtree's, rate, time left),"
                   " then the result as one JSON line.")
@one_line_errors
def repair(path: str, queued: bool, as_json: bool) -> None:
    """Rebuild the rollups of the subtree at PATH from a recount (only that subtree is read).
    Progress is drawn on a terminal: the recount itself is one statement, then the directories
    are written batch by batch.

    Example: filestore rollups repair local:/projects
    """
    db, backend, rel, top = _target(path)
    label = f"{backend}:/{os.fsdecode(rel)}"
    if queued:
        folder.enqueue_recalculation(JobQueue(db), [top], "repair")
        if as_json:
            click.echo(json.dumps({"queued": label}))
            return
        click.echo(f"queued a recount of {label} on filestore_rollup_queue")
        return
    result = totals.recalculate(db, top, Principal.current_process(), reason="repair",
                                progress=Progress(json_lines=as_json))
    if as_json:
        click.echo(json.dumps({"repaired": label, **result}))
        return
    differed = result["differed"]
    click.echo(f"repaired {label}: {differed} director{'y' if differed == 1 else 'ies'}"
               f" differed; {result['directories']} recounted in {result['milliseconds']} ms")


@main.command()
@click.argument("words", nargs=-1, metavar="[verify|repair] [BACKEND|PATH]")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document on stdout; for verify and repair, JSON lines: the progress (directories"
                   " compared of the subtree's, rate, time left), then the result.")
@one_line_errors
def stats(words: tuple[str, ...], as_json: bool) -> None:
    """Counters of commands, events, bytes and nodes by type: global, for a BACKEND, or below a
    directory PATH (what is located there now: a rename moves a node's counts; a file's are its
    own). `verify` counts that subset again from the journal and the tree (and nothing else)
    and reports each difference (exit 1); `repair` replaces what differs (journaled).

    PATH is inside a mount or BACKEND:/PATH. Counters trail the journal by about a second.

    Examples: filestore stats local:/projects; filestore stats verify local; filestore stats repair local:/projects
    """
    action = words[0] if words and words[0] in ("verify", "repair") else None
    rest = words[1:] if action else words
    if len(rest) > 1:
        raise click.UsageError("expected at most one BACKEND or PATH")
    db = open_database(settings(), apply_schema=False)
    target = rest[0] if rest else None
    if target is None:
        backend, rel = None, None
    elif ":" not in target and not target.startswith("/") and not os.path.exists(target):
        backend, rel = target, None
    else:
        backend, rel = journal_queries.split_target(target, filestore_mounts())
    subset, node_id, kind = counters.subset_of(db, backend, rel)
    label = "global" if backend is None else backend if rel is None else f"{backend}:/{os.fsdecode(rel).strip('/')}"
    if action is not None:
        if subset.scope == "dir" and subset.root is None:
            raise click.ClickException(f"{label} is a {kind}: its counters are counted from its journal when asked;"
                                       " verify or repair its directory")
        found = counters.check(db, subset, repair=action == "repair", progress=Progress(json_lines=as_json))
        if as_json:  # after the progress lines: the result as the last one
            click.echo(json.dumps({"target": label, "action": action, "differences": [d.__dict__ for d in found]}))
        else:
            for d in found:
                click.echo(f"{d.scope} {d.key} {d.counter}: recorded {d.recorded}, counted {d.expected}")
            verb = "repaired" if action == "repair" else "verified"
            click.echo(f"{verb} {label}: {len(found)} difference(s)")
        if found and action == "verify":
            raise SystemExit(1)
        return
    if subset.scope == "dir" and subset.root is None:
        scope, key, values = "node", str(node_id), counters.of_node(db, node_id)
    else:
        scope, key = subset.scope, subset.key
        values = counters.read(db, scope, key)
    if as_json:
        emit_json({"scope": scope, "key": key, "target": label, "counters": values})
        return
    click.echo(f"{scope} {label}" + (f" (node {node_id})" if scope in ("dir", "node") else ""))
    for name, value in values.items():
        click.echo(f"  {name:<40} {value:>14,}")
