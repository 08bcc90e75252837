"""`filestore mount|umount`."""
from __future__ import annotations

import os

import click

from core.service import open_database

from .. import mount as mounting
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
    mounting.unmount(mountpoint, settings())
    click.echo(f"unmounted {mountpoint}")
