"""Principals as operators name them, and as the kernel gives them to the mount.

Through the mount a principal is the caller's uid, gid and supplementary groups: FUSE passes
uid, gid and pid; the groups are read from /proc/PID/status (as NFS AUTH_SYS carries them).
At the CLI and for sidecars it is the PostgreSQL role the connection logs in as.
"""
from __future__ import annotations

import grp
import pwd
import time

from core.errors import ConfigError

GROUPS_TTL_SECONDS = 1.0  # a process's groups change only with CAP_SETGID: cached that long per pid
_groups: dict[tuple[int, int, int], tuple[float, frozenset[int]]] = {}


def user_id(name_or_id: str) -> int:
    if name_or_id.isdigit():
        return int(name_or_id)
    try:
        return pwd.getpwnam(name_or_id).pw_uid
    except KeyError:
        raise ConfigError(f"no user named {name_or_id!r}") from None


def group_id(name_or_id: str) -> int:
    if name_or_id.isdigit():
        return int(name_or_id)
    try:
        return grp.getgrnam(name_or_id).gr_gid
    except KeyError:
        raise ConfigError(f"no group named {name_or_id!r}") from None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def groups_of_user(uid: int) -> frozenset[int]:
    """The groups a user is given at login (its passwd group and /etc/group memberships), for
    `filestore policy check --user U`, which has no process to read them from."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    import os
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


def groups_of_process(pid: int | None, uid: int | None, gid: int | None) -> frozenset[int]:
    """The calling process's gid and supplementary groups (the `Groups:` line of its status)."""
    base = frozenset(() if gid is None else (gid,))
    if pid is None or pid <= 0:
        return base
    key = (pid, uid or 0, gid or 0)
    now = time.monotonic()
    cached = _groups.get(key)
    if cached is not None and now - cached[0] < GROUPS_TTL_SECONDS:
        return cached[1]
    found = base
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    found = base | frozenset(int(g) for g in line.split()[1:])
                    break
    except OSError:  # the process is gone: its own gid only
        pass
    if len(_groups) > 10_000:
        _groups.clear()
    _groups[key] = (now, found)
    return found
