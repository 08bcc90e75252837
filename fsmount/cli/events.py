"""`filestore events tail` and `filestore activity growth|churn`."""
from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime, timedelta, timezone

import click

from core.errors import ConfigError
from core.events import outbox as ev
from core.events import settings as eventconf
from core.events.consumers import Checkpoint, JournalSource, fresh
from core.events.consumers import activity as activity_consumer
from core.journal import history as journal_history
from core.journal.history import split_target
from core.service import open_database

from ..mounts import filestore_mounts
from . import emit_json, main, one_line_errors, settings


@main.group("events")
def events_group() -> None:
    """Events derived from the journal (docs/design.md section 6)."""


def _event_text(e: dict) -> str:
    where = f"{e['backend'] or '-'}:/{e['path'] or ''}"
    if e["previous_path"]:
        where = f"{e['backend']}:/{e['previous_path']} -> {where}"
    p = e["principal"]
    who = p["actor"] if p["uid"] is None else f"{p['actor']} uid={p['uid']} pid={p['pid']}"
    node = "" if e["type"] == ev.COMPLETED else f" {e['kind']} size={e['size']} v{e['version']} {e['state']}"
    status = f" {e['command']} {e['status']}" + (f" errno={e['errno']}" if e["errno"] else "") \
        if e["type"] == ev.COMPLETED else ""
    return f"{e['id']:>10}  {e['time'][:23]}  {e['type']:<28} {where}{node}{status}  {who}"


@events_group.command("tail")
@click.option("--from", "from_id", type=int, default=None,
              help="Start with the events of this journal id (default: the last 20 journal rows; with Redis the last 50 events).")
@click.option("--type", "types", multiple=True, type=click.Choice(ev.TYPES),
              help="Only events of this type (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they come.")
@one_line_errors
def tail(from_id: int | None, types: tuple[str, ...], as_json: bool, follow: bool) -> None:
    """Print events: from the Redis stream when REDIS_URL names a server, else derived
    from the journal with the relay's own code.

    Example: filestore events tail --from 1200 --type filestore.node.deleted --json --follow
    """
    conf = eventconf.load(settings())

    def show(batch: list[dict]) -> None:
        for e in batch:
            if (from_id is not None and e["journal_id"] < from_id) or (types and e["type"] not in types):
                continue
            click.echo(ev.dumps(e) if as_json else _event_text(e))

    stop = threading.Event()
    try:
        if conf.inline:
            db = open_database(settings())
            if from_id is None:
                last = journal_history.last_id(db)
                from_id = max(last - 19, 1)
            _tail_journal(db, from_id, follow, show, stop)
        else:
            _tail_stream(conf, from_id, follow, show, stop)
    except KeyboardInterrupt:
        pass


def _tail_journal(db, from_id: int, follow: bool, show, stop: threading.Event) -> None:
    source, checkpoint = JournalSource(db), Checkpoint()
    while not stop.is_set():
        batch = fresh(source.read(checkpoint, 1000, min_journal_id=from_id - 1), checkpoint)
        if batch:
            show(batch)
            checkpoint = Checkpoint.after(batch[-1])
            continue
        if not follow:
            return
        stop.wait(0.2)


def _tail_stream(conf, from_id: int | None, follow: bool, show, stop: threading.Event) -> None:
    import redis

    client = redis.Redis.from_url(conf.redis_url, socket_timeout=10, socket_connect_timeout=2)
    try:
        last = "0-0"
        if from_id is None:  # the last 50 events of the stream
            recent = client.xrevrange(conf.stream, count=50)
            if recent:
                last = recent[-1][0].decode()
                first = int(last.split("-")[0])
                last = f"{first - 1}-0" if first > 1 else "0-0"
        while not stop.is_set():
            reply = client.xread({conf.stream: last}, count=1000, block=1000 if follow else None)
            entries = [entry for _, items in reply for entry in items]
            if entries:
                show([json.loads(fields[b"event"]) for _, fields in entries])
                last = entries[-1][0]
            elif not follow:
                return
    except redis.ConnectionError as exc:
        raise ConfigError(f"Redis unreachable at {conf.redis_url}: {exc}") from None
    finally:
        client.close()


# -- activity ------------------------------------------------------------------------
def _since(text: str) -> datetime:
    m = re.fullmatch(r"(\d+)([mhdw])", text.strip())
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter("use a duration (30m, 24h, 7d, 2w) or an ISO date") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _scope(path: str | None) -> tuple[str | None, str]:
    if not path:
        return None, ""
    if ":" not in path and not path.startswith("/") and not os.path.exists(path):
        return path, ""  # a backend name alone
    backend, rel = split_target(path, filestore_mounts())
    return backend, os.fsdecode(rel).strip("/")


def _report(report: str, path: str | None, since: str, as_json: bool, **kwargs) -> None:
    conf = eventconf.load(settings())
    if not conf.activity_path.exists():
        raise ConfigError(f"no activity data at {conf.activity_path}: switch the consumer on with FILESTORE_ACTIVITY=on")
    backend, prefix = _scope(path)
    columns, rows = activity_consumer.query(conf.activity_path, report, backend=backend, prefix=prefix,
                                            since=_since(since), **kwargs)
    data = [dict(zip(columns, row)) for row in rows]
    if as_json:
        emit_json(data)
        return
    _table(columns, rows)


def _table(columns: list[str], rows: list[tuple]) -> None:
    text = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in text:
        click.echo("  ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w)
                             for v, w in zip(r, widths)).rstrip())
    if not rows:
        click.echo("(no activity in this range)")


def _cell(value) -> str:
    if isinstance(value, datetime):  # UTC, as the activity file stores it
        return value.strftime("%Y-%m-%d %H:%M")
    return "" if value is None else str(value)


@main.group("activity")
def activity_group() -> None:
    """Storage growth and churn from the activity consumer's DuckDB file."""


@activity_group.command("growth")
@click.argument("path", required=False)
@click.option("--since", default="30d", show_default=True, help="Duration (7d, 24h) or ISO date.")
@click.option("--by", "period", type=click.Choice(["hour", "day", "week", "month"]), default="day", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list on stdout.")
@one_line_errors
def growth(path: str | None, since: str, period: str, as_json: bool) -> None:
    """Bytes added and files created/deleted per period, under PATH (BACKEND, BACKEND:/DIR or a path in a mount).

    Example: filestore activity growth projects:/reports --since 7d
    """
    _report("growth", path, since, as_json, period=period)


@activity_group.command("churn")
@click.argument("path", required=False)
@click.option("--since", default="7d", show_default=True, help="Duration (7d, 24h) or ISO date.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list on stdout.")
@one_line_errors
def churn(path: str | None, since: str, limit: int, as_json: bool) -> None:
    """The paths changed most often under PATH, with the bytes they churned.

    Example: filestore activity churn projects --since 24h --json
    """
    _report("churn", path, since, as_json, limit=limit)
