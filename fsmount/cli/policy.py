"""`filestore policy grant|revoke|protect|list|check`: who may read, write or administer where (D42)."""
from __future__ import annotations

import os

import click

from core.access import principals, store
from core.access.gate import announce
from core.access.rules import ACTIONS, SCOPES, Who
from core.journal.history import split_target
from core.model import Principal
from core.service import open_database

from ..mounts import filestore_mounts
from . import emit_json, main, one_line_errors, settings


@main.group()
def policy() -> None:
    """Access policies: scopes (read < write < admin) per user, group, role or everyone, per
    backend and path prefix. With none, POSIX mode bits alone decide; a backend that a grant
    applies to is closed to everyone no grant names (root included).
    """


def _subject_options(fn):
    for option in reversed((
        click.option("--user", "user", help="A user name or uid (the caller's uid through the mount)."),
        click.option("--group", "group", help="A group name or gid (primary or supplementary)."),
        click.option("--role", "role", help="A PostgreSQL role (the CLI's or a sidecar's connection)."),
        click.option("--everyone", is_flag=True, help="Every principal."),
        click.option("--path", "target", metavar="BACKEND:/PREFIX",
                     help="Where: a backend and a path prefix in it; default: every backend."),
    )):
        fn = option(fn)
    return fn


def _subject(user: str | None, group: str | None, role: str | None, everyone: bool) -> tuple[str, str | None]:
    given = [k for k, v in (("user", user), ("group", group), ("role", role), ("everyone", everyone)) if v]
    if len(given) != 1:
        raise click.UsageError("name exactly one of --user, --group, --role, --everyone")
    if user:
        return "user", str(principals.user_id(user))
    if group:
        return "group", str(principals.group_id(group))
    if role:
        return "role", role
    return "everyone", None


def _where(target: str | None) -> tuple[str | None, str]:
    return store.parse_target(target) if target else (None, "")


def _show_subject(kind: str | None, subject: str | None) -> str:
    if kind == "user":
        return f"user {principals.user_name(int(subject))}"
    if kind == "group":
        return f"group {principals.group_name(int(subject))}"
    if kind == "role":
        return f"role {subject}"
    return "everyone"


@policy.command("grant")
@click.argument("scope", type=click.Choice(SCOPES))
@_subject_options
@one_line_errors
def grant(scope: str, user, group, role, everyone, target) -> None:
    """Give a principal SCOPE at and below --path (journaled as policy.grant).

    Example: filestore policy grant write --user ingest --path data:/ingest
    """
    kind, subject = _subject(user, group, role, everyone)
    backend, prefix = _where(target)
    conf = settings()
    rule = store.grant(open_database(conf), Principal.current_process(), scope, kind, subject, backend, prefix)
    announce(conf.redis_url)
    click.echo(f"granted {scope} to {_show_subject(kind, subject)} on {rule.where} (rule #{rule.id})")


@policy.command("revoke")
@click.argument("scope", type=click.Choice(SCOPES))
@_subject_options
@one_line_errors
def revoke(scope: str, user, group, role, everyone, target) -> None:
    """Remove the grant made with the same arguments (journaled as policy.revoke).

    Example: filestore policy revoke write --user ingest --path data:/ingest
    """
    kind, subject = _subject(user, group, role, everyone)
    backend, prefix = _where(target)
    conf = settings()
    rule = store.revoke(open_database(conf), Principal.current_process(), scope, kind, subject, backend, prefix)
    announce(conf.redis_url)
    click.echo(f"revoked {scope} from {_show_subject(kind, subject)} on {rule.where} (rule #{rule.id})")


@policy.command("protect")
@click.argument("target", metavar="BACKEND:/PREFIX")
@click.option("--delete", "delete", type=click.Choice((*SCOPES, "none")),
              help="The scope deleting a name at or below the prefix needs (none: back to write).")
@click.option("--move", "move", type=click.Choice((*SCOPES, "none")),
              help="The scope renaming a name at or below the prefix (or an ancestor of it) needs.")
@one_line_errors
def protect(target: str, delete: str | None, move: str | None) -> None:
    """Elevated rules: who may delete or move under a prefix, whatever else they may write.

    Example (writers create releases, only admins delete or move them):
    filestore policy protect data:/releases --delete admin --move admin
    """
    needs = {action: (None if scope == "none" else scope)
             for action, scope in (("delete", delete), ("move", move)) if scope is not None}
    if not needs:
        raise click.UsageError("give --delete and/or --move")
    backend, prefix = store.parse_target(target)
    conf = settings()
    store.protect(open_database(conf), Principal.current_process(), backend, prefix, needs)
    announce(conf.redis_url)
    click.echo(f"{backend}:/{prefix}: " + ", ".join(f"{a} needs {s or 'write'}" for a, s in needs.items()))


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def list_(as_json: bool) -> None:
    """Every rule, in the order made.

    Example: filestore policy list --json
    """
    found = store.load(open_database(settings()))
    rows = [{"id": r.id, "kind": r.kind, "scope": r.scope, "subject_kind": r.subject_kind,
             "subject": r.subject, "backend": r.backend, "prefix": r.prefix, "action": r.action}
            for r in found.rules]
    if as_json:
        emit_json({"version": found.version, "rules": rows})
        return
    if not rows:
        click.echo("no policies: POSIX mode bits alone decide")
    for r in found.rules:
        if r.kind == "grant":
            click.echo(f"#{r.id:<5} grant   {r.scope:<6} {_show_subject(r.subject_kind, r.subject):<24} {r.where}")
        else:
            click.echo(f"#{r.id:<5} protect {r.action:<6} needs {r.scope:<18} {r.where}")


@policy.command("check")
@click.option("--user", "user", required=True, help="A user name or uid.")
@click.option("--group", "groups", multiple=True,
              help="A group the process would hold (default: the user's groups from /etc/group).")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def check(user: str, groups: tuple[str, ...], path: str, as_json: bool) -> None:
    """Whether a user may read, write, move or delete at PATH (in a mount, or BACKEND:/PATH),
    and which rule decides.

    Example: filestore policy check --user ingest data:/releases/v1.tar
    """
    uid = principals.user_id(user)
    gids = frozenset(principals.group_id(g) for g in groups) if groups else principals.groups_of_user(uid)
    backend, rel = split_target(path, filestore_mounts())
    found = store.load(open_database(settings()))
    who = Who(uid, gids)
    decisions = {action: found.decide(who, backend, rel, action) for action in ACTIONS}
    if as_json:
        emit_json({"user": uid, "groups": sorted(gids), "backend": backend, "path": "/" + os.fsdecode(rel),
                   "decisions": {a: d.as_dict() for a, d in decisions.items()}})
        return
    for action, d in decisions.items():
        click.echo(f"{action:<7} {'allowed' if d.allowed else 'refused':<8} {d.reason}")
