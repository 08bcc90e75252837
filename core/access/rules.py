"""Access rules compiled for the hot path: who holds which scope where (docs/architecture.md D42).

A rule is a row of filestore.access_rules. `Policy.compile` groups them by backend, so a check
looks only at the grants of one backend (its own and those for every backend) and compares path
prefixes component by component. A decision names the rule that made it, for the journal and
`filestore policy check`.

Decision, for a principal (uid, gids, PostgreSQL role) at backend:/path:
- no grant applies to the backend: open (POSIX mode bits alone decide, as with no policy);
- else the principal's scope is the highest of the grants naming it (its uid, one of its
  groups, its role, or everyone) at a prefix of the path; read < write < admin;
- read needs read, a change needs write, a delete or a move needs write, or the scope a
  protection covering the path asks for (the highest, if several).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SCOPES = ("read", "write", "admin")
RANK = {scope: rank for rank, scope in enumerate(SCOPES, start=1)}
ACTIONS = ("read", "write", "delete", "move")
NEEDS = {"read": "read", "write": "write", "delete": "write", "move": "write"}


@dataclass(frozen=True)
class Rule:
    id: int
    kind: str  # grant | protect
    scope: str
    subject_kind: str | None  # user | group | role | everyone (grants)
    subject: str | None
    backend: str | None  # None: every backend
    prefix: str = ""
    action: str | None = None  # delete | move (protections)

    @property
    def where(self) -> str:
        return f"{self.backend or '*'}:/{self.prefix}"

    def describe(self) -> str:
        if self.kind == "protect":
            return f"#{self.id} protect {self.where} {self.action} needs {self.scope}"
        who = "everyone" if self.subject_kind == "everyone" else f"{self.subject_kind} {self.subject}"
        return f"#{self.id} grant {self.scope} to {who} on {self.where}"


@dataclass(frozen=True)
class Who:
    """A principal as the mount's policies see it: uid and every gid (primary and supplementary)."""
    uid: int | None
    gids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    action: str
    needs: str
    holds: str | None  # the scope the principal holds there (None: none)
    rule: Rule | None  # the grant that allowed, the protection that asked for more, or None
    reason: str

    def as_dict(self) -> dict:
        return {"allowed": self.allowed, "action": self.action, "needs": self.needs, "holds": self.holds,
                "rule": self.rule.id if self.rule else None, "reason": self.reason}


def _parts(path: str | bytes) -> tuple:
    if isinstance(path, bytes):
        return tuple(p for p in path.split(b"/") if p)
    return tuple(p.encode() for p in path.split("/") if p)


def within(path: tuple, prefix: tuple) -> bool:
    return path[:len(prefix)] == prefix


@dataclass
class BackendRules:
    """One backend's rules, grants indexed by whom they name: a check reads only the grants of
    the caller's uid, its groups and everyone, however many other principals have grants."""
    users: dict[str, list[tuple[tuple, Rule]]] = field(default_factory=dict)
    groups: dict[str, list[tuple[tuple, Rule]]] = field(default_factory=dict)
    everyone: list[tuple[tuple, Rule]] = field(default_factory=list)
    protections: list[tuple[tuple, Rule]] = field(default_factory=list)
    closed: bool = False

    def add(self, rule: Rule) -> None:
        entry = (_parts(rule.prefix), rule)
        if rule.kind == "protect":
            self.protections.append(entry)
            return
        self.closed = True
        if rule.subject_kind == "user":
            self.users.setdefault(rule.subject, []).append(entry)
        elif rule.subject_kind == "group":
            self.groups.setdefault(rule.subject, []).append(entry)
        else:
            self.everyone.append(entry)

    def naming(self, who: Who) -> Iterator[tuple[tuple, Rule]]:
        """The grants that name `who`."""
        if who.uid is not None:
            yield from self.users.get(str(who.uid), ())
        if self.groups:
            for gid in who.gids:
                yield from self.groups.get(str(gid), ())
        yield from self.everyone


