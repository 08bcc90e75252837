"""Time travel through a real mount (docs/architecture.md D41): a sequence of creates, writes,
renames of files and directories, chmods, chowns and deletes by two users (forked children that
dropped to ALICE's and BOB's uids); after each step the directories as the mount shows them
(os.lstat of every entry) and the journal id. Then `ls --as-of @ID` at each step must equal
what the mount showed, `diff` must list exactly the changes with their principals, and the
history filters must pick exactly the rows asked for."""
from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
from fixtures_posix import ALICE, BOB, User, _open_up

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root")

KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def as_user(user: User | None, fn, *args) -> None:
    """Run fn(*args) in a child that dropped to `user` for real (None: as root, in this process)."""
    if user is None:
        fn(*args)
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups(list(user.groups or (user.gid,)))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            os.umask(0o022)
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{fn.__name__}{args} failed as uid {user.uid}"


def write(path, data: bytes, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def append(path, data: bytes) -> None:
    write(path, data, os.O_WRONLY | os.O_APPEND)


def shown(directory) -> dict[str, dict]:
    """What the mount shows of a directory: each entry's lstat, as `ls --as-of --json` reports it."""
    out = {}
    for name in sorted(os.listdir(directory)):
        st = os.lstat(os.path.join(directory, name))
        out[name] = {"kind": KIND[stat.S_IFMT(st.st_mode)], "size": st.st_size, "mode": oct(stat.S_IMODE(st.st_mode)),
                     "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
    return out


def as_of(t, path: str, at: int) -> dict[str, dict]:
    done = t.cli("ls", "--as-of", f"@{at}", path, "--json")
    return {e["name"]: {k: e[k] for k in ("kind", "size", "mode", "uid", "gid", "mtime_ns")}
            for e in json.loads(done.stdout)["entries"]}


def test_ls_as_of_equals_what_the_mount_showed_at_every_step(tracked):
    t = tracked
    _open_up(t.mount.mountpoint)  # pytest's temporary directories are 0700
    d = t.path / "d"
    steps = [
        ("mkdir d", None, os.mkdir, d, 0o777),
        ("chmod d 0777", None, os.chmod, d, 0o777),
        ("alice creates a.txt", ALICE, write, d / "a.txt", b"hello"),
        ("bob creates b.txt", BOB, write, d / "b.txt", b"bob's data"),
        ("alice appends to a.txt", ALICE, append, d / "a.txt", b", world"),
        ("alice renames a.txt", ALICE, os.rename, d / "a.txt", d / "a2.txt"),
        ("bob makes sub", BOB, os.mkdir, d / "sub"),
        ("bob opens sub to all", BOB, os.chmod, d / "sub", 0o777),
        ("bob writes sub/x", BOB, write, d / "sub" / "x", b"x" * 1000),
        ("bob renames the directory sub", BOB, os.rename, d / "sub", d / "sub2"),
        ("alice chmods a2.txt", ALICE, os.chmod, d / "a2.txt", 0o600),
        ("bob deletes b.txt", BOB, os.unlink, d / "b.txt"),
        ("alice moves a2.txt into sub2", ALICE, os.rename, d / "a2.txt", d / "sub2" / "a3.txt"),
        ("bob replaces sub2/x by renaming over it", BOB, write, d / "y", b"yy"),
        ("bob renames y over sub2/x", BOB, os.rename, d / "y", d / "sub2" / "x"),
        ("root chowns sub2 to alice", None, os.chown, d / "sub2", ALICE.uid, ALICE.gid),
        ("alice deletes sub2/a3.txt", ALICE, os.unlink, d / "sub2" / "a3.txt"),
    ]
    seen = []  # (step, journal id, {directory: listing})
    for label, user, fn, *args in steps:
        as_user(user, fn, *args)
        at = t.last_journal_id()
        listings = {"": shown(t.path)}
        for sub in ("d", "d/sub", "d/sub2"):
            if os.path.isdir(t.path / sub):
                listings[sub] = shown(t.path / sub)
        seen.append((label, at, listings))
    for label, at, listings in seen:
        for sub, listing in listings.items():
            assert as_of(t, f"local:/{sub}", at) == listing, f"after {label!r} (journal {at}), {sub or '/'}"
    # Subdirectory sizes then, from the journal after that row or from the subtree as it was: the same.
    from core.journal import timetravel
    from core.storage.db import Database
    db = Database(t.env["DATABASE_URL"])
    try:
        for label, at, listings in seen:
            for sub in listings:
                sizes = [{e.name: e.size for e in timetravel.listing(db, "local", os.fsencode(sub), at, sizes_by=by)}
                         for by in ("journal", "walk")]
                assert sizes[0] == sizes[1] == {os.fsencode(n): e["size"] for n, e in listings[sub].items()}, label
    finally:
        db.close()
    # A name that did not exist then is ENOENT, as ls would say.
    first_at = seen[2][1]
    done = t.cli("ls", "--as-of", f"@{first_at}", "local:/d/sub2", check=False)
    assert done.returncode == 1 and "no such file or directory as of journal row" in done.stderr

    # -- diff: exactly the changes between two steps, with who made them -----------------------
    start, end = seen[4][1], seen[-1][1]  # after alice's append ... the end
    done = t.cli("diff", "local:/d", "--from", f"@{start}", "--to", f"@{end}", "--all", "--json")
    changes = {(c["change"], c["path"], c.get("old_path")): c for c in json.loads(done.stdout)["changes"]}
    names = {k: sorted(v["principals"]) for k, v in changes.items()}
    alice, bob, root = _names(ALICE.uid), _names(BOB.uid), _names(0)
    assert names == {
        ("created", "sub2", None): sorted([bob, root]),  # sub: made after start, renamed, chowned by root
        ("created", "sub2/x", None): [bob],  # y, renamed over the first x (both made after start)
        ("deleted", "a.txt", None): [alice],  # a.txt -> a2.txt -> sub2/a3.txt, then deleted
        ("deleted", "b.txt", None): [bob],
    }, json.dumps(list(changes.values()), indent=1)
    # The summary per directory adds them up.
    summary = json.loads(t.cli("diff", "local:/d", "--from", f"@{start}", "--to", f"@{end}", "--json").stdout)
    by_dir = {row["directory"]: row for row in summary["directories"]}
    assert by_dir["."]["created"] == 1 and by_dir["."]["deleted"] == 2
    assert by_dir["."]["size_delta"] == -len(b"hello, world") - len(b"bob's data")
    assert by_dir["sub2"]["created"] == 1 and by_dir["sub2"]["size_delta"] == 2
    assert summary["size_delta"] == 2 - len(b"hello, world") - len(b"bob's data")

    # A window with a move, a chmod and a change of owner of things that existed before it.
    start, end = seen[8][1], seen[15][1]  # after bob wrote sub/x ... after root's chown
    changes = json.loads(t.cli("diff", "local:/d", "--from", f"@{start}", "--to", f"@{end}", "--all",
                               "--json").stdout)["changes"]
    got = sorted((c["change"], c["path"], c.get("old_path"), tuple(c.get("what", ())), tuple(c["principals"]))
                 for c in changes)
    assert got == sorted([
        ("moved", "sub2", "sub", (), tuple(sorted([bob, root]))),
        ("modified", "sub2", None, ("uid", "gid"), tuple(sorted([bob, root]))),
        ("moved", "sub2/a3.txt", "a2.txt", (), (alice,)),
        ("modified", "sub2/a3.txt", None, ("mode",), (alice,)),
        ("deleted", "b.txt", None, (), (bob,)),
        ("deleted", "sub/x", None, (), (bob,)),  # replaced by the rename of y over it
        ("created", "sub2/x", None, (), (bob,)),
    ]), json.dumps(changes, indent=1)

    # -- history filters -------------------------------------------------------------------------
    rows = json.loads(t.cli("history", "-r", "local:/d", "--user", str(BOB.uid), "--json").stdout)["entries"]
    assert rows and {r["uid"] for r in rows} == {BOB.uid}
    renames = json.loads(t.cli("history", "-r", "local:/d", "--type", "rename", "--json").stdout)["entries"]
    assert [(r["path"], r["uid"]) for r in renames] == [
        ("d/a.txt", ALICE.uid), ("d/sub", BOB.uid), ("d/a2.txt", ALICE.uid), ("d/y", BOB.uid)]
    window = json.loads(t.cli("history", "-r", "local:/d", "--since", f"@{seen[10][1]}", "--until",
                              f"@{seen[12][1]}", "--json").stdout)["entries"]
    assert [r["command"] for r in window] == ["setattr", "unlink", "rename"]
    under_sub = json.loads(t.cli("history", "-r", "local:/d/sub2", "--json").stdout)["entries"]
    assert {r["command"] for r in under_sub} >= {"rename", "setattr", "unlink"}
    assert all(r["path"].startswith("d/sub") or r["args"].get("to", "").startswith("d/sub2") for r in under_sub)
    # TIME as an age and as ISO 8601 (one parser): the whole sequence is less than an hour old.
    assert len(json.loads(t.cli("history", "-r", "local:/d", "--since", "1h", "--json").stdout)["entries"]) > 10
    assert json.loads(t.cli("history", "-r", "local:/d", "--until", "2000-01-01T00:00:00Z",
                            "--json").stdout)["entries"] == []
    bad = t.cli("history", "local:/d", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("filestore: 'yesterday-ish' is not a time")


def _names(uid: int) -> str:
    """How diff names a principal on this machine: the user name when the password database has one."""
    import pwd
    try:
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except KeyError:
        return f"uid {uid}"


def tree_of(root, *, times: bool) -> dict[str, tuple]:
    """Every entry below root: kind, size (files), mode, owner and (with `times`) mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = KIND[stat.S_IFMT(st.st_mode)]
            out[os.path.relpath(full, root)] = (kind, st.st_size if kind == "file" else None,
                                                oct(stat.S_IMODE(st.st_mode)) if kind != "symlink" else None,
                                                st.st_uid, st.st_gid, *((st.st_mtime_ns,) if times and kind != "symlink" else ()))
    return out


def test_restore_brings_back_names_modes_owners_and_directories(tracked):
    t = tracked
    proj = t.path / "proj"
    os.mkdir(proj)
    os.mkdir(proj / "docs", 0o750)
    write(proj / "docs" / "a.txt", b"aaa")
    write(proj / "docs" / "b.txt", b"bbb")
    os.chown(proj / "docs" / "a.txt", ALICE.uid, ALICE.gid)
    write(proj / "keep.txt", b"keep")
    write(proj / "c.txt", b"first version")
    write(proj / "empty", b"")
    os.symlink("docs/a.txt", proj / "link")
    os.mkdir(proj / "old")
    os.mkdir(proj / "old" / "inner", 0o700)
    then = t.last_journal_id()
    seen_then = tree_of(proj, times=True)
    disk_then = tree_of(t.backend_root / "proj", times=False)

    os.rename(proj / "docs", proj / "documents")
    os.rename(proj / "documents" / "a.txt", proj / "a-moved.txt")
    os.chmod(proj / "keep.txt", 0o600)
    os.chown(proj / "keep.txt", BOB.uid, BOB.gid)
    os.unlink(proj / "documents" / "b.txt")
    write(proj / "c.txt", b"second")
    os.rmdir(proj / "old" / "inner")
    os.rmdir(proj / "old")
    os.unlink(proj / "empty")
    os.unlink(proj / "link")
    write(proj / "new.txt", b"made since")
    before = t.last_journal_id()
    disk_before = tree_of(t.backend_root / "proj", times=True)

    # --dry-run says what it would do and what it cannot, and changes nothing.
    dry = json.loads(t.cli("restore", str(proj), "--as-of", f"@{then}", "--dry-run", "--json").stdout)
    assert [(s["action"], s["path"], s.get("source")) for s in dry["steps"] if s["action"] in
            ("move", "mkdir", "symlink", "create")] == [
        ("move", "docs", "documents"), ("create", "empty", None), ("symlink", "link", None),
        ("mkdir", "old", None), ("move", "docs/a.txt", "a-moved.txt"), ("mkdir", "old/inner", None)]
    assert sorted((c["path"], c["why"].split(":")[0]) for c in dry["cannot_restore"]) == [
        ("c.txt", "content changed since"), ("docs/b.txt", "file deleted")]
    assert dry["created_since_left_in_place"] == ["new.txt"]
    assert t.last_journal_id() == before and tree_of(t.backend_root / "proj", times=True) == disk_before

    done = t.cli("restore", str(proj), "--as-of", f"@{then}")
    assert "cannot restore docs/b.txt: file deleted: its content is gone" in done.stdout
    assert "cannot restore c.txt: content changed since" in done.stdout
    # What the mount shows equals the earlier tree, but for what could not come back.
    expected = {k: v for k, v in seen_then.items() if k not in ("docs/b.txt", "c.txt")}
    now = tree_of(proj, times=True)
    assert {k: v for k, v in now.items() if k not in ("c.txt", "new.txt")} == expected
    # And so does the backend itself (names, kinds, sizes, modes, owners).
    disk_now = tree_of(t.backend_root / "proj", times=False)
    assert {k: v for k, v in disk_now.items() if k not in ("c.txt", "new.txt")} == \
        {k: v for k, v in disk_then.items() if k not in ("docs/b.txt", "c.txt")}
    # Every step was an ordinary command of the operator's, journaled.
    rows = t.journal(before)
    assert rows and {(r["actor"], r["uid"]) for r in rows} == {("fuse", 0)}
    assert {"rename", "mkdir", "create", "symlink", "setattr"} <= {r["command"] for r in rows}
    # Nothing more to do once restored (but the top's own time and the names that cannot come back).
    again = json.loads(t.cli("restore", str(proj), "--as-of", f"@{then}", "--dry-run", "--json").stdout)
    assert [s for s in again["steps"] if s["action"] != "utime"] == []
    # The mount's group commits chained every row they wrote.
    assert t.cli("journal", "verify").returncode == 0


def test_one_time_parser_for_every_command():
    from core.errors import ConfigError
    from core.journal.timetravel import parse_time
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_time("@42", now) == 42
    assert parse_time("2h", now) == now - dt.timedelta(hours=2)
    assert parse_time("3d", now) == now - dt.timedelta(days=3)
    assert parse_time("90s", now) == now - dt.timedelta(seconds=90)
    assert parse_time("2026-12-07T10:30:00Z", now) == dt.datetime(2026, 12, 7, 10, 30, tzinfo=dt.timezone.utc)
    assert parse_time("2026-12-07T10:30+02:00", now) == dt.datetime(2026, 12, 7, 8, 30, tzinfo=dt.timezone.utc)
    assert parse_time("2026-12-07", now).tzinfo is not None  # local time without a zone
    for bad in ("@x", "@-1", "2 fortnights", "yesterday", ""):
        with pytest.raises(ConfigError):
            parse_time(bad, now)
    # --user: a name from the password database or a number.
    from core.journal.timetravel import uid_of
    assert uid_of("root") == 0 and uid_of("4001") == 4001
    with pytest.raises(ConfigError):
        uid_of("no-such-user-here")


def test_restore_acts_only_through_a_running_mount(env, tmp_path):
    from conftest import run_cli
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"x")
    run_cli(env, "backend", "add", "b", str(tmp_path / "b"))
    done = run_cli(env, "restore", "b:/", "--as-of", "@1", check=False)
    assert done.returncode == 1
    assert done.stderr == "filestore: restore acts through a running mount, and no filestore mount shows backend 'b':" \
                          " mount it first\n"
    dry = run_cli(env, "restore", "b:/", "--as-of", "@1", "--dry-run", check=False)  # planning needs no mount
    assert dry.returncode == 0, dry.stderr
    bad = run_cli(env, "ls", "--as-of", "@1", "b:/nothing", check=False)
    assert bad.returncode == 1 and "no such file or directory" in bad.stderr


def test_entries_imported_with_their_backend_are_in_the_past_too(tracked):
    """`backend add` imports a tree without snapshots: its entries are there from the start,
    before and after they are renamed, changed or deleted through the mount."""
    t = tracked
    root = t.tmp / "imported"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"aaa")
    (root / "docs" / "b.txt").write_bytes(b"bbbb")
    (root / "c.txt").write_bytes(b"c")
    t.cli("backend", "add", "imp", str(root))
    t.backends["imp"] = root
    t.restart()
    mnt = t.mount.mountpoint / "imp"
    at_import = t.last_journal_id()
    before = {"": shown(mnt), "docs": shown(mnt / "docs")}
    os.rename(mnt / "docs" / "a.txt", mnt / "docs" / "a2.txt")
    os.unlink(mnt / "docs" / "b.txt")
    os.rename(mnt / "c.txt", mnt / "docs" / "c.txt")
    after = t.last_journal_id()
    for sub, listing in before.items():
        # What the import saw of a directory's mtime is not recorded (D41): compared without it.
        assert _without_dir_times(as_of(t, f"imp:/{sub}", at_import)) == _without_dir_times(listing), sub
    assert as_of(t, "imp:/docs", after) == shown(mnt / "docs")
    assert as_of(t, "imp:/", after) == shown(mnt)
    changes = json.loads(t.cli("diff", "imp:/", "--from", f"@{at_import}", "--all", "--json").stdout)["changes"]
    assert sorted((c["change"], c["path"], c.get("old_path")) for c in changes) == [
        ("deleted", "docs/b.txt", None), ("moved", "docs/a2.txt", "docs/a.txt"), ("moved", "docs/c.txt", "c.txt")]


def _without_dir_times(listing: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in e.items() if not (k == "mtime_ns" and e["kind"] == "dir")}
            for name, e in listing.items()}
