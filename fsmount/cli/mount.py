"""`filestore mount|umount`, and the mount helper behind `mount -t fuse.filestore` (fstab)."""
from __future__ import annotations

import os
import sys

import click

from core.service import open_database

from . import main, one_line_errors, settings


@main.command("mount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process instead of detaching.")
@click.option("--plain-dir-sizes", is_flag=True,
              help="Report 4096 as a directory's st_size instead of its recursive size (FILESTORE_DIR_SIZES=plain).")
@click.option("--xattrs/--no-xattrs", default=None,
              help="Extended attributes on every backend, or on none (FILESTORE_XATTRS=on|off). Default: on for "
                   "the backends added with --xattrs only; off costs `ls -l` no round trip per entry.")
@one_line_errors
def mount(mountpoint: str, foreground: bool, plain_dir_sizes: bool, xattrs: bool | None) -> None:
    """Mount every backend under MOUNTPOINT (/MOUNTPOINT/NAME/...).

    Detaches and returns once the mount is ready, like other FUSE tools.

    Example: filestore mount /mnt/filestore
    """
    if plain_dir_sizes:
        os.environ["FILESTORE_DIR_SIZES"] = "plain"  # the detached server reads it too
    if xattrs is not None:
        os.environ["FILESTORE_XATTRS"] = "on" if xattrs else "off"
    # pyfuse3 and trio: only the commands that mount or unmount load them (admin commands start faster)
    from .. import mount as mounting
    conf = settings()
    if foreground:
        mounting.serve(conf, mountpoint)
        return
    mounting.check_mountpoint(mountpoint)
    open_database(conf).close()  # fail here, in one line, if the database is unreachable
    pid = mounting.launch_detached(conf, mountpoint)
    click.echo(f"mounted {mountpoint} (pid {pid})")


@main.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@one_line_errors
def umount(mountpoint: str) -> None:
    """Unmount MOUNTPOINT; data committed on close is already safe.

    Example: filestore umount /mnt/filestore
    """
    from .. import mount as mounting
    mounting.unmount(mountpoint, settings())
    click.echo(f"unmounted {mountpoint}")


# `-o` options of an fstab line: these become the environment of the mount; the generic ones
# mount(8) and mount.fuse3 pass along (rw, defaults, _netdev, x-systemd.*...) mean nothing here.
_ENV_OPTIONS = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL", "backends_path": "FILESTORE_BACKENDS_PATH"}
_FLAG_OPTIONS = {"xattrs": ("FILESTORE_XATTRS", "on"), "noxattrs": ("FILESTORE_XATTRS", "off"),
                 "plain_dir_sizes": ("FILESTORE_DIR_SIZES", "plain")}


def mount_helper(home: str, mountpoint: str, rest: list[str]) -> None:
    """`filestore HOME MOUNTPOINT [-o opt[,opt...]]`, as mount.fuse3 runs it for an fstab line
    such as `/var/lib/filestore /mnt/filestore fuse.filestore defaults,_netdev 0 0`: mounts
    FILESTORE_HOME=HOME at MOUNTPOINT, detached, and returns once it is ready (like `mount`)."""
    options: list[str] = []
    args = iter(rest)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        else:
            print(f"filestore: unexpected argument {arg!r} (usage: filestore HOME MOUNTPOINT [-o OPTIONS])",
                  file=sys.stderr)
            sys.exit(2)
    os.environ["FILESTORE_HOME"] = os.path.abspath(home)
    for option in filter(None, options):
        key, _, value = option.partition("=")
        if key in _ENV_OPTIONS and value:
            os.environ[_ENV_OPTIONS[key]] = value
        elif key in _FLAG_OPTIONS:
            name, setting = _FLAG_OPTIONS[key]
            os.environ[name] = setting
    mount.main([mountpoint], prog_name="filestore", standalone_mode=True)
