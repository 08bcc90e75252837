"""Backends whose roots nest: a change made through one is a change of the other too.

Two local backends may track the same files (one root inside the other, or the same root
twice). After a command is answered in one, the paths it touched are translated into every
overlapping backend and adopted there from the disk (core.journal.recovery.Adoption), journaled as a
`mirror` command of actor `overlap` that names the source command, so the nodes, rollups,
counters and events of both backends agree without waiting for a watcher.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

from core.journal.intents import Intent
from core.model import Backend, Principal
from executors.local import STAGING_NAME

log = logging.getLogger(__name__)

OVERLAP = Principal.system("overlap")


@dataclass(frozen=True)
class Overlap:
    other: Backend
    prefix: bytes  # the inner root relative to the outer one (b"" for the same root)
    inward: bool  # True: this backend is the outer one, paths lose the prefix

    def translate(self, rel: bytes) -> bytes | None:
        if not self.inward:
            return self.prefix + b"/" + rel if self.prefix and rel else (rel or self.prefix)
        if not self.prefix:
            return rel
        if rel.startswith(self.prefix + b"/"):
            inner = rel[len(self.prefix) + 1:]
            return None if inner.split(b"/", 1)[0] == STAGING_NAME else inner
        return None


def find(backends: list[Backend]) -> dict[int, list[Overlap]]:
    """For each backend, the backends that see some of its paths."""
    out: dict[int, list[Overlap]] = {}
    local = [b for b in backends if b.kind == "local"]
    for outer in local:
        for inner in local:
            if outer.id == inner.id:
                continue
            rel = os.path.relpath(os.path.realpath(inner.root), os.path.realpath(outer.root))
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                continue
            prefix = b"" if rel == os.curdir else os.fsencode(rel)
            out.setdefault(outer.id, []).append(Overlap(inner, prefix, True))
            if prefix:  # the same root twice is found from both sides already
                out.setdefault(inner.id, []).append(Overlap(outer, prefix, False))
    return out


def mirror(fs, backend: Backend, command: str, request_id: uuid.UUID, paths: tuple[bytes, ...]) -> None:
    for overlap in fs.overlaps.get(backend.id, []):
        translated = [overlap.translate(p) for p in paths]
        seen = tuple(p for p in translated if p)
        if not seen or overlap.other.executor is None:
            continue
        # A rename seen from both ends is a move there too; seen from one end, a removal or
        # an arrival: each path adopted as the disk has it.
        intent_command = command if len(seen) == len(paths) else "mirror"
        try:
            fs.adoption.resolve(overlap.other, Intent(uuid.uuid4(), intent_command, overlap.other.id, seen),
                                command="mirror", who=OVERLAP,
                                source={"source_backend": backend.name, "source_command": command,
                                        "source_request_id": str(request_id)})
        except Exception:  # the source command stands; the watcher or the next start adopts it
            log.exception("could not mirror %s into backend %s", command, overlap.other.name)
