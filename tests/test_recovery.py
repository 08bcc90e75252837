"""Crash recovery: a mount killed between a physical change and its commit starts cleanly again
with the database matching the disk, the change adopted by a `recover` command that carries the
unfinished intent's request id, and no staged content left behind.

Crashes are produced two ways: the FILESTORE_CRASH_AT points of core.faults (the server SIGKILLs
itself at an exact step), and a real SIGKILL of the server from the test while a client process
has a file open and half written.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from conftest import STAGING, Mount

DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)
MiB = 1 << 20
CHUNK = 64 * 1024


# -- helpers ---------------------------------------------------------------------------
def home(tracked):
    return tracked.tmp / "home"


def intent_lines(tracked) -> list[dict]:
    path = home(tracked) / "intents.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def unfinished_intents(tracked) -> list[dict]:
    """Intent lines (not answers) of the intent log that no journal row resolved."""
    lines = [line for line in intent_lines(tracked) if "done" not in line]
    ids = [uuid.UUID(i["id"]) for i in lines]
    done = {row[0] for row in tracked.db.execute(
        "SELECT request_id FROM filestore.journal_entries WHERE request_id = ANY(%s)", (ids,)).fetchall()}
    return [i for i in lines if uuid.UUID(i["id"]) not in done]


def staged_files(tracked) -> list[str]:
    staging = tracked.backend_root / STAGING
    return os.listdir(staging) if staging.exists() else []


def crashing_mount(tracked, point: str) -> Mount:
    """Stop the tracked mount and serve the same home and mountpoint with a crash point armed."""
    tracked.mount.stop()
    return Mount(env=dict(tracked.env, FILESTORE_CRASH_AT=point), mountpoint=tracked.mount.mountpoint,
                 log_path=tracked.tmp / "home" / "logs" / "crash-mount.log").start()


def crash_during(tracked, point: str, action) -> None:
    """Run `action` against a mount armed with `point`; it must die there, the caller seeing a dead mount."""
    crashing = crashing_mount(tracked, point)
    try:
        with pytest.raises(OSError) as failure:
            action()
        assert failure.value.errno in DEAD_MOUNT, failure.value
        crashing.process.wait(30)
        assert crashing.process.returncode == -signal.SIGKILL, \
            f"the server did not die at {point}:\n{crashing.log()}"
    finally:
        crashing.kill()


def recover_rows(tracked, since: int = 0) -> list[dict]:
    return [j for j in tracked.journal(since) if j["command"] == "recover"]


def spawn_client(script: str, *args: str) -> subprocess.Popen:
    """A client process through the mount, driven line by line over stdin/stdout."""
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise AssertionError(f"client exited ({proc.returncode}) early: {proc.stderr.read()}")
    return line.strip()


def finish_client(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Let a paused client go on against the dead mount; return its exit code and output."""
    out, err = proc.communicate("go\n", timeout=60)
    return proc.returncode, out, err


# A writer of `total` bytes in 64 KiB chunks that pauses (prints "paused", reads a line) once
# `pause_at` bytes are written, then goes on; reports the errno that stopped it.
WRITER = r"""
import os, sys
path, flags, total, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mode = {"new": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "rewrite": os.O_WRONLY | os.O_TRUNC,
        "append": os.O_WRONLY | os.O_APPEND}[flags]
chunk = bytes(range(256)) * 256
try:
    fd = os.open(path, mode, 0o644)
    written = 0
    while written < total:
        if written == pause_at:
            print("paused", flush=True)
            sys.stdin.readline()
        written += os.write(fd, chunk[: min(len(chunk), total - written)])
    if pause_at >= total:
        print("paused", flush=True)
        sys.stdin.readline()
    os.close(fd)
except OSError as exc:
    print("errno", exc.errno, flush=True)
    sys.exit(3)
print("done", flush=True)
"""


