"""The mount's access check: one call per FUSE operation, on top of the kernel's POSIX check.

`Gate.enforcing` is False while no grant exists anywhere: the handlers test that one attribute
and go on, so an installation without policies pays nothing (D42). Otherwise `check` finds the
backend and backend-relative path the operation touches, decides with the compiled policy
(core.access.rules), and refuses with EACCES, after journaling the refusal as a failed command
whose error names the rule that decided (through the pipeline, like every row).

The policy is recompiled when its generation moves: polled every FILESTORE_ACCESS_POLL_SECONDS
(0.25 s without Redis; a 5 s safety net with Redis, where `filestore policy` publishes each
change on ACCESS_CHANNEL and every mount reloads at once).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Protocol

from core.access import principals, store
from core.access.rules import Decision, Policy, Who
from core.commands.template import Command
from core.model import ROOT_INODE, Principal, display_name
from core.observe import metrics
from core.storage.db import Database
from core.view.namespace import Namespace

log = logging.getLogger(__name__)

ACCESS_CHANNEL = "filestore:access"


class Refusals(Protocol):
    """Where a refusal is journaled: the commands' template (core.commands.template.Template)."""

    def refuse(self, cmd: Command, code: int, message: str = "") -> Exception: ...


class Gate:
    def __init__(self, db: Database, ns: Namespace, refusals: Refusals, redis_url: str = "inline"):
        self.db = db
        self.ns = ns
        self.refusals = refusals
        self.redis_url = redis_url
        self.policy = Policy([])
        self.enforcing = False
        self._lock = threading.Lock()
        self.reload()

    # -- the policy in memory ----------------------------------------------------------
    def reload(self) -> None:
        with self._lock:
            policy = store.load(self.db)
            if policy.version != self.policy.version or policy.rules != self.policy.rules:
                log.info("access policy generation %d: %d rules", policy.version, len(policy.rules))
            self.policy = policy
            self.enforcing = policy.any_grants

    def run(self, stop: threading.Event) -> None:
        """Keep the policy current (a worker thread: core.service.start_workers)."""
        shared = self.redis_url != "inline"
        if shared:
            threading.Thread(target=self._listen, args=(stop,), name="access-announcements", daemon=True).start()
        interval = float(os.environ.get("FILESTORE_ACCESS_POLL_SECONDS", "5" if shared else "0.25"))
        while not stop.wait(interval):
            self._poll()

    def _poll(self) -> None:
        try:
            if store.version(self.db) != self.policy.version:
                self.reload()
        except Exception as exc:  # the database away (a pool timeout...): the last policy stays in force
            log.debug("access policy not polled: %s", exc)

    def _listen(self, stop: threading.Event) -> None:
        import redis
        while not stop.is_set():
            try:
                client = redis.Redis.from_url(self.redis_url)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(ACCESS_CHANNEL)
                self._poll()  # a change made while (re)subscribing is not missed
                while not stop.is_set():
                    if pubsub.get_message(timeout=1.0):
                        self._poll()
            except Exception as exc:
                log.warning("access announcements lost (%s); polling meanwhile", exc)
                stop.wait(1.0)

    # -- checks (serving thread) -------------------------------------------------------
    def check(self, who: Principal, op: str, action: str, inode: int, name: bytes | None = None) -> None:
        """May `who` do `action` on the node `inode` (or on the name `name` in directory
        `inode`)? Raises FsError(EACCES), journaled, if not. Only called while enforcing."""
        policy = self.policy
        ns = self.ns
        if inode == ROOT_INODE:
            if name is None:
                return  # the mount root itself: the list of backends
            backend = ns.backend_by_name(name)
            if backend is None:
                return
            parts: tuple = ()
        else:
            backend, rel = ns.path_of(inode)
            parts = tuple(p for p in rel.split(b"/") if p)
            if name is not None:
                parts += (name,)
        if not policy.closed(backend.name):
            return
        subject = Who(who.uid, self._groups(who, policy))
        decision = policy.decide(subject, backend.name, parts, action)
        if decision.allowed:
            return
        if op == "lookup" and policy.traversable(subject, backend.name, parts):
            return  # on the way to a grant: may be looked up, not listed
        # the node refused, in its history; a name to add or remove is the row's path only
        self.refuse(who, op, backend, inode if name is None else None, parts, decision)

    def check_rename(self, who: Principal, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     exchange: bool) -> None:
        """A rename moves its source and writes its destination; a destination it replaces is
        deleted, which needs write or what a protection asks (RENAME_EXCHANGE: both names move)."""
        self.check(who, "rename", "move", old_parent, old_name)
        replaced = new_parent != ROOT_INODE and self.ns.child(new_parent, new_name) is not None
        self.check(who, "rename", "move" if exchange else ("delete" if replaced else "write"), new_parent, new_name)

    @staticmethod
    def _groups(who: Principal, policy: Policy) -> frozenset[int]:
        if not policy.uses_groups:
            return frozenset(() if who.gid is None else (who.gid,))
        return principals.groups_of_process(who.pid, who.uid, who.gid)

    def refuse(self, who: Principal, op: str, backend, node_id: int | None, parts: tuple, decision: Decision):
        metrics.bound(metrics.ACCESS_DENIED, backend.name, op).inc()
        path = display_name(b"/".join(parts))
        cmd = Command(op, who, backend, node_id=node_id, path=path, args={"access": decision.as_dict()})
        raise self.refusals.refuse(cmd, errno.EACCES, decision.reason)


def announce(redis_url: str) -> None:
    """Tell every mount sharing this Redis that the policy changed (they poll anyway)."""
    if redis_url == "inline":
        return
    import redis
    try:
        redis.Redis.from_url(redis_url).publish(ACCESS_CHANNEL, "changed")
    except Exception as exc:
        log.warning("policy change not announced (%s): mounts see it within their poll interval", exc)

