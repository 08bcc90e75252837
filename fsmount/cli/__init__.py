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
        except psycopg.errors.InsufficientPrivilege as exc:  # a role without the right (D42)
            fail(f"not allowed: {str(exc).strip().splitlines()[0]}")
        except ExecutorFailure as exc:
            fail(f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            fail(str(exc))
    return wrapper


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def settings() -> config.Settings:
    return config.load()


class _Filestore(click.Group):
    """The `filestore` command, also run as a mount helper: `mount -t fuse.filestore HOME DIR -o
    OPTIONS` (an /etc/fstab line) has mount.fuse3 run `filestore HOME DIR -o OPTIONS`."""

    def main(self, args=None, *rest, **kwargs):
        argv = list(sys.argv[1:] if args is None else args)
        if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in self.commands \
                and not argv[1].startswith("-"):
            from .mount import mount_helper
            return mount_helper(argv[0], argv[1], argv[2:])
        return super().main(args, *rest, **kwargs)


@click.group(cls=_Filestore, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="filestore-mount", prog_name="filestore")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Filestore: local directories and S3 prefixes as one journaled POSIX tree.

    Configuration comes from the environment: FILESTORE_HOME (data directory),
    DATABASE_URL (default: an embedded PostgreSQL in FILESTORE_HOME), REDIS_URL (default
    inline), FILESTORE_BACKENDS_PATH (backends declared in YAML or JSON).
    """
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logs.configure(level, settings().log_json)

from . import admin, backend, drift, events, mount, policy, role, sidecar, stats  # noqa: E402  (registers the commands on `main`)
from . import timetravel, watch  # noqa: E402  (ls --as-of, diff, restore, journal verify, watch: D41)

__all__ = ["main", "admin", "backend", "drift", "events", "mount", "policy", "role", "sidecar", "stats", "timetravel",
           "watch"]
