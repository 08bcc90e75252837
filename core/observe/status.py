"""`filestore status`: everything an operator checks first, gathered into one report."""
from __future__ import annotations

from typing import Any

import psycopg

from core.observe import health, registry
from core.storage import embedded_pg, store
from core.storage.db import Database
from core.storage.queue import JobQueue

STALE_AFTER = 3 * registry.HEARTBEAT_SECONDS
# An S3 write-back (content or deletion kept in a mount's spool) that failed this many times in
# a row is reported as failing and makes the report unhealthy. It is retried all the same, with
# backoff up to 30 s, for as long as it takes: its spool file may be the only copy of the content.
FAILING_AFTER_ATTEMPTS = 3


def gather(settings) -> dict[str, Any]:
    report: dict[str, Any] = {"home": str(settings.home)}
    url = settings.database_url
    if not url:  # the embedded server: report it stopped rather than start it
        if not (settings.pgdata / "postmaster.pid").exists():
            report["postgres"] = {"ok": False, "error": f"the embedded server in {settings.pgdata} is not running"}
        else:
            try:
                url = embedded_pg.ensure_running(settings.pgdata)
            except Exception as exc:
                report["postgres"] = {"ok": False, "error": f"embedded server: {exc}"}
    report.setdefault("postgres", health.check_postgres(url) if url else {"ok": False, "error": "no server"})
    report["redis"] = health.check_redis(settings.redis_url)
    report.update(backends=[], mounts=[], sidecars=[], queues={}, writeback=[])
    if report["postgres"]["ok"]:
        db = Database(url, pool_size=1)
        try:
            for backend in store.load_backends(db):
                check = health.check_backend(backend)
                report["backends"].append({"name": backend.name, "kind": backend.kind, "root": backend.root,
                                           "read_only": backend.read_only, **check})
            for row in db.query_dicts(
                    "SELECT role, host, pid, home, mountpoint, info, started_at, heartbeat_at, stopped_at,"
                    "       extract(epoch FROM now() - heartbeat_at) AS silence"
                    "  FROM filestore.processes WHERE stopped_at IS NULL OR stopped_at > now() - interval '1 hour'"
                    " ORDER BY role, started_at"):
                state = "stopped" if row["stopped_at"] else ("alive" if row["silence"] < STALE_AFTER else "silent")
                entry = {"host": row["host"], "pid": row["pid"], "state": state,
                         "heartbeat_age_seconds": round(float(row["silence"]), 1), "info": row["info"]}
                if row["mountpoint"]:
                    entry["mountpoint"] = row["mountpoint"]
                report["mounts" if row["role"] == "mount" else "sidecars"].append(entry)
            report["queues"] = JobQueue(db).stats()
            report["writeback"] = _writeback(db)
        except psycopg.Error as exc:
            report["postgres"] = {"ok": False, "error": str(exc).strip().splitlines()[0]}
        finally:
            db.close()
    report["healthy"] = bool(
        report["postgres"]["ok"] and report["redis"]["ok"] and all(b["ok"] for b in report["backends"])
        and not any(q["failed"] for q in report["queues"].values())
        and not any(w["failing"] for w in report["writeback"]))
    return report


def _writeback(db: Database) -> list[dict[str, Any]]:
    """Per S3 backend: the write-backs not landed yet (uploads, and deletions queued since D49),
    how many keep failing, and the latest error of the one that failed most."""
    return db.query_dicts(
        "SELECT b.name AS backend, count(*) FILTER (WHERE u.spool NOT LIKE 'delete:%%') AS uploads,"
        "       count(*) FILTER (WHERE u.spool LIKE 'delete:%%') AS deletions,"
        "       coalesce(sum(u.size) FILTER (WHERE u.spool NOT LIKE 'delete:%%'), 0)::bigint AS bytes,"
        "       count(*) FILTER (WHERE u.attempts >= %s) AS failing, max(u.attempts) AS max_attempts,"
        "       round(extract(epoch FROM now() - min(u.created_at))::numeric, 1)::float AS oldest_age_seconds,"
        "       (array_agg(u.last_error ORDER BY u.attempts DESC, u.last_attempt_at DESC)"
        "          FILTER (WHERE u.last_error IS NOT NULL))[1] AS last_error"
        "  FROM filestore.uploads u JOIN filestore.backend_mounts b ON b.id = u.backend_id"
        " GROUP BY b.name ORDER BY b.name", (FAILING_AFTER_ATTEMPTS,))


def _mark(ok: bool) -> str:
    return "ok  " if ok else "FAIL"


def render(report: dict[str, Any]) -> str:
    pg, rd = report["postgres"], report["redis"]
    lines = [f"filestore status ({report['home']})",
             f"  {_mark(pg['ok'])} postgres   " + (f"schema {pg.get('schema_version')}" if pg["ok"] else pg["error"]),
             f"  {_mark(rd['ok'])} redis      " + (rd.get("mode", "reachable") if rd["ok"] else rd["error"])]
    lines.append("backends")
    for b in report["backends"] or [{"name": "(none)", "ok": True, "root": "", "kind": ""}]:
        detail = b.get("error") or f"{b['kind']} {b['root']}" + (" read-only" if b.get("read_only") else "")
        lines.append(f"  {_mark(b['ok'])} {b['name']:<16} {detail}")
    for role in ("mounts", "sidecars"):
        lines.append(role)
        rows = report[role]
        if not rows:
            lines.append("       (none)")
        for p in rows:
            where = p.get("mountpoint") or ""
            lines.append(f"  {_mark(p['state'] != 'silent')} {p['host']}:{p['pid']:<8} {p['state']:<8} "
                         f"heartbeat {p['heartbeat_age_seconds']:>5}s ago {where}")
    lines.append("queues                          depth  running  failed  oldest")
    for name, q in report["queues"].items():
        lines.append(f"  {_mark(not q['failed'])} {name:<26} {q['depth']:>6} {q['running']:>8} {q['failed']:>7}"
                     f"  {q['oldest_age_seconds']:>6.1f}s")
    if report["writeback"]:
        lines.append("S3 write-back                   uploads  deletions  failing  oldest")
        for w in report["writeback"]:
            lines.append(f"  {_mark(not w['failing'])} {w['backend']:<26} {w['uploads']:>7} {w['deletions']:>10}"
                         f" {w['failing']:>8}  {w['oldest_age_seconds']:>6.1f}s")
            if w["last_error"]:
                lines.append(f"       last error ({w['max_attempts']} attempts): {w['last_error'].splitlines()[0][:160]}")
    lines.append("healthy" if report["healthy"] else "NOT healthy")
    return "\n".join(lines)