class Policy:
    """Every rule, grouped by backend name. `closed(backend)` says whether any grant applies."""

    def __init__(self, rules: Iterable[Rule], version: int = 0):
        self.version = version
        self.rules = sorted(rules, key=lambda r: r.id)
        # A role's grants are the database's business (core.access.roles: GRANTs and row-level
        # security); the OS principals of a mount are never a PostgreSQL role.
        checked = [r for r in self.rules if r.subject_kind != "role"]
        everywhere = [r for r in checked if r.kind == "grant" and r.backend is None]
        self.everywhere = BackendRules()
        for rule in everywhere:
            self.everywhere.add(rule)
        self.by_backend: dict[str, BackendRules] = {}
        for rule in checked:
            if rule.backend is None:
                continue
            entry = self.by_backend.get(rule.backend)
            if entry is None:
                entry = self.by_backend[rule.backend] = BackendRules()
                for shared in everywhere:  # grants for every backend apply here too
                    entry.add(shared)
            entry.add(rule)
        self.uses_groups = any(r.subject_kind == "group" for r in checked)
        # Is any backend closed? With grants for every backend, all of them are.
        self.any_grants = any(r.kind == "grant" for r in checked)

    def _of(self, backend: str) -> BackendRules:
        found = self.by_backend.get(backend)
        return found if found is not None else self.everywhere

    def closed(self, backend: str) -> bool:
        return self._of(backend).closed

    def held(self, who: Who, backend: str, path: tuple) -> tuple[str | None, Rule | None]:
        """The highest scope `who` holds at path, and the grant giving it (the longest prefix
        among equals)."""
        best, best_rule, best_len = 0, None, -1
        for prefix, rule in self._of(backend).naming(who):
            if within(path, prefix):
                rank = RANK[rule.scope]
                if rank > best or (rank == best and len(prefix) > best_len):
                    best, best_rule, best_len = rank, rule, len(prefix)
        return (SCOPES[best - 1] if best else None), best_rule

    def traversable(self, who: Who, backend: str, path: tuple) -> bool:
        """Is path an ancestor of a prefix `who` holds a grant on? Such directories may be looked
        up (to reach the grant), not listed: as a directory with mode --x."""
        return any(len(prefix) > len(path) and within(prefix, path) for prefix, _ in self._of(backend).naming(who))

    def needed(self, backend: str, action: str, path: tuple) -> tuple[str, Rule | None]:
        needs, by = NEEDS[action], None
        if action in ("delete", "move"):
            for prefix, rule in self._of(backend).protections:
                # a move of a name at or below a protected prefix, or of one of its ancestors
                covers = within(path, prefix) or (action == "move" and within(prefix, path))
                if rule.action == action and covers and RANK[rule.scope] > RANK[needs]:
                    needs, by = rule.scope, rule
        return needs, by

    def decide(self, who: Who, backend: str, path: str | bytes | tuple, action: str) -> Decision:
        parts = path if isinstance(path, tuple) else _parts(path)
        needs, protection = self.needed(backend, action, parts)
        if not self._of(backend).closed:
            return Decision(True, action, needs, None, None, f"backend {backend} has no policy: mode bits decide")
        holds, grant = self.held(who, backend, parts)
        shown = "/" + b"/".join(parts).decode("utf-8", "backslashreplace")
        if holds is not None and RANK[holds] >= RANK[needs]:
            return Decision(True, action, needs, holds, grant, f"allowed by {grant.describe()}")
        if holds is not None and protection is not None and RANK[holds] >= RANK["write"]:
            return Decision(False, action, needs, holds, protection,
                            f"refused by {protection.describe()} (holds {holds} by #{grant.id})")
        if holds is not None:
            return Decision(False, action, needs, holds, grant,
                            f"refused: {action} needs {needs}, {grant.describe()} gives {holds}")
        return Decision(False, action, needs, None, None,
                        f"refused: no grant names this principal at {backend}:{shown} (backend closed by policy)")
