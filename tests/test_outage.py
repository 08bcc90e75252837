"""A PostgreSQL outage while mounted: commands fail cleanly with EIO, nothing is lost, and the
mount heals by itself when the server is back. The outage is real: the server is stopped."""
from __future__ import annotations

import errno
import os

import psycopg
import pytest
from conftest import Mount, assert_consistent, run_cli


@pytest.fixture
def own_server(tmp_path):
    """A PostgreSQL of this test's own, so that stopping it disturbs no other test."""
    from core.storage.embedded_pg import load_pgserver

    server = load_pgserver(tmp_path / "pg-run").get_server(tmp_path / "pg-data", cleanup_mode=None)
    yield server
    server.stop()


def test_database_outage_fails_cleanly_and_heals(tmp_path, own_server):
    url = own_server.get_uri()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESTORE_", "DATABASE_URL"))}
    env.update(FILESTORE_HOME=str(tmp_path / "home"), DATABASE_URL=url, REDIS_URL="inline")
    root = tmp_path / "backend"
    root.mkdir()
    run_cli(env, "backend", "add", "local", str(root))
    mount = Mount(env, tmp_path / "mnt", tmp_path / "mount.log").start()
    base = tmp_path / "mnt" / "local"
    try:
        (base / "before.txt").write_bytes(b"committed before the outage")
        own_server.stop()

        with pytest.raises(OSError) as exc:
            os.mkdir(base / "during")
        assert exc.value.errno == errno.EIO
        # The mount still serves what it knows: reads need no database.
        assert (base / "before.txt").read_bytes() == b"committed before the outage"

        own_server.start()
        # The next command heals first: the directory made during the outage is adopted.
        (base / "after.txt").write_bytes(b"after")
        assert sorted(os.listdir(base)) == ["after.txt", "before.txt", "during"]
        with psycopg.connect(url, autocommit=True) as db:
            rows = db.execute("SELECT command, actor, args->>'intent' FROM filestore.journal_entries"
                              " WHERE command IN ('recover', 'mkdir') ORDER BY id").fetchall()
            assert rows == [("recover", "recovery", "mkdir")]
    finally:
        mount.stop()
    with psycopg.connect(url, autocommit=True) as db:
        assert_consistent(db, "local", root)
