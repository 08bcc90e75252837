"""`/metrics`, `/health` and `/ready` over HTTP, for the mount and the sidecar.

Off unless a port is given (FILESTORE_HTTP_PORT, or `filestore sidecar --http-port`): one
home may run a mount and several sidecars on one host, and a fixed default port would make
the second one fail to start. Port 0 picks a free port (written to the log and the registry).

- /health: 200 while the process's loops are alive (liveness: restart me if not).
- /ready: 200 when PostgreSQL answers with the expected schema version, Redis answers (unless
  inline) and every backend root is reachable; 503 otherwise, naming what failed.
- /metrics: Prometheus text; queue gauges are refreshed from the database at each scrape.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.observe import metrics
from core.storage import availability, schema

log = logging.getLogger(__name__)


def check_postgres(url: str) -> dict:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            version = schema.current_version(conn)
    except psycopg.Error as exc:
        return {"ok": False, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
    if version != schema.SCHEMA_VERSION:
        return {"ok": False, "error": f"schema version {version}, expected {schema.SCHEMA_VERSION}"}
    return {"ok": True, "schema_version": version}


def check_redis(url: str) -> dict:
    if url == "inline":
        return {"ok": True, "mode": "inline"}
    try:
        import redis
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}


def check_backend(backend) -> dict:
    """Where this process opened the backend, what its operations do (EIO while it is down:
    core.storage.availability): an S3 bucket as the monitor last found it, a local root probed
    now (a root gone shows at once, and its operations answer EIO from then on); else a local
    root looked at on the disk."""
    if getattr(backend, "executor", None) is not None:
        down = availability.check_local(backend)
        return {"ok": False, "error": down} if down is not None else {"ok": True}
    if backend.kind != "local":
        return {"ok": True, "note": "not checked (this process has not opened it; a mount's /ready says)"}
    try:
        if not os.path.isdir(backend.root):
            return {"ok": False, "error": f"root {backend.root} is not a directory"}
        os.listdir(backend.root)
        return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": f"root {backend.root}: {exc.strerror or exc}"}


def readiness(database_url: str, redis_url: str, backends: list,
              unopened: dict[str, str] | None = None) -> tuple[bool, dict]:
    checks = {"postgres": check_postgres(database_url), "redis": check_redis(redis_url)}
    for backend in backends:
        checks[f"backend:{backend.name}"] = check_backend(backend)
    for name, why in (unopened or {}).items():  # registered, not opened (its root or endpoint was away)
        checks[f"backend:{name}"] = {"ok": False, "error": why}
    failed = sorted(name for name, result in checks.items() if not result["ok"])
    return not failed, {"ready": not failed, "failed": failed, "checks": checks}


class HealthServer:
    def __init__(self, port: int, *, database_url: str, redis_url: str, backends: Callable[[], list],
                 alive: Callable[[], dict[str, bool]], queue_stats: Callable[[], dict] | None = None,
                 host: str | None = None, unopened: Callable[[], dict[str, str]] | None = None):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    loops = alive()
                    ok = all(loops.values())
                    self._send(200 if ok else 503, {"alive": ok, "loops": loops})
                elif path == "/ready":
                    ok, body = readiness(database_url, redis_url, backends(), unopened() if unopened else None)
                    self._send(200 if ok else 503, body)
                elif path == "/metrics":
                    if queue_stats is not None:
                        try:
                            metrics.refresh_queue_gauges(queue_stats())
                        except Exception as exc:  # scrape what we have; /ready says why
                            log.debug("queue gauges not refreshed: %s", exc)
                    body = generate_latest()
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self._send(404, {"error": "not found", "paths": ["/health", "/ready", "/metrics"]})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        self.server = ThreadingHTTPServer((host or os.environ.get("FILESTORE_HTTP_HOST", "127.0.0.1"), port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="filestore-http", daemon=True)
        self._thread.start()
        log.info("health and metrics on http://%s:%d/", self.server.server_address[0], self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def port_from_env() -> int | None:
    value = os.environ.get("FILESTORE_HTTP_PORT", "").strip()
    return int(value) if value else None
