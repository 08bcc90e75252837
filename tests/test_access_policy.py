"""`filestore policy`: grants, revokes, protections and checks at the CLI, each change a journaled
command with its principal and an event; no policy at all leaves POSIX alone (D42). The mount's
enforcement is tests/test_access_mount.py."""
from __future__ import annotations

import json
import os

from conftest import run_cli
from test_cli import assert_one_line_error, json_out
from test_events import valid


def check(env, user: str, path: str, *groups: str) -> dict:
    extra = [a for g in groups for a in ("--group", g)]
    return json_out(run_cli(env, "policy", "check", "--user", user, *extra, path, "--json"))["decisions"]


def test_no_policy_means_open(env, tmp_path):
    (tmp_path / "b").mkdir()
    run_cli(env, "backend", "add", "data", str(tmp_path / "b"))
    assert json_out(run_cli(env, "policy", "list", "--json"))["rules"] == []
    for action, decision in check(env, "4001", "data:/x").items():
        assert decision["allowed"] and decision["rule"] is None, (action, decision)


def test_grant_list_check_revoke_journaled_with_events(env, tmp_path, db):
    (tmp_path / "b").mkdir()
    (tmp_path / "o").mkdir()
    run_cli(env, "backend", "add", "data", str(tmp_path / "b"))
    run_cli(env, "backend", "add", "other", str(tmp_path / "o"))
    before = db.execute("SELECT coalesce(max(id), 0) FROM filestore.journal_entries").fetchone()[0]

    out = run_cli(env, "policy", "grant", "write", "--user", "4001", "--path", "data:/ingest/").stdout
    assert "rule #" in out
    run_cli(env, "policy", "grant", "read", "--group", "root", "--path", "data:/")
    run_cli(env, "policy", "protect", "data:/ingest/releases", "--delete", "admin", "--move", "admin")
    rules = json_out(run_cli(env, "policy", "list", "--json"))["rules"]
    assert [(r["kind"], r["scope"], r["subject_kind"], r["subject"], r["backend"], r["prefix"], r["action"])
            for r in rules] == [
        ("grant", "write", "user", "4001", "data", "ingest", None),
        ("grant", "read", "group", "0", "data", "", None),
        ("protect", "admin", None, None, "data", "ingest/releases", "delete"),
        ("protect", "admin", None, None, "data", "ingest/releases", "move"),
    ]

    inside = check(env, "4001", "data:/ingest/a.csv", "4001")
    assert all(inside[a]["allowed"] for a in ("read", "write", "delete", "move"))
    assert inside["write"]["rule"] == rules[0]["id"]
    outside = check(env, "4001", "data:/elsewhere/a.csv", "4001")
    assert not any(d["allowed"] for d in outside.values())
    released = check(env, "4001", "data:/ingest/releases/v1.tar", "4001")
    assert released["write"]["allowed"] and not released["delete"]["allowed"] and not released["move"]["allowed"]
    assert released["delete"]["rule"] == rules[2]["id"] and released["move"]["rule"] == rules[3]["id"]
    reader = check(env, "4002", "data:/ingest/a.csv", "0")  # through group root (gid 0)
    assert reader["read"]["allowed"] and not reader["write"]["allowed"]
    assert reader["read"]["rule"] == rules[1]["id"]
    assert check(env, "4001", "other:/x")["write"]["allowed"], "no grant applies to other: it stays open"
    assert not check(env, "0", "data:/x", "0")["write"]["allowed"], "root only reads, like its group"
    text = run_cli(env, "policy", "check", "--user", "4001", "--group", "4001", "data:/ingest/releases/v1").stdout
    assert "delete  refused" in text and "protect" in text

    run_cli(env, "policy", "revoke", "write", "--user", "4001", "--path", "data:/ingest")
    assert not check(env, "4001", "data:/ingest/a.csv", "4001")["write"]["allowed"]
    run_cli(env, "policy", "protect", "data:/ingest/releases", "--delete", "none")
    assert len(json_out(run_cli(env, "policy", "list", "--json"))["rules"]) == 2

    rows = db.execute("SELECT command, status, actor, uid, pid, args FROM filestore.journal_entries WHERE id > %s"
                      " ORDER BY id", (before,)).fetchall()
    assert [r[0] for r in rows] == ["policy.grant", "policy.grant", "policy.protect", "policy.revoke",
                                    "policy.protect"]
    assert all(r[1] == "committed" and r[2] == "cli" and r[3] == os.getuid() and r[4] for r in rows)
    assert rows[0][5]["scope"] == "write" and rows[0][5]["subject"] == "4001"
    events = valid([json.loads(line) for line in run_cli(env, "events", "tail", "--json", "--from", str(before + 1),
                                                         "--type", "filestore.command.completed").stdout.splitlines()])
    assert [e["command"] for e in events if e["command"].startswith("policy.")] == [r[0] for r in rows]


def test_everywhere_grant_and_everyone(env, tmp_path):
    (tmp_path / "b").mkdir()
    run_cli(env, "backend", "add", "data", str(tmp_path / "b"))
    run_cli(env, "policy", "grant", "admin", "--user", "0")  # no --path: every backend
    assert check(env, "0", "data:/x")["delete"]["allowed"]
    assert not check(env, "4001", "data:/x", "4001")["read"]["allowed"]
    run_cli(env, "policy", "grant", "read", "--everyone", "--path", "data:/pub")
    assert check(env, "4001", "data:/pub/x", "4001")["read"]["allowed"]
    assert not check(env, "4001", "data:/pub/x", "4001")["write"]["allowed"]


def test_bad_input_one_line(env, tmp_path):
    (tmp_path / "b").mkdir()
    run_cli(env, "backend", "add", "data", str(tmp_path / "b"))
    assert_one_line_error(run_cli(env, "policy", "grant", "write", "--user", "no-such-user-x", check=False),
                          "no user named")
    assert_one_line_error(run_cli(env, "policy", "grant", "write", "--user", "1", "--path", "nope:/x",
                                  check=False), "no backend named")
    run_cli(env, "policy", "grant", "write", "--user", "1", "--path", "data:/x")
    assert_one_line_error(run_cli(env, "policy", "grant", "write", "--user", "1", "--path", "data:/x",
                                  check=False), "exists already")
    assert_one_line_error(run_cli(env, "policy", "revoke", "read", "--user", "1", "--path", "data:/x",
                                  check=False), "no such grant")
    assert run_cli(env, "policy", "grant", "write", "--user", "1", "--group", "2", check=False).returncode == 2
    assert run_cli(env, "policy", "grant", "write", check=False).returncode == 2
