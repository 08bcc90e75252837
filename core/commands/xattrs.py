"""Extended attributes: which names a caller may use, and the in-process copy of the stored ones.

Only the `user.` namespace is stored (table filestore.xattrs, written by the setxattr and
removexattr commands). `user.filestore.*` is computed, never stored, and read-only. The other
namespaces Linux knows (`security.`, `system.`, `trusted.`) are answered as by a filesystem
that keeps none: nothing to get (ENODATA), nothing to set (EOPNOTSUPP). A name in no known
namespace is EOPNOTSUPP, as the VFS answers natively.
"""
from __future__ import annotations

import errno

from core.errors import FsError
from core.storage.db import Database

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
USER = b"user."
VIRTUAL = b"user.filestore."
_KERNEL_NAMESPACES = (b"security.", b"system.", b"trusted.")


def check_readable(name: bytes) -> bool:
    """True if `name` may be stored; False for a known namespace that holds nothing here."""
    if name.startswith(USER):
        return True
    if name.startswith(_KERNEL_NAMESPACES):
        return False
    raise FsError(errno.EOPNOTSUPP, f"no such xattr namespace: {name[:32]!r}")


def check_namespace(name: bytes) -> None:
    """EOPNOTSUPP for a name outside `user.`: the answer of a filesystem without such
    attributes, not a refusal (tools such as mv and cp -a try them as a matter of course)."""
    if not check_readable(name):
        raise FsError(errno.EOPNOTSUPP, f"{name.split(b'.')[0].decode(errors='replace')} attributes are not kept")


def check_writable(name: bytes, value: bytes | None) -> None:
    """The errno Linux gives for a name or value it refuses, before anything is touched."""
    if len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE, "xattr name longer than 255 bytes")
    if value is not None and len(value) > XATTR_SIZE_MAX:
        raise FsError(errno.E2BIG, "xattr value larger than 64 KiB")
    check_namespace(name)
    if name == USER:
        raise FsError(errno.EINVAL, "empty xattr name")
    if name.startswith(VIRTUAL):
        raise FsError(errno.EPERM, "user.filestore.* attributes are read-only")


def kept_by(backend, setting: str) -> bool:
    """Does this backend keep extended attributes? (FILESTORE_XATTRS / `filestore mount
    --xattrs`: on, off, or auto: the backends added with `--xattrs`.)"""
    if setting in ("on", "off"):
        return setting == "on"
    return bool((backend.options or {}).get("xattrs"))


def served(backends, setting: str) -> bool:
    """Does a mount of these backends serve extended attributes at all? When none keeps them
    the mount answers ENOSYS once and the kernel never asks again: no round trip per `ls -l`
    entry (GNU ls probes two attributes of each) nor per write (security.capability)."""
    return any(kept_by(b, setting) for b in backends)


class XattrCache:
    """The stored attributes of the nodes asked about, loaded per node on first use.

    Changed only after the command that changed the table committed (`put`/`drop`)."""

    def __init__(self, db: Database):
        self.db = db
        self._by_node: dict[int, dict[bytes, bytes]] = {}

    def of(self, node_id: int) -> dict[bytes, bytes]:
        found = self._by_node.get(node_id)
        if found is None:
            rows = self.db.query("SELECT name, value FROM filestore.xattrs WHERE node_id = %s", (node_id,))
            found = self._by_node[node_id] = {bytes(n): bytes(v) for n, v in rows}
        return found

    def put(self, node_id: int, name: bytes, value: bytes) -> None:
        self.of(node_id)[name] = value

    def drop(self, node_id: int, name: bytes) -> None:
        self.of(node_id).pop(name, None)

    def forget(self, node_id: int) -> None:
        """Reload from the table on next use (after a change made outside a command)."""
        self._by_node.pop(node_id, None)
