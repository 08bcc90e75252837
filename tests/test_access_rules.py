"""The compiled policy alone (core.access.rules, D42): which scope a principal holds where, what
each action needs, and which rule decides. The mount and the CLI run the same decisions
(tests/test_access_mount.py, tests/test_access_policy.py)."""
from __future__ import annotations

from core.access.rules import Policy, Rule, Who

ALICE = Who(4001, frozenset({4001, 4100}))
BOB = Who(4002, frozenset({4002}))


def grant(rule_id, scope, kind, subject, backend, prefix="") -> Rule:
    return Rule(rule_id, "grant", scope, kind, subject, backend, prefix)


def protect(rule_id, scope, backend, prefix, action) -> Rule:
    return Rule(rule_id, "protect", scope, None, None, backend, prefix, action)


def test_no_rule_is_open_and_enforces_nothing():
    policy = Policy([])
    assert not policy.any_grants
    decision = policy.decide(BOB, "data", "/x", "delete")
    assert decision.allowed and decision.rule is None


def test_prefixes_match_whole_components_and_the_highest_scope_wins():
    policy = Policy([grant(1, "write", "user", "4001", "data", "ingest"),
                     grant(2, "read", "user", "4001", "data", ""),
                     grant(3, "admin", "group", "4100", "data", "ingest/hot")])
    assert policy.decide(ALICE, "data", "ingest/a", "write").rule.id == 1
    assert not policy.decide(ALICE, "data", "ingest2/a", "write").allowed
    assert policy.decide(ALICE, "data", "ingest2/a", "read").rule.id == 2
    assert policy.decide(ALICE, "data", b"ingest/hot/x", "delete").rule.id == 3
    refused = policy.decide(BOB, "data", "ingest/a", "read")
    assert not refused.allowed and refused.holds is None
    assert policy.decide(BOB, "other", "x", "write").allowed, "no grant applies to other"


def test_ancestors_of_a_grant_are_traversable_not_readable():
    policy = Policy([grant(1, "write", "user", "4001", "data", "a/b")])
    assert policy.traversable(ALICE, "data", ()) and policy.traversable(ALICE, "data", (b"a",))
    assert not policy.traversable(ALICE, "data", (b"c",))
    assert not policy.traversable(BOB, "data", (b"a",))
    assert not policy.decide(ALICE, "data", "a", "read").allowed


def test_protections_ask_more_for_delete_and_move_only():
    policy = Policy([grant(1, "write", "everyone", None, "data"), grant(2, "admin", "user", "4002", "data"),
                     protect(3, "admin", "data", "releases", "delete"), protect(4, "admin", "data", "releases", "move")])
    assert policy.decide(ALICE, "data", "releases/v1", "write").allowed
    for action, rule in (("delete", 3), ("move", 4)):
        refused = policy.decide(ALICE, "data", "releases/v1", action)
        assert not refused.allowed and refused.rule.id == rule and refused.needs == "admin"
        assert policy.decide(BOB, "data", "releases/v1", action).allowed
    assert not policy.decide(ALICE, "data", "", "move").allowed, "moving an ancestor carries releases away"
    assert policy.decide(ALICE, "data", "", "delete").allowed
    assert policy.decide(ALICE, "data", "releasesX", "move").allowed


def test_grants_for_every_backend_close_every_backend_and_roles_close_none():
    policy = Policy([grant(1, "admin", "user", "0", None), grant(2, "read", "role", "ops", "data")])
    root = Who(0, frozenset({0}))
    assert policy.decide(root, "data", "x", "delete").allowed and policy.decide(root, "any", "x", "delete").allowed
    assert not policy.decide(BOB, "any", "x", "read").allowed
    only_roles = Policy([grant(2, "read", "role", "ops", "data")])
    assert not only_roles.any_grants and only_roles.decide(BOB, "data", "x", "write").allowed
