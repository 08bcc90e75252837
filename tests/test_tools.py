"""Unmodified tools through the mount: git, rsync, tar, a vim-style save, cp -a, SQLite. Each round
trip starts from a native tree, goes into the mount and back out, and the trees are compared
(kind, mode, content, symlink target, user xattrs, and mtime to the nanosecond where the tool
keeps it). Every test runs on a local backend and on an S3 one (moto's server, write-back on);
what S3 cannot do is in fixtures_posix.DIFFERENCES (the source tree then has no hard link)."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from fixtures_posix import hard_links, stored


def build_tree(root: Path, *, hard_links: bool = True) -> None:
    """Files of several modes and sizes, symlinks (relative, dangling, to a dir, with ..),
    a hard link (a copy where the backend has none), a FIFO, nested directories, and times
    with nanoseconds."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "src" / "pkg" / "__init__.py").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "secret").write_bytes(b"s" * 100)
    os.chmod(root / "secret", 0o600)
    (root / "blob.bin").write_bytes(hashlib.sha256(b"seed").digest() * 40000)  # 1.2 MiB
    if hard_links:
        os.link(root / "secret", root / "secret-link")
    else:
        shutil.copy2(root / "secret", root / "secret-link")
    os.symlink("src/main.py", root / "main-link")
    os.symlink("../run.sh", root / "src" / "up-link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("src", root / "dir-link")
    os.mkfifo(root / "fifo", 0o640)
    os.chmod(root / "src" / "pkg", 0o750)
    os.setxattr(root / "src" / "main.py", "user.mime_type", b"text/x-python")
    os.setxattr(root / "src", "user.owner", b"team-a")
    stamp = 1_600_000_000_123_456_789
    entries = sorted((p for p in root.rglob("*")), key=lambda p: -len(p.parts))
    for i, p in enumerate(entries):
        os.utime(p, ns=(stamp + i * 1_000_000_007, stamp + i * 1_000_000_007), follow_symlinks=False)
    os.utime(root, ns=(stamp, stamp))


def snapshot(root: Path, *, times: bool = True, dir_times: bool = True, keep_xattrs: bool = True) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = str(full.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(full.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            else:
                extra = None
            keep_time = times and (dir_times or not stat.S_ISDIR(st.st_mode))
            xattrs = None
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                xattrs = sorted((n, os.getxattr(full, n)) for n in os.listxattr(full) if n.startswith("user."))
            out[rel] = (oct(kind), oct(stat.S_IMODE(st.st_mode)) if not stat.S_ISLNK(st.st_mode) else None,
                        extra, st.st_mtime_ns if keep_time else None, xattrs if keep_xattrs else None)
    return out


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture
def source(tmp_path, fs) -> Path:
    root = tmp_path / "source"
    root.mkdir()
    build_tree(root, hard_links=hard_links(fs))
    return root


def test_git_init_add_commit_status_clean(fs, tmp_path):
    require_tool("git")
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    repo = fs.path / "repo"
    repo.mkdir()
    build_tree(repo, hard_links=hard_links(fs))
    os.unlink(repo / "fifo")  # git does not track FIFOs
    run("git", "init", "-q", cwd=repo, env=env)
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    # a second commit: a modification, a rename and a delete (index.lock, ref locks, packs)
    (repo / "src" / "main.py").write_text("print('changed')\n")
    run("git", "mv", "run.sh", "start.sh", cwd=repo, env=env)
    run("git", "rm", "-q", "secret-link", cwd=repo, env=env)
    run("git", "commit", "-q", "-am", "second", cwd=repo, env=env)
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    assert len(run("git", "log", "--oneline", cwd=repo, env=env).splitlines()) == 2
    run("git", "gc", "-q", cwd=repo, env=env)
    run("git", "fsck", "--strict", cwd=repo, env=env)
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    # the journal saw git's O_EXCL lock files come and go
    names = {r["path"] for r in fs.journal() if r["command"] == "create" and r["status"] == "committed"}
    assert any(p.endswith("index.lock") for p in names)
    assert not (fs.path / "repo" / ".git" / "index.lock").exists()
    # a clone out of the mount and back into it, checked whole
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), env=env)
    run("git", "clone", "-q", str(clone), str(fs.path / "clone"), env=env)
    run("git", "fsck", "--strict", cwd=fs.path / "clone", env=env)
    assert run("git", "log", "--oneline", cwd=fs.path / "clone", env=env) == run(
        "git", "log", "--oneline", cwd=repo, env=env)


def test_rsync_into_and_out_of_the_mount_checksums_clean(fs, source, tmp_path):
    require_tool("rsync")
    inside = fs.path / "copy"
    back = tmp_path / "back"
    run("rsync", "-aHX", f"{source}/", f"{inside}/")
    assert run("rsync", "-aHXn", "-c", "-i", f"{source}/", f"{inside}/") == ""
    run("rsync", "-aHX", f"{inside}/", f"{back}/")
    assert run("rsync", "-aHXn", "-c", "-i", f"{inside}/", f"{back}/") == ""
    assert snapshot(back) == snapshot(source)
    assert snapshot(inside) == snapshot(source)
    if hard_links(fs):
        assert os.stat(inside / "secret").st_ino == os.stat(inside / "secret-link").st_ino  # -H kept the link
    # an update: rsync writes a temporary file and renames it over the old one
    (source / "src" / "main.py").write_text("print('v2')\n")
    out = run("rsync", "-aHX", "-i", f"{source}/", f"{inside}/")
    assert "src/main.py" in out
    assert run("rsync", "-aHXn", "-c", "-i", f"{source}/", f"{inside}/") == ""
    assert os.getxattr(inside / "src" / "main.py", "user.mime_type") == b"text/x-python"


def test_tar_round_trip_keeps_modes_and_times(fs, source, tmp_path):
    require_tool("tar")
    inside = fs.path / "untarred"
    inside.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    archive = tmp_path / "a.tar"
    x = ["--xattrs", "--xattrs-include=user.*"]
    run("tar", "--format=posix", *x, "-C", str(source), "-cf", str(archive), ".")
    run("tar", *x, "-C", str(inside), "-xpf", str(archive))
    run("tar", "--format=posix", *x, "-C", str(inside), "-cf", str(tmp_path / "b.tar"), ".")
    run("tar", *x, "-C", str(back), "-xpf", str(tmp_path / "b.tar"))
    assert snapshot(inside) == snapshot(source)
    assert snapshot(back) == snapshot(source)


def vim_style_save(path: Path, content: bytes) -> None:
    """What vim (writebackup, backupcopy=no) and most editors do: write a temporary file beside
    the original, fsync it, give it the original's mode, rename it over the original."""
    tmp = path.with_name(f".{path.name}.swp")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_vim_style_save_by_rename(fs):
    path = fs.path / "notes.txt"
    path.write_bytes(b"draft\n")
    os.chmod(path, 0o640)
    old_ino = os.stat(path).st_ino
    vim_style_save(path, b"final\n")
    assert path.read_bytes() == b"final\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.stat(path).st_ino != old_ino
    assert sorted(os.listdir(fs.path)) == ["notes.txt"]
    assert stored(fs, "notes.txt") == b"final\n"
    if shutil.which("vim"):  # the real editor, with its swap file and backup-by-rename
        run("vim", "-u", "NONE", "-N", "-es", "-c", "set backupcopy=no writebackup", "-c", "%s/final/edited/",
            "-c", "wq", str(path))
        assert path.read_bytes() == b"edited\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert sorted(os.listdir(fs.path)) == ["notes.txt"]


def test_cp_a_round_trip_with_symlinks(fs, source, tmp_path):
    inside = fs.path / "copied"
    back = tmp_path / "back"
    run("cp", "-a", str(source), str(inside))
    run("cp", "-a", str(inside), str(back))
    assert snapshot(inside) == snapshot(source)
    assert snapshot(back) == snapshot(source)
    assert os.readlink(inside / "src" / "up-link") == "../run.sh"
    assert (inside / "src" / "up-link").read_text() == "#!/bin/sh\necho run\n"
    if hard_links(fs):
        assert os.stat(inside / "secret").st_ino == os.stat(inside / "secret-link").st_ino


SQL_ROWS = 2000


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_rollback_journal_and_wal(fs, journal_mode):
    """SQLite in the mount, with its rollback journal (created, written, fsynced and deleted
    per transaction) or with WAL (a -wal file and a -shm file mapped shared): transactions,
    an update that rewrites pages in place, a VACUUM, a reopen, and integrity_check ok."""
    import sqlite3

    path = fs.path / "app.db"
    db = sqlite3.connect(path)
    try:
        assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
        for start in range(0, SQL_ROWS, 500):
            with db:
                db.executemany("INSERT INTO t (body) VALUES (?)", [(f"row {i} " * 20,) for i in range(start, start + 500)])
        with db:
            db.execute("UPDATE t SET body = upper(body) WHERE id % 3 = 0")
            db.execute("DELETE FROM t WHERE id % 10 = 0")
        db.execute("VACUUM")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == SQL_ROWS - SQL_ROWS // 10
        assert db.execute("SELECT body FROM t WHERE id = 3").fetchone()[0].startswith("ROW 2 ")
    finally:
        db.close()
    left = sorted(os.listdir(fs.path))
    assert left == ["app.db"], left
