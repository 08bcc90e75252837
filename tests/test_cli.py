"""The `filestore` command line: one-line errors with a non-zero exit, JSON output, the
detached mount, backends declared in a file, and the embedded PostgreSQL default."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import FILESTORE, REPO, assert_consistent, is_mounted, require_fuse, run_cli

UNREACHABLE = "postgresql://x@127.0.0.1:1/x"  # nothing listens on port 1


# -- helpers ---------------------------------------------------------------------------
def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 (the CLI's code for an error), nothing on stdout, one `filestore: ` line on stderr."""
    assert done.returncode == 1, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    lines = done.stderr.splitlines()
    assert len(lines) == 1, \
        f"expected one line on stderr, got {len(lines)}, first {lines[:1]}, last {lines[-1:]}"
    assert lines[0].startswith("filestore: "), lines[0]
    assert done.stdout == "", done.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def json_out(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # the whole of stdout is one document


def backend_summary(done: subprocess.CompletedProcess) -> list[dict]:
    return [{k: b[k] for k in ("name", "kind", "root", "read_only")} for b in json_out(done)]


def make_dir(path: Path, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True)
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    return path


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def postgres_processes(pgdata: Path) -> list[int]:
    """Live processes whose command line names this data directory (the postmaster's -D)."""
    found = []
    needle = os.fsencode(str(pgdata))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and process_alive(int(entry)):
            found.append(int(entry))
    return found


# -- errors: one line, exit 1 ----------------------------------------------------------
def test_mount_of_an_already_mounted_mountpoint(tracked):
    mountpoint = str(tracked.mount.mountpoint)
    (tracked.path / "f").write_bytes(b"before\n")
    for args in (("mount", mountpoint), ("mount", "--foreground", mountpoint)):
        assert_one_line_error(tracked.cli(*args, check=False), "already mounted")
    # the first mount keeps serving
    assert is_mounted(tracked.mount.mountpoint)
    assert tracked.mount.process.poll() is None
    (tracked.path / "f").write_bytes(b"after\n")
    assert (tracked.backend_root / "f").read_bytes() == b"after\n"


def test_mount_of_a_missing_mountpoint(cli, tmp_path):
    missing = tmp_path / "no-such-dir"
    for args in (("mount", str(missing)), ("mount", "--foreground", str(missing))):
        assert_one_line_error(cli(*args, check=False), str(missing))
        assert not missing.exists()
        assert not is_mounted(missing)


def test_unreachable_database(env, tmp_path):
    bad = dict(env, DATABASE_URL=UNREACHABLE)
    mountpoint = make_dir(tmp_path / "mnt")
    root = make_dir(tmp_path / "root")
    for args in (("init",), ("backend", "list"), ("backend", "add", "x", str(root)), ("journal", "--json"),
                 ("mount", str(mountpoint)), ("mount", "--foreground", str(mountpoint))):
        line = assert_one_line_error(run_cli(bad, *args, check=False))
        assert re.search(r"postgres|database", line, re.I), f"{args}: {line}"
        assert not is_mounted(mountpoint), args


def test_backend_add_of_a_missing_path(cli, tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(cli("backend", "add", "x", str(missing), check=False), str(missing))
    assert backend_summary(cli("backend", "list", "--json")) == []


def test_backend_add_of_a_duplicate_name(cli, tmp_path):
    first = make_dir(tmp_path / "first")
    second = make_dir(tmp_path / "second")
    cli("backend", "add", "dup", str(first))
    assert_one_line_error(cli("backend", "add", "dup", str(second), check=False), "dup")
    assert backend_summary(cli("backend", "list", "--json")) == \
        [{"name": "dup", "kind": "local", "root": str(first), "read_only": False}]


@pytest.fixture
def read_only_fs(tmp_path):
    """A directory holding a file, on a read-only bind mount."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    source = make_dir(tmp_path / "ro-src", {"kept.txt": b"kept\n"})
    target = make_dir(tmp_path / "ro-fs")
    subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def test_backend_add_read_only_on_a_read_only_filesystem(cli, read_only_fs):
    """Read-only media are what a read-only backend is for."""
    done = cli("backend", "add", "media", str(read_only_fs), "--read-only", check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    assert backend_summary(cli("backend", "list", "--json")) == \
        [{"name": "media", "kind": "local", "root": str(read_only_fs), "read_only": True}]


def test_backend_add_refused_by_the_disk_is_one_line(cli, read_only_fs):
    """Whatever the disk answers, the CLI succeeds or prints one line; never a traceback."""
    done = cli("backend", "add", "rw", str(read_only_fs), check=False)
    if done.returncode != 0:
        assert_one_line_error(done)
        assert backend_summary(cli("backend", "list", "--json")) == []


def test_backend_remove_of_an_unknown_name(cli, tmp_path):
    cli("backend", "add", "known", str(make_dir(tmp_path / "known")))
    assert_one_line_error(cli("backend", "remove", "ghost", check=False), "ghost")
    assert [b["name"] for b in backend_summary(cli("backend", "list", "--json"))] == ["known"]


def test_history_of_a_path_outside_any_mount(cli, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    assert_one_line_error(cli("history", str(plain), check=False), str(plain))
    assert_one_line_error(cli("history", str(plain), "--json", check=False), str(plain))


def test_history_of_a_missing_node(cli, tmp_path):
    cli("backend", "add", "b", str(make_dir(tmp_path / "b")))
    assert_one_line_error(cli("history", "b:/missing.txt", check=False), "missing.txt")
    assert_one_line_error(cli("history", "nobackend:/x", check=False), "nobackend")


def test_umount_of_something_not_mounted(cli, tmp_path):
    plain = make_dir(tmp_path / "plain")
    assert_one_line_error(cli("umount", str(plain), check=False), str(plain))


# -- success paths ---------------------------------------------------------------------
def test_backend_list_json_and_remove(cli, tmp_path):
    alpha = make_dir(tmp_path / "alpha", {"a.txt": b"a"})
    beta = make_dir(tmp_path / "beta")
    assert json_out(cli("backend", "list", "--json")) == []
    assert cli("backend", "add", "alpha", str(alpha)).returncode == 0
    assert cli("backend", "add", "beta", str(beta), "--read-only").returncode == 0
    listed = json_out(cli("backend", "list", "--json"))
    assert [{k: b[k] for k in ("name", "kind", "root", "read_only")} for b in listed] == [
        {"name": "alpha", "kind": "local", "root": str(alpha), "read_only": False},
        {"name": "beta", "kind": "local", "root": str(beta), "read_only": True},
    ]
    assert all(isinstance(b["root_node_id"], int) for b in listed)

    done = cli("backend", "remove", "alpha")
    assert done.returncode == 0 and done.stderr == ""
    assert backend_summary(cli("backend", "list", "--json")) == \
        [{"name": "beta", "kind": "local", "root": str(beta), "read_only": True}]
    assert (alpha / "a.txt").read_bytes() == b"a", "remove must leave the files where they are"
    # the name is free again
    again = make_dir(tmp_path / "alpha2")
    cli("backend", "add", "alpha", str(again))
    assert [(b["name"], b["root"]) for b in backend_summary(cli("backend", "list", "--json"))] == \
        [("alpha", str(again)), ("beta", str(beta))]


def test_history_json_by_mount_path_and_by_backend_path(tracked):
    (tracked.path / "dir").mkdir()
    target = tracked.path / "dir" / "file.txt"
    target.write_bytes(b"one\n")
    with open(target, "ab") as f:
        f.write(b"two\n")
    os.chmod(target, 0o600)
    node = tracked.node("dir/file.txt")
    expected = [(r["id"], r["command"], r["status"]) for r in tracked.journal() if r["node_id"] == node["id"]]
    assert [c for _, c, _ in expected] == ["create", "write", "write", "setattr"], expected

    by_path = json_out(tracked.cli("history", str(target), "--json"))
    by_name = json_out(tracked.cli("history", "local:/dir/file.txt", "--json"))
    assert by_path == by_name
    assert (by_path["node_id"], by_path["backend"], by_path["path"]) == (node["id"], "local", "dir/file.txt")
    assert [(e["id"], e["command"], e["status"]) for e in by_path["entries"]] == expected
    assert all(e["node_id"] == node["id"] for e in by_path["entries"])


def test_journal_json_limit_and_since(tracked):
    for i in range(5):
        (tracked.path / f"f{i}").write_bytes(b"x" * i)
    rows = tracked.journal()
    ids = [r["id"] for r in rows]
    assert len(ids) >= 8

    latest = json_out(tracked.cli("journal", "--limit", "3", "--json"))
    assert [e["id"] for e in latest] == ids[-3:]
    assert [(e["command"], e["status"]) for e in latest] == [(r["command"], r["status"]) for r in rows[-3:]]

    since = ids[2]
    after = json_out(tracked.cli("journal", "--since", str(since), "--json"))
    assert [e["id"] for e in after] == ids[3:]
    first_two = json_out(tracked.cli("journal", "--since", str(since), "--limit", "2", "--json"))
    assert [e["id"] for e in first_two] == ids[3:5]
    assert json_out(tracked.cli("journal", "--since", str(ids[-1]), "--json")) == []

    text = tracked.cli("journal", "--limit", "4")
    assert [int(line.split()[0]) for line in text.stdout.splitlines()] == ids[-4:]



def test_a_reader_that_stops_early_gets_no_error(tracked):
    """`filestore journal | head -1`: the command ends quietly, as a tool killed by SIGPIPE."""
    for i in range(5):
        (tracked.path / f"p{i}").write_bytes(b"x")
    tracked.settle()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run([*FILESTORE, "journal"], env=tracked.env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 128 + signal.SIGPIPE

def test_detached_mount_and_umount(cli, env, tmp_path):
    require_fuse()
    root = make_dir(tmp_path / "root", {"hello.txt": b"hello\n"})
    cli("backend", "add", "b", str(root))
    mountpoint = make_dir(tmp_path / "detached")
    pid = None
    try:
        done = cli("mount", str(mountpoint))
        assert done.returncode == 0
        assert is_mounted(mountpoint), "`filestore mount` returned before the mount was ready"
        found = re.search(r"pid (\d+)", done.stdout)
        assert found, done.stdout
        pid = int(found.group(1))
        assert (mountpoint / "b" / "hello.txt").read_bytes() == b"hello\n"
        (mountpoint / "b" / "new.txt").write_bytes(b"new\n")

        done = cli("umount", str(mountpoint))
        assert done.returncode == 0
        assert not is_mounted(mountpoint)
        assert not process_alive(pid), "the mount server is still running after umount returned"
        assert (root / "new.txt").read_bytes() == b"new\n"
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _declared_env(env: dict[str, str], path: Path) -> dict[str, str]:
    return dict(env, FILESTORE_BACKENDS_PATH=str(path))


def test_backends_declared_in_yaml(env, db, tmp_path):
    root = make_dir(tmp_path / "declared", {"kept.txt": b"kept\n"})
    path = tmp_path / "backends.yaml"
    path.write_text(f"backends:\n  - name: declared\n    path: {root}\n    read_only: true\n")
    declared = _declared_env(env, path)
    run_cli(declared, "init")
    expected = [{"name": "declared", "kind": "local", "root": str(root), "read_only": True}]
    assert backend_summary(run_cli(declared, "backend", "list", "--json")) == expected
    # applied once: opening the database again adds nothing
    assert backend_summary(run_cli(declared, "backend", "list", "--json")) == expected
    adds = db.execute("SELECT actor FROM filestore.journal_entries WHERE command = 'backend.add'").fetchall()
    assert adds == [("config",)]
    # its existing content was imported
    assert db.execute("SELECT count(*) FROM filestore.entries WHERE name = %s", (b"kept.txt",)).fetchone()[0] == 1
    # and without the variable the backend stays registered
    assert backend_summary(run_cli(env, "backend", "list", "--json")) == expected


def test_backends_declared_in_json(env, tmp_path):
    one = make_dir(tmp_path / "one")
    two = make_dir(tmp_path / "two")
    path = tmp_path / "backends.json"
    path.write_text(json.dumps([{"name": "one", "path": str(one)},
                                {"name": "two", "path": str(two), "read_only": True}]))
    declared = _declared_env(env, path)
    run_cli(declared, "init")
    assert backend_summary(run_cli(declared, "backend", "list", "--json")) == [
        {"name": "one", "kind": "local", "root": str(one), "read_only": False},
        {"name": "two", "kind": "local", "root": str(two), "read_only": True},
    ]


@pytest.mark.parametrize("filename,text", [
    ("backends.yaml", "backends: [unclosed\n"),
    ("backends.yaml", "backends:\n  - name: a\n    path: /x\n   bad: indent\n"),
    ("backends.json", '{"backends": ['),
    ("backends.yaml", "backends: 3\n"),
], ids=["yaml-syntax", "yaml-indent", "json-syntax", "not-a-list"])
def test_malformed_backends_file(env, tmp_path, filename, text):
    path = tmp_path / filename
    path.write_text(text)
    declared = _declared_env(env, path)
    assert_one_line_error(run_cli(declared, "backend", "list", "--json", check=False), str(path))
    assert backend_summary(run_cli(env, "backend", "list", "--json")) == []


# -- the embedded PostgreSQL default ---------------------------------------------------
def _embedded_env(env: dict[str, str], home: Path) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k != "DATABASE_URL"}
    out["FILESTORE_HOME"] = str(home)
    return out


def _stop_quietly(env: dict[str, str], home: Path) -> None:
    if (home / "pg" / "postmaster.pid").exists():
        run_cli(env, "db", "stop", check=False)


def test_embedded_default_lifecycle(env, tmp_path):
    home = tmp_path / "fs-home"
    emb = _embedded_env(env, home)
    pgdata = home / "pg"
    root = make_dir(tmp_path / "emb-root", {"a.txt": b"a"})
    try:
        done = run_cli(emb, "init")
        assert re.fullmatch(r"schema at version \d+\n", done.stdout), done.stdout
        assert (pgdata / "postmaster.pid").exists()
        assert postgres_processes(pgdata), "no postgres process serves the embedded data directory"

        run_cli(emb, "backend", "add", "emb", str(root))
        assert backend_summary(run_cli(emb, "backend", "list", "--json")) == \
            [{"name": "emb", "kind": "local", "root": str(root), "read_only": False}]

        done = run_cli(emb, "db", "stop")
        assert done.returncode == 0
        assert not (pgdata / "postmaster.pid").exists()
        assert postgres_processes(pgdata) == []
        # stopping again is not an error
        assert run_cli(emb, "db", "stop").returncode == 0
    finally:
        _stop_quietly(emb, home)


def test_embedded_homes_are_independent(env, tmp_path):
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    envs = [_embedded_env(env, h) for h in homes]
    try:
        for e, name in zip(envs, ("alpha", "beta")):
            run_cli(e, "init")
            run_cli(e, "backend", "add", name, str(make_dir(tmp_path / f"root-{name}")))
        assert [b["name"] for b in backend_summary(run_cli(envs[0], "backend", "list", "--json"))] == ["alpha"]
        assert [b["name"] for b in backend_summary(run_cli(envs[1], "backend", "list", "--json"))] == ["beta"]
        # and neither is the per-test DATABASE_URL database
        assert backend_summary(run_cli(env, "backend", "list", "--json")) == []
        for e, home in zip(envs, homes):
            run_cli(e, "db", "stop")
            assert not (home / "pg" / "postmaster.pid").exists()
            assert postgres_processes(home / "pg") == []
    finally:
        for e, home in zip(envs, homes):
            _stop_quietly(e, home)


def test_json_log_lines_parse_even_with_quotes_in_messages(env, tmp_path):
    root = make_dir(tmp_path / 'say "hi"', {})
    done = run_cli(dict(env, FILESTORE_LOG_FORMAT="json"), "-vv", "backend", "add", "quoted", str(root))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, "expected log lines at -vv"
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    added = [e for e in entries if e["logger"] == "core.storage.backends"]
    assert len(added) == 1 and 'say "hi"' in added[0]["message"] and added[0]["journal_id"] >= 1


def test_admin_commands_exit_without_a_traceback(env, tmp_path):
    """Issue 17: about one admin command in ten printed psycopg_pool's "Exception ignored in:
    ConnectionPool.__del__" on stderr (a pool left to the interpreter's shutdown). Every
    read-only admin command, run repeatedly, ends with nothing but its own output."""
    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x")
    run_cli(env, "backend", "add", "data", str(root))
    commands = [("du", "data:/"), ("journal", "--limit", "5"), ("history", "data:/d/f"), ("stats",),
                ("backend", "list"), ("rollups", "verify", "data:/"), ("drift", "ls")]
    for _ in range(6):
        for args in commands:
            done = run_cli(env, *args)
            assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, (args, done.stderr)


def test_version(env):
    done = run_cli(env, "--version")
    assert re.fullmatch(r"filestore, version \d+\.\d+\.\d+\n", done.stdout), done.stdout


def test_mount_t_fuse_filestore_mounts_and_umount_unmounts(env, db, tmp_path):
    """Issue 17: an /etc/fstab line (`HOME MOUNTPOINT fuse.filestore OPTIONS 0 0`) goes through
    mount(8) and the standard mount.fuse3 helper, which runs `filestore HOME MOUNTPOINT -o ...`."""
    require_fuse()
    if os.geteuid() != 0 or not os.path.exists("/sbin/mount.fuse3"):
        pytest.skip("mount(8) of a FUSE type needs root and mount.fuse3")
    # mount(8) runs helpers with a fixed PATH; scripts/setup links the command there as root
    assert os.path.exists("/usr/local/bin/filestore"), "run scripts/setup as root"
    root = make_dir(tmp_path / "data", {"f": b"from disk"})
    run_cli(env, "backend", "add", "data", str(root))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "fuse.filestore", env["FILESTORE_HOME"], str(mnt),
                           "-o", f"defaults,_netdev,database_url={env['DATABASE_URL']}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    pid = int(re.search(r"\(pid (\d+)\)", done.stdout).group(1))
    try:
        assert is_mounted(mnt)
        assert (mnt / "data" / "f").read_bytes() == b"from disk"
        (mnt / "data" / "g").write_bytes(b"through fstab")
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    deadline = time.monotonic() + 60
    while process_alive(pid) and time.monotonic() < deadline:  # the server ends with its mount
        time.sleep(0.05)
    assert not process_alive(pid) and not is_mounted(mnt)
    assert (root / "g").read_bytes() == b"through fstab"
    assert_consistent(db, "data", root)


def test_backend_add_reports_its_progress_as_json_lines(env, tmp_path):
    """Issue 17: `backend add --json` gives scripts JSON lines: progress (count, rate, elapsed),
    the last one marked done with every entry counted, then the backend added."""
    root = tmp_path / "tree"
    for d in range(3):
        make_dir(root / f"d{d}", {f"f{i}": b"x" for i in range(5)})
    done = run_cli(env, "backend", "add", "tree", str(root), "--json")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    progress = [line for line in lines if "progress" in line]
    assert progress and progress[-1]["done"] and progress[-1]["count"] == 3 + 3 * 5, lines
    assert all(p["rate_per_s"] >= 0 and p["elapsed_s"] >= 0 for p in progress)
    assert lines[-1] == {"added": "tree", "root": str(root), "read_only": False, "observe_only": False}
    assert done.stderr == ""  # not a terminal: no progress line drawn there


def test_an_admin_command_beside_a_writer_of_the_journal_runs_no_ddl(env, database_url):
    """A database at this code's schema version is left as it is: schema.sql's DDL (the
    journal's triggers) waits for every transaction writing the journal, and `filestore history`
    run beside a live mount's group commits ended in "deadlock detected" (issue 17's bench)."""
    run_cli(env, "journal", "--limit", "1")  # the schema is in place, at this code's version
    with psycopg.connect(database_url) as writer:
        writer.execute("LOCK TABLE filestore.journal_entries IN ROW EXCLUSIVE MODE")  # as a group commit holds it
        done = run_cli(env, "journal", "--limit", "1", "--json", timeout=30)
        assert json.loads(done.stdout) == []
