"""`filestore sidecar` and `filestore status`."""
from __future__ import annotations

import click

from core.observe import status as status_report
from core.repair import sidecar as sidecar_loops

from . import emit_json, main, one_line_errors, settings


@main.command("sidecar")
@click.option("--http-port", type=int, default=None, envvar="FILESTORE_HTTP_PORT",
              help="Serve /health, /ready and /metrics on this port (0: any free port). Default: off.")
@click.option("--workers", type=int, default=2, show_default=True, help="Reconcile worker threads.")
@one_line_errors
def sidecar(http_port: int | None, workers: int) -> None:
    """Run the watchers, the reconciler and the other background loops until SIGTERM.

    Several sidecars may run against one PostgreSQL: each job runs in one of them.

    Example: FILESTORE_HTTP_PORT=9464 filestore sidecar
    """
    def announce(port):
        click.echo(f"sidecar running (pid {__import__('os').getpid()})"
                   + (f", http://127.0.0.1:{port}/" if port is not None else ""), err=True)
    sidecar_loops.serve(settings(), http_port=http_port, workers=workers, ready=announce)


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@one_line_errors
def status(as_json: bool) -> None:
    """The health of PostgreSQL, Redis, backends, mounts, sidecars and queues, on one screen.

    Exits 1 when something is not healthy.

    Example: filestore status --json
    """
    report = status_report.gather(settings())
    if as_json:
        emit_json(report)
    else:
        click.echo(status_report.render(report))
    if not report["healthy"]:
        raise SystemExit(1)
