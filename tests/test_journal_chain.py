"""The journal's hash chain (docs/architecture.md D41): every row is chained in its own
transaction, whoever writes it; `filestore journal verify` finds a row changed or deleted in the
middle of the journal, and concurrent committers still give one chain."""
from __future__ import annotations

import json
import threading
import uuid

import psycopg
from conftest import run_cli

from core.storage import schema


def _record(conn: psycopg.Connection, n: int = 1, command: str = "note") -> list[int]:
    """n journal rows in one group commit, through the one write path (filestore.record_commands)."""
    payload = [{"j": {"command": command, "status": "committed", "actor": "cli", "uid": 0, "gid": 0, "pid": 1,
                      "request_id": str(uuid.uuid4()), "args": {"i": i, "text": "é\u2603"}}} for i in range(n)]
    rows = conn.execute("SELECT journal_id FROM filestore.record_commands(%s::jsonb)", (json.dumps(payload),))
    return [r[0] for r in rows.fetchall()]


def _setup(db, env) -> None:
    run_cli(env, "init")


def verify(env, *args: str):
    return run_cli(env, "journal", "verify", *args, check=False)


def test_intact_chain_verifies_and_every_row_is_chained(db, env):
    _setup(db, env)
    for _ in range(5):
        _record(db, 3)
    rows = db.execute("SELECT id, chain_prev, hash FROM filestore.journal_entries ORDER BY id").fetchall()
    assert rows and all(h is not None for _, _, h in rows)
    assert [p for _, p, _ in rows[1:]] == [i for i, _, _ in rows[:-1]]  # each after the one before, in id order
    done = verify(env)
    assert done.returncode == 0, done.stderr
    assert "journal chain intact: 15 rows checked" in done.stdout
    as_json = json.loads(verify(env, "--json").stdout)
    assert as_json["ok"] and as_json["head"]["id"] == rows[-1][0]


def test_a_row_changed_in_the_database_is_named(db, env):
    _setup(db, env)
    ids = [i for _ in range(4) for i in _record(db, 5)]
    victim = ids[9]
    db.execute("UPDATE filestore.journal_entries SET args = '{\"i\": 99}' WHERE id = %s", (victim,))
    done = verify(env)
    assert done.returncode == 1
    assert done.stderr.startswith(f"filestore: journal row {victim} does not match its hash"), done.stderr
    assert json.loads(verify(env, "--json").stdout)["first_mismatch"]["id"] == victim
    # From a later row on, the chain is intact again (its predecessor's stored hash is the reference).
    assert verify(env, "--since", str(victim + 1)).returncode == 0


def test_a_rehashed_row_is_found_at_the_next_row(db, env):
    """Changing a row and recomputing its own hash moves the mismatch to the row after it."""
    _setup(db, env)
    ids = _record(db, 6)
    victim = ids[2]
    db.execute("""UPDATE filestore.journal_entries j SET uid = 4242 WHERE id = %s""", (victim,))
    db.execute("""UPDATE filestore.journal_entries j SET hash = filestore.journal_row_hash(j,
                      (SELECT p.hash FROM filestore.journal_entries p WHERE p.id = j.chain_prev)) WHERE id = %s""",
               (victim,))
    done = verify(env)
    assert done.returncode == 1
    assert f"journal row {ids[3]} does not match" in done.stderr


def test_a_row_deleted_in_the_middle_is_named(db, env):
    _setup(db, env)
    ids = [i for _ in range(3) for i in _record(db, 4)]
    victim = ids[5]
    db.execute("DELETE FROM filestore.journal_entries WHERE id = %s", (victim,))
    done = verify(env)
    assert done.returncode == 1
    assert f"journal row {ids[6]} was chained after row {victim}, which is not there any more" in done.stderr


def test_concurrent_committers_give_one_chain(db, env, database_url):
    """Four connections committing groups at once (as four mounts would): one chain, in id order."""
    _setup(db, env)
    errors = []

    def committer():
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                for _ in range(40):
                    _record(conn, 3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=committer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert db.execute("SELECT count(*) FROM filestore.journal_entries WHERE command = 'note'").fetchone()[0] == 480
    done = verify(env)
    assert done.returncode == 0, done.stderr


def test_repeatable_read_writers_are_sealed_by_the_next_commit(db, env, database_url):
    """A REPEATABLE READ transaction (a rollup recalculation) cannot see a chain step committed
    after its snapshot: its row is written unchained and hashed by the next chain step."""
    _setup(db, env)
    _record(db, 2)
    with psycopg.connect(database_url) as rr:
        rr.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with rr.transaction():
            rr.execute("SELECT count(*) FROM filestore.journal_entries").fetchone()  # the snapshot is taken
            _record(db, 2)  # another committer moves the chain on meanwhile
            (sealed_later,) = _record(rr, 1, "rollups.recalculate")
    assert db.execute("SELECT hash FROM filestore.journal_entries WHERE id = %s", (sealed_later,)).fetchone()[0] is None
    _record(db, 1)
    assert db.execute("SELECT hash IS NOT NULL FROM filestore.journal_entries WHERE id = %s",
                      (sealed_later,)).fetchone()[0]
    assert db.execute("SELECT count(*) FROM filestore.journal_unchained").fetchone()[0] == 0
    assert verify(env).returncode == 0


def test_rows_from_before_the_upgrade_are_left_out(db, env):
    """The chain starts at the first row written after schema 11 (no backfill at upgrade)."""
    _setup(db, env)
    _record(db, 3)
    db.execute("ALTER TABLE filestore.journal_entries DISABLE TRIGGER USER")  # as a schema 8 database wrote them
    db.execute("UPDATE filestore.journal_entries SET hash = NULL, chain_prev = NULL")
    db.execute("DELETE FROM filestore.journal_chain")
    db.execute("ALTER TABLE filestore.journal_entries ENABLE TRIGGER USER")
    db.execute("DELETE FROM filestore.schema_versions WHERE version >= 11")  # as a schema 10 database: it upgrades
    schema.apply(db)
    last_old = db.execute("SELECT max(id) FROM filestore.journal_entries").fetchone()[0]
    assert db.execute("SELECT starts_after FROM filestore.journal_chain").fetchone()[0] == last_old
    _record(db, 2)
    done = verify(env)
    assert done.returncode == 0, done.stderr
    assert f"2 rows checked (rows up to {last_old} predate the chain)" in done.stdout
