"""`filestore ls --as-of`, `diff`, `restore`, `journal verify`: the journal read back (D41).

TIME everywhere: ISO 8601 (2026-12-07T10:30, local time without a zone), an age (90s, 2h,
3d, 1w: that long ago) or @JOURNAL_ID (the tree right after that journal row).
"""
from __future__ import annotations

import datetime as dt
import os
import stat
import sys

import click

from core.errors import ConfigError
from core.journal import chain, timetravel
from core.journal import history as journal_queries
from core.service import open_database

from ..mounts import filestore_mounts
from . import admin, emit_json, fail, main, one_line_errors, settings

_TIME_HELP = "ISO 8601, an age (2h, 3d) or @JOURNAL_ID"


def _target(path: str) -> tuple[str, bytes]:
    return journal_queries.split_target(path, filestore_mounts())


def _mode_text(kind: str, mode: int) -> str:
    type_bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK,
                 "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}.get(kind, stat.S_IFREG)
    return stat.filemode(type_bits | mode)


@main.command("ls")
@click.argument("path")
@click.option("--as-of", "as_of", required=True, metavar="TIME", help=f"When: {_TIME_HELP}.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def ls(path: str, as_of: str, as_json: bool) -> None:
    """A directory as it was: names, kinds, sizes (directories: recursive), modes, owners, mtimes.

    Example: filestore ls --as-of 2h /mnt/filestore/projects/releases
    """
    db = open_database(settings())
    backend, rel = _target(path)
    at = timetravel.resolve_time(db, as_of)
    entries = timetravel.listing(db, backend, rel, at)
    if as_json:
        emit_json({"backend": backend, "path": os.fsdecode(rel), "as_of_journal_id": at,
                   "entries": [e.as_dict() for e in entries]})
        return
    for e in entries:
        when = dt.datetime.fromtimestamp(e.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        name = os.fsdecode(e.name) + (f" -> {e.target}" if e.target is not None else "")
        click.echo(f"{_mode_text(e.kind, e.mode)} {e.uid:>6} {e.gid:>6} {e.size:>12} {when} {name}")


@main.command("diff")
@click.argument("path")
@click.option("--from", "start", required=True, metavar="TIME", help=f"From: {_TIME_HELP}.")
@click.option("--to", "end", default=None, metavar="TIME", help="To (default: now).")
@click.option("--all", "full", is_flag=True, help="Every change, not a summary per directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def diff(path: str, start: str, end: str | None, full: bool, as_json: bool) -> None:
    """What changed under PATH between two times: created, deleted, modified, moved, by whom.

    Example: filestore diff /mnt/filestore/projects --from 1d --all
    """
    db = open_database(settings())
    backend, rel = _target(path)
    first = timetravel.resolve_time(db, start)
    last = timetravel.resolve_time(db, end) if end is not None else timetravel.last_id(db)
    if last < first:
        raise click.UsageError("--to is before --from")
    changes = timetravel.diff(db, backend, rel, first, last)
    out = {"backend": backend, "path": os.fsdecode(rel), "from_journal_id": first, "to_journal_id": last,
           "size_delta": sum(c.size_delta for c in changes)}
    if as_json:
        emit_json({**out, "changes": [c.as_dict() for c in changes]} if full else
                  {**out, "directories": timetravel.summary(changes)})
        return
    click.echo(f"{backend}:/{os.fsdecode(rel)} from journal row {first} to {last}: {len(changes)} changes,"
               f" {out['size_delta']:+d} bytes")
    if full:
        for c in changes:
            where = f"{c.old_path} -> {c.path}" if c.old_path is not None else c.path
            extra = f" ({', '.join(c.what)})" if c.what else ""
            click.echo(f"{c.kind:<9} {where}{extra} {c.size_delta:+d} by {', '.join(c.principals) or '?'}")
        return
    for row in timetravel.summary(changes):
        counts = ", ".join(f"{row[k]} {k}" for k in ("created", "deleted", "modified", "moved") if row[k])
        click.echo(f"{row['directory']}: {counts}, {row['size_delta']:+d} bytes by {', '.join(row['principals'])}")


@admin.journal.command("verify")
@click.option("--since", type=int, default=None, metavar="ID", help="Check from this journal id on.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def journal_verify(since: int | None, as_json: bool) -> None:
    """Recompute the journal's hash chain; exit 1 naming the first row that does not match.

    Example: filestore journal verify --since 100000
    """
    verdict = chain.verify(open_database(settings()), since)
    if as_json:
        emit_json(verdict.as_dict())
        if not verdict.ok:
            sys.exit(1)
        return
    if not verdict.ok:
        fail(verdict.reason)
    legacy = f" (rows up to {verdict.starts_after} predate the chain)" if verdict.starts_after else ""
    click.echo(f"journal chain intact: {verdict.checked} rows checked{legacy};"
               f" head {verdict.head_id} {verdict.head_hash}")


def _mount_of(path: str, backend: str) -> str:
    """The mountpoint through which to act on `backend`: restore changes nothing behind the mount's back."""
    absolute = os.path.abspath(path)
    mounts = filestore_mounts()
    for mountpoint in sorted(mounts, key=len, reverse=True):
        if absolute.startswith(mountpoint.rstrip("/") + "/"):
            return mountpoint
    for mountpoint in mounts:
        if os.path.isdir(os.path.join(mountpoint, backend)):
            return mountpoint
    raise ConfigError(f"restore acts through a running mount, and no filestore mount shows backend {backend!r}:"
                      " mount it first")


def _carry_out(step, base: str) -> None:
    target = os.path.join(base, step.path)
    if step.action == "move":
        os.rename(os.path.join(base, step.source), target)
    elif step.action == "mkdir":
        os.mkdir(target, step.mode)
        os.chmod(target, step.mode)  # the umask took bits
    elif step.action == "symlink":
        os.symlink(step.target, target)
    elif step.action == "create":
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, step.mode))
        os.chmod(target, step.mode)
    elif step.action == "chmod":
        os.chmod(target, step.mode)
    elif step.action == "chown":
        os.lchown(target, step.uid, step.gid)
    elif step.action == "utime":
        os.utime(target, ns=(os.lstat(target).st_atime_ns, step.mtime_ns), follow_symlinks=False)


def _step_text(step) -> str:
    detail = {"move": lambda s: f"{s.source} -> {s.path}", "chmod": lambda s: f"{s.path} {oct(s.mode)}",
              "chown": lambda s: f"{s.path} {s.uid}:{s.gid}", "symlink": lambda s: f"{s.path} -> {s.target}",
              "utime": lambda s: f"{s.path} mtime {dt.datetime.fromtimestamp(s.mtime_ns / 1e9).isoformat()}"}
    return f"{step.action:<8} " + detail.get(step.action, lambda s: s.path)(step)


@main.command("restore")
@click.argument("path")
@click.option("--as-of", "as_of", required=True, metavar="TIME", help=f"When: {_TIME_HELP}.")
@click.option("--dry-run", is_flag=True, help="Say what would be done and what cannot be, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def restore(path: str, as_of: str, dry_run: bool, as_json: bool) -> None:
    """Bring back names, modes, owners, times and directories under PATH as they were, where the
    content still exists; through the running mount, journaled with you as principal.

    Example: filestore restore /mnt/filestore/projects/releases --as-of 2h --dry-run
    """
    from core.journal import restore as restoring
    db = open_database(settings())
    backend, rel = _target(path)
    base = os.path.join(_mount_of(path, backend), backend, os.fsdecode(rel)) if not dry_run else None
    at = timetravel.resolve_time(db, as_of)
    plan = restoring.plan(db, backend, rel, at)
    done, failed = [], []
    for step in plan.steps:
        if dry_run:
            continue
        try:
            _carry_out(step, base)
            done.append(step)
        except OSError as exc:
            failed.append({"path": step.path, "node_id": step.node_id, "why": f"{step.action}: {exc.strerror}"})
    if as_json:
        emit_json({**plan.as_dict(), "dry_run": dry_run, "failed": failed})
    else:
        for step in plan.steps:
            click.echo(("would " if dry_run else "") + _step_text(step))
        for item in plan.cannot + failed:
            click.echo(f"cannot restore {item['path']}: {item['why']}")
        if plan.left_in_place:
            click.echo(f"left in place: {len(plan.left_in_place)} entries created since")
    if failed:
        sys.exit(1)