def pattern(size: int) -> bytes:
    chunk = bytes(range(256)) * 256
    return (chunk * (size // len(chunk) + 1))[:size]


# -- a write killed before it committed ----------------------------------------------------
def test_crash_after_stage_write_leaves_no_partial_file(tracked):
    target = tracked.path / "new.bin"

    def write_new_file():
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * CHUNK)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    crash_during(tracked, "after_stage_write", write_new_file)
    # A new file reaches the backend at its first close: only the staging area has bytes.
    assert not os.path.lexists(tracked.backend_root / "new.bin")
    assert len(staged_files(tracked)) == 1
    tracked.mount.start()

    assert staged_files(tracked) == []
    assert not os.path.lexists(tracked.backend_root / "new.bin")
    assert tracked.node("new.bin") is None
    assert not os.path.lexists(target)
    assert intent_lines(tracked) == []


@pytest.mark.parametrize("how", ["new", "rewrite"])
def test_sigkill_midway_through_a_50_mib_write(tracked, how):
    total = 50 * MiB
    name = f"{how}.bin"
    old = b"the old content\n" * 100
    if how == "rewrite":
        (tracked.path / name).write_bytes(old)
    expected = None if how == "new" else old  # a new file is not on the backend before its close
    writer = spawn_client(WRITER, str(tracked.path / name), how, str(total), str(total // 2))
    try:
        assert read_line(writer) == "paused"
        # Half of it is written, all of it to a staging file; the name still holds the old state.
        staged = staged_files(tracked)  # each write(2) returned after the server wrote it
        assert len(staged) == 1
        assert os.path.getsize(tracked.backend_root / STAGING / staged[0]) == total // 2
        assert _content(tracked.backend_root / name) == expected
        tracked.mount.kill()
        code, out, err = finish_client(writer)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert code == 3, (out, err)
    assert int(out.split()[-1]) in DEAD_MOUNT, out

    assert _content(tracked.backend_root / name) == expected
    tracked.mount.start()
    assert staged_files(tracked) == []
    assert _content(tracked.backend_root / name) == expected
    node = tracked.node(name)
    if expected is None:
        assert node is None
    else:
        assert node is not None and node["size"] == len(expected)
    assert _content(tracked.path / name) == expected
    # The mount serves normally again: the same name can be written through it.
    (tracked.path / name).write_bytes(b"after recovery")
    assert (tracked.backend_root / name).read_bytes() == b"after recovery"
    assert tracked.node(name)["size"] == len(b"after recovery")


def _content(path) -> bytes | None:
    return path.read_bytes() if os.path.lexists(path) else None


def test_crash_after_land_adopts_the_landed_content(tracked):
    content = pattern(3 * MiB + 17)
    target = tracked.path / "landed.bin"

    def write_file():
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view[:CHUNK]):]
        finally:
            os.close(fd)  # flush: the write command lands the staged file, then the server dies

    crash_during(tracked, "after_land", write_file)
    assert (tracked.backend_root / "landed.bin").read_bytes() == content
    assert tracked.node("landed.bin") is None  # landed, but neither create nor write committed
    pending = [i for i in unfinished_intents(tracked) if i["cmd"] == "create"]
    assert len(pending) == 1, unfinished_intents(tracked)
    request_id = uuid.UUID(pending[0]["id"])
    since = tracked.last_journal_id()

    tracked.mount.start()
    node = tracked.node("landed.bin")
    assert node["size"] == len(content) == os.path.getsize(tracked.backend_root / "landed.bin")
    assert node["mode"] == 0o640
    recovered = recover_rows(tracked, since)
    assert [(r["actor"], r["request_id"], r["status"]) for r in recovered] == \
        [("recovery", request_id, "committed")]
    assert recovered[0]["node_id"] == node["id"]
    assert recovered[0]["args"]["intent"] == "create"
    assert target.read_bytes() == content
    assert staged_files(tracked) == []


# -- every other command killed between its physical change and its commit ----------------------
def _prepare(tracked, command: str) -> None:
    p = tracked.path
    if command in ("unlink", "setattr", "rename"):
        (p / "f").write_bytes(b"some content")
        os.chmod(p / "f", 0o644)
    if command == "rmdir":
        os.mkdir(p / "d", 0o755)


def _act(tracked, command: str) -> None:
    p = tracked.path
    if command == "mkdir":
        os.mkdir(p / "d", 0o750)
    elif command == "create":
        os.close(os.open(p / "c", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    elif command == "unlink":
        os.unlink(p / "f")
    elif command == "rmdir":
        os.rmdir(p / "d")
    elif command == "rename":
        os.rename(p / "f", p / "g")
    elif command == "setattr":
        os.chmod(p / "f", 0o600)
    elif command == "symlink":
        os.symlink("some/where", p / "l")


@pytest.mark.parametrize("command", ["mkdir", "unlink", "rename", "setattr", "symlink", "create", "rmdir"])
def test_crash_after_execute_is_adopted_from_disk(tracked, command):
    _prepare(tracked, command)
    before = {name: tracked.node(name) for name in ("f", "d")}
    since = tracked.last_journal_id()

    crash_during(tracked, f"after_execute:{command}", lambda: _act(tracked, command))
    assert [j for j in tracked.journal(since) if j["command"] == command] == [], \
        "the command must not have committed"
    pending = unfinished_intents(tracked)
    assert [i["cmd"] for i in pending] == [command]
    request_id = uuid.UUID(pending[0]["id"])

    tracked.mount.start()
    recovered = recover_rows(tracked, since)
    assert [(r["actor"], r["request_id"]) for r in recovered] == [("recovery", request_id)]
    assert recovered[0]["result"]["paths_changed"] >= 1
    root = tracked.backend_root
    if command == "mkdir":
        assert (root / "d").is_dir()
        node = tracked.node("d")
        assert node["kind"] == "dir" and node["mode"] == 0o750
        assert os.listdir(tracked.path / "d") == []
    elif command == "create":
        assert (root / "c").read_bytes() == b""
        node = tracked.node("c")
        assert node["kind"] == "file" and node["size"] == 0 and node["mode"] == 0o600
    elif command == "unlink":
        assert not (root / "f").exists()
        assert tracked.node("f") is None
        assert not (tracked.path / "f").exists()
        state = tracked.db.execute("SELECT state FROM filestore.nodes WHERE id = %s",
                                   (before["f"]["id"],)).fetchone()[0]
        assert state == "DELETED"
    elif command == "rmdir":
        assert not (root / "d").exists()
        assert tracked.node("d") is None
    elif command == "rename":
        assert not (root / "f").exists() and (root / "g").read_bytes() == b"some content"
        assert tracked.node("f") is None
        moved = tracked.node("g")
        assert moved["id"] == before["f"]["id"], "the node must be moved, not re-created"
        assert (tracked.path / "g").read_bytes() == b"some content"
    elif command == "setattr":
        assert os.stat(root / "f").st_mode & 0o7777 == 0o600
        assert tracked.node("f")["mode"] == 0o600
        assert os.stat(tracked.path / "f").st_mode & 0o7777 == 0o600
    elif command == "symlink":
        assert os.readlink(root / "l") == "some/where"
        node = tracked.node("l")
        assert node["kind"] == "symlink" and bytes(node["symlink_target"]) == b"some/where"
        assert os.readlink(tracked.path / "l") == "some/where"
    assert intent_lines(tracked) == []


# -- an in-place append killed before its commit ------------------------------------------------
def test_append_killed_while_open_is_adopted(tracked):
    original = b"0123456789" * 100
    (tracked.path / "log.txt").write_bytes(original)
    added = 3 * CHUNK + 5
    since = tracked.last_journal_id()
    writer = spawn_client(WRITER, str(tracked.path / "log.txt"), "append", str(added), str(added))
    try:
        assert read_line(writer) == "paused"
        # Appends are written in place: the disk already holds them, the database does not.
        disk = tracked.backend_root / "log.txt"
        assert os.path.getsize(disk) == len(original) + added
        assert tracked.node("log.txt")["size"] == len(original)
        tracked.mount.kill()
        code, out, err = finish_client(writer)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert code == 3, (out, err)
    pending = unfinished_intents(tracked)
    assert [i["cmd"] for i in pending] == ["write"]

    tracked.mount.start()
    node = tracked.node("log.txt")
    assert node["size"] == os.path.getsize(disk) == len(original) + added
    recovered = recover_rows(tracked, since)
    assert [(r["actor"], r["request_id"]) for r in recovered] == [("recovery", uuid.UUID(pending[0]["id"]))]
    assert (tracked.path / "log.txt").read_bytes() == original + pattern(added)


def test_append_crash_after_execute_write_is_adopted(tracked):
    original = b"0123456789" * 100
    (tracked.path / "log.txt").write_bytes(original)
    since = tracked.last_journal_id()

    def append():
        fd = os.open(tracked.path / "log.txt", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"appended line\n")
        finally:
            os.close(fd)  # flush commits the write: the server dies after executing it

    crash_during(tracked, "after_execute:write", append)
    disk = tracked.backend_root / "log.txt"
    assert disk.read_bytes() == original + b"appended line\n"
    pending = unfinished_intents(tracked)
    assert {i["cmd"] for i in pending} == {"write"}
    assert len({i["id"] for i in pending}) == 1

    tracked.mount.start()
    node = tracked.node("log.txt")
    assert node["size"] == os.path.getsize(disk) == len(original) + len(b"appended line\n")
    recovered = recover_rows(tracked, since)
    assert [(r["actor"], r["request_id"]) for r in recovered] == [("recovery", uuid.UUID(pending[0]["id"]))]
    assert (tracked.path / "log.txt").read_bytes() == original + b"appended line\n"


# -- a clean stop leaves nothing to recover ------------------------------------------------------
def test_clean_remount_has_nothing_to_recover(tracked):
    p = tracked.path
    os.mkdir(p / "dir")
    (p / "dir" / "a").write_bytes(b"a" * 1000)
    with open(p / "dir" / "a", "ab") as f:
        f.write(b"more")
    os.rename(p / "dir" / "a", p / "b")
    os.chmod(p / "b", 0o600)
    os.symlink("b", p / "link")
    assert intent_lines(tracked), "commands were run, so intents were logged"
    tracked.settle()  # answered commands commit a moment later; fsync of a directory waits for them
    assert unfinished_intents(tracked) == []

    tracked.mount.stop()
    marker = home(tracked) / "clean-stop"
    assert marker.read_text().strip() == str(tracked.last_journal_id())
    since = tracked.last_journal_id()
    tracked.mount.start()

    assert not marker.exists(), "the clean-stop marker is consumed by the next start"
    assert (home(tracked) / "intents.log").read_bytes() == b""
    assert tracked.journal(since) == [], "a clean restart journals nothing"
    assert recover_rows(tracked) == []
    assert staged_files(tracked) == []
    assert (p / "b").read_bytes() == b"a" * 1000 + b"more"


def test_unclean_stop_reconciles_files_whose_size_no_longer_matches(tracked):
    """A power loss can lose file data the database kept: after an unclean stop, files
    written since the last clean stop are compared with their journaled size."""
    (tracked.path / "kept.txt").write_bytes(b"x" * 100)
    (tracked.path / "lost.txt").write_bytes(b"y" * 4096)
    tracked.mount.kill()  # no clean stop: no checkpoint for the next start
    # What a power loss leaves: data the database recorded never reached the disk.
    os.truncate(tracked.backend_root / "lost.txt", 0)
    since = tracked.last_journal_id()
    tracked.mount.start()
    assert tracked.node("lost.txt")["size"] == 0
    assert tracked.node("kept.txt")["size"] == 100
    rows = recover_rows(tracked, since)
    assert [r["path"] for r in rows] == ["lost.txt"] and rows[0]["actor"] == "recovery"
    assert os.path.getsize(tracked.path / "lost.txt") == 0


def test_clean_stop_skips_the_size_verification(tracked):
    (tracked.path / "a.txt").write_bytes(b"data")
    tracked.mount.stop()
    since = tracked.last_journal_id()
    tracked.mount.start()
    assert recover_rows(tracked, since) == []


def test_fsync_and_o_sync_commit_the_write_durably(tracked):
    path = tracked.path / "durable.log"
    since = tracked.last_journal_id()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first")
        os.fsync(fd)  # the write command is committed before fsync returns
        node = tracked.node("durable.log")
        assert node["size"] == 5
        writes = [r for r in tracked.journal(since) if r["command"] == "write"]
        assert len(writes) == 1 and writes[0]["args"]["durable"] is True
        os.write(fd, b" second")  # after the fsync the file is written in place
    finally:
        os.close(fd)
    writes = [r for r in tracked.journal(since) if r["command"] == "write"]
    assert [w["args"]["mode"] for w in writes] == ["staged", "in_place"]
    assert (tracked.backend_root / "durable.log").read_bytes() == b"first second"

    since = tracked.last_journal_id()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_SYNC)
    try:
        os.write(fd, b"!")
        assert tracked.node("durable.log")["size"] == 13  # committed by the write itself
        os.write(fd, b"?")
        assert tracked.node("durable.log")["size"] == 14
    finally:
        os.close(fd)
    writes = [r for r in tracked.journal(since) if r["command"] == "write"]
    assert [(w["args"]["durable"], w["args"]["bytes"]) for w in writes] == [(True, 1), (True, 1)]
