"""The database enforces the scopes too (D42): `filestore init` makes the group roles, `filestore
role create` a login role; a CLI connected as a read role (DATABASE_URL with that role, never the
superuser the tests otherwise use: superusers bypass row-level security) cannot change anything,
and one limited to a backend does not see another backend's journal rows."""
from __future__ import annotations

import uuid

import psycopg
from conftest import run_cli
from test_cli import assert_one_line_error, json_out


def as_role(env: dict, role: str) -> dict:
    info = psycopg.conninfo.conninfo_to_dict(env["DATABASE_URL"])
    info["user"] = role
    return {**env, "DATABASE_URL": psycopg.conninfo.make_conninfo(**info)}


def two_backends(env, tmp_path) -> None:
    for name in ("data", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
        run_cli(env, "backend", "add", name, str(tmp_path / name))


def test_a_read_role_changes_nothing_and_sees_only_its_backend(env, tmp_path, db):
    two_backends(env, tmp_path)
    assert "filestore_read" in run_cli(env, "init").stderr
    role = f"ops_{uuid.uuid4().hex[:8]}"  # roles are the cluster's: a name of this test's own
    out = run_cli(env, "role", "create", role, "--scope", "read", "--backend", "data").stdout
    assert "limited to data" in out
    reader = as_role(env, role)

    rows = json_out(run_cli(reader, "journal", "--json"))
    assert rows, "the reader sees the journal"
    backends = {b: i for i, b in db.execute("SELECT id, name FROM filestore.backend_mounts").fetchall()}
    seen = {r["path"] for r in rows}
    all_rows = db.execute("SELECT backend_id FROM filestore.journal_entries").fetchall()
    assert any(b == backends["other"] for b, in all_rows), "the other backend has journal rows"
    visible = {r["id"] for r in rows}
    hidden = {i for i, in db.execute("SELECT id FROM filestore.journal_entries WHERE backend_id = %s",
                                     (backends["other"],)).fetchall()}
    assert hidden and not visible & hidden, seen
    assert [b["name"] for b in json_out(run_cli(reader, "backend", "list", "--json"))] == ["data"]
    for args in (("du", "other:/"), ("history", "other:/f"), ("stats", "other")):
        assert_one_line_error(run_cli(reader, *args, check=False), "no backend named 'other'")
    run_cli(reader, "du", "data:/")
    run_cli(reader, "history", "data:/f")

    before = db.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()[0]
    assert_one_line_error(run_cli(reader, "backend", "remove", "data", check=False), "not allowed")
    assert_one_line_error(run_cli(reader, "policy", "grant", "read", "--everyone", check=False), "not allowed")
    assert_one_line_error(run_cli(reader, "rollups", "repair", "data:/", check=False), "not allowed")
    assert db.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()[0] == before
    assert db.execute("SELECT count(*) FROM filestore.backend_mounts WHERE state = 'active'").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM filestore.access_rules WHERE subject_kind = 'everyone'").fetchone()[0] == 0


def test_a_write_role_cannot_change_policies_or_backends_an_admin_role_can(env, tmp_path, db):
    two_backends(env, tmp_path)
    run_cli(env, "init")
    writer, admin = f"svc_{uuid.uuid4().hex[:8]}", f"adm_{uuid.uuid4().hex[:8]}"
    run_cli(env, "role", "create", writer, "--scope", "write")
    run_cli(env, "role", "create", admin, "--scope", "admin")
    assert_one_line_error(run_cli(as_role(env, writer), "policy", "grant", "read", "--everyone", check=False),
                          "not allowed")
    run_cli(as_role(env, writer), "rollups", "repair", "data:/")
    run_cli(as_role(env, admin), "policy", "grant", "read", "--user", "4001", "--path", "data:/")
    row = db.execute("SELECT db_role, actor FROM filestore.journal_entries WHERE command = 'policy.grant'"
                     " ORDER BY id DESC LIMIT 1").fetchone()
    assert row == (admin, "cli"), "the journal names the role the CLI connected as"
    run_cli(as_role(env, admin), "backend", "remove", "other")
    # the rows those roles appended are chained like any other (the chain's functions run as
    # the schema's owner: the roles may not update journal rows, D41/D42)
    run_cli(env, "journal", "verify")


def test_journal_filters_by_principal(env, tmp_path, db):
    two_backends(env, tmp_path)
    db.execute("UPDATE filestore.journal_entries SET uid = 4001, gid = 4100 WHERE id = (SELECT min(id)"
               " FROM filestore.journal_entries)")
    first = db.execute("SELECT min(id) FROM filestore.journal_entries").fetchone()[0]
    assert [r["id"] for r in json_out(run_cli(env, "journal", "--user", "4001", "--json"))] == [first]
    assert [r["id"] for r in json_out(run_cli(env, "journal", "--group", "4100", "--json"))] == [first]
    assert first not in [r["id"] for r in json_out(run_cli(env, "journal", "--user", "0", "--json"))]
    assert json_out(run_cli(env, "journal", "--user", "4001", "--group", "4002", "--json")) == []
