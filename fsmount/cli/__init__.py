"""The `filestore` command line. Each group lives in its own module; all of them are thin.

Exit codes: 0 success, 1 an error (one line on stderr), 2 a usage error (click's own).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click
import psycopg

from core import config
from core.errors import ConfigError, ExecutorFailure, FsError
from core.observe import logs


def fail(message: str, code: int = 1) -> None:
    click.echo(f"filestore: {message}", err=True)
    sys.exit(code)


def one_line_errors(fn):
    """User errors print one line and exit 1; only a bug prints a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            # The reader went away (`filestore journal | head`): quiet, as a tool killed by
            # SIGPIPE; stdout goes to /dev/null so that the flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + 13)
        except ConfigError as exc:
            fail(str(exc))
        except FsError as exc:
            fail(f"{exc} ({exc.code})")
        except psycopg.OperationalError as exc:
            fail(f"database unreachable: {str(exc).strip().splitlines()[0]}")
        except ExecutorFailure as exc:
            fail(f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            fail(str(exc))
    return wrapper


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def settings() -> config.Settings:
    return config.load()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Filestore: local directories and S3 prefixes as one journaled POSIX tree.

    Configuration comes from the environment: FILESTORE_HOME (data directory),
    DATABASE_URL (default: an embedded PostgreSQL in FILESTORE_HOME), REDIS_URL (default
    inline), FILESTORE_BACKENDS_PATH (backends declared in YAML or JSON).
    """
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logs.configure(level, settings().log_json)

from . import admin, backend, drift, events, mount, sidecar, stats  # noqa: E402  (registers the commands on `main`)
from . import timetravel, watch  # noqa: E402  (ls --as-of, diff, restore, journal verify, watch: D41)

__all__ = ["main", "admin", "backend", "drift", "events", "mount", "sidecar", "stats", "timetravel", "watch"]
