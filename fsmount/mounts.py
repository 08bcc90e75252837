"""Which mounts this process can see (/proc/self/mountinfo): cheap to import, for the admin
commands that only need to recognise a mount point (fsmount.mount brings in pyfuse3 and trio)."""
from __future__ import annotations

import os

from core.errors import ConfigError


def _mounts() -> list[tuple[str, str]]:
    """(mountpoint, filesystem type) of every mount this process can see."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1]))
    return out


def mounted_at(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    return any(point == target for point, _ in _mounts())


def filestore_mounts() -> list[str]:
    return [point for point, fstype in _mounts() if fstype == "fuse.filestore"]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.realpath(mountpoint)
    if not os.path.exists(path):
        raise ConfigError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    if mounted_at(path):
        raise ConfigError(f"{mountpoint} is already mounted")
    return path
