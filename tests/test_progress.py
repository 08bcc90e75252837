"""Issue 17, progress everywhere long: `backend add`, `rollups repair`, `stats repair` and
`drift scan` report count, total, rate and time left (core.observe.progress), as JSON lines with
`--json`, drawn on a terminal's stderr, and nothing on stderr otherwise; an import killed
mid-way (SIGKILL of the real process) resumes and ends with the same tree as an
uninterrupted one."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from conftest import FILESTORE, REPO, assert_rollups_recount, db_tree, run_cli


def make_tree(root: Path, dirs: int, files: int, *, nested: int = 0) -> int:
    """`dirs` directories of `files` small files each (every `nested`-th holding one more
    level), with a symlink at the top; returns how many names the tree holds."""
    names = 0
    for d in range(dirs):
        where = root / f"d{d:03}" / ("sub" if nested and d % nested == 0 else "")
        where.mkdir(parents=True)
        names += 2 if where.name == "sub" else 1
        for i in range(files):
            (where / f"f{i:04}").write_bytes(b"x" * (i % 7))
        names += files
    os.symlink("d000", root / "link")
    return names + 1


def json_lines(done: subprocess.CompletedProcess) -> tuple[list[dict], dict]:
    """(the progress lines, the result: the last line); every line of stdout is one JSON document."""
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines and "progress" not in lines[-1], done.stdout
    return [line for line in lines[:-1] if "progress" in line], lines[-1]


def assert_progress(progress: list[dict], what: str, total: int) -> None:
    """Every line is `what`'s, with a count, a rate and an elapsed time; the last one is done with
    the total reached; a line with a total and a rate has the time left."""
    assert progress and all(p["progress"] == what for p in progress), progress
    assert all(p["count"] >= 0 and p["rate_per_s"] >= 0 and p["elapsed_s"] >= 0 for p in progress), progress
    last = progress[-1]
    assert last["done"] and (last["count"], last["total"], last["estimated"]) == (total, total, False), last
    assert [p["done"] for p in progress].count(True) == 1
    for p in progress[:-1]:
        if p["total"] is not None and p["rate_per_s"] > 0:
            assert p["left_s"] is not None and p["left_s"] >= 0, p


def test_each_long_command_reports_its_progress_as_json_lines_and_nothing_on_stderr(env, db, tmp_path):
    root = tmp_path / "tree"
    names = make_tree(root, 30, 20, nested=10)
    done = run_cli(env, "backend", "add", "t", str(root), "--json")
    progress, result = json_lines(done)
    assert_progress(progress, "imported entries", names)
    assert result["added"] == "t" and done.stderr == ""
    dirs = 1 + db.execute("SELECT count(*) FROM filestore.nodes n JOIN filestore.backend_mounts b"
                          " ON b.id = n.backend_id WHERE b.name = 't' AND n.kind = 'dir' AND n.id <> b.root_node_id"
                          ).fetchone()[0]
    assert dirs == 1 + 30 + 3

    # rollups repair: a damaged directory is found and rebuilt, directories written of the subtree's
    db.execute("UPDATE filestore.rollups SET size_bytes = size_bytes + 5 WHERE node_id = ("
               "SELECT e.node_id FROM filestore.entries e JOIN filestore.backend_mounts b ON b.root_node_id ="
               " e.parent_id WHERE b.name = 't' AND e.name = 'd005')")
    done = run_cli(env, "rollups", "repair", "t:/", "--json")
    progress, result = json_lines(done)
    assert_progress(progress, "directories recounted", dirs)
    assert any(p["note"].startswith("recounting") for p in progress), progress  # the statement with no count
    assert (result["repaired"], result["directories"], result["differed"]) == ("t:/", dirs, 1)
    assert done.stderr == ""
    assert_rollups_recount(db, "t")

    # stats repair and verify: directories compared of the subtree's
    run_cli(env, "stats", "verify", "t")  # the first fold of a new database seeds every directory's counters
    db.execute("UPDATE filestore.counters SET value = value + 9 WHERE scope = 'dir' AND counter = 'nodes.file'"
               " AND scope_key = (SELECT e.node_id::text FROM filestore.entries e JOIN filestore.backend_mounts b"
               " ON b.root_node_id = e.parent_id WHERE b.name = 't' AND e.name = 'd007')")
    done = run_cli(env, "stats", "repair", "t", "--json")
    progress, result = json_lines(done)
    assert_progress(progress, "directories compared", dirs)
    assert (result["action"], [(d["counter"], d["recorded"] - d["expected"]) for d in result["differences"]]) \
        == ("repair", [("nodes.file", 9)])
    assert done.stderr == ""
    done = run_cli(env, "stats", "verify", "t", "--json")
    assert json_lines(done)[1]["differences"] == [] and done.stderr == ""

    # drift scan: directories scanned of those recorded (a directory gone counts its subtree)
    (root / "d002" / "f0003").unlink()
    (root / "d004" / "new").write_bytes(b"new")
    os.rename(root / "d010", tmp_path / "away")  # with its `sub`: two directories gone at once
    done = run_cli(env, "drift", "scan", "t", "--json", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    progress, result = json_lines(done)
    assert_progress(progress, "directories scanned", dirs)
    assert [(f["what"], f["path"]) for f in result["differences"]] == [
        ("gone", "d002/f0003"), ("new", "d004/new"), ("gone", "d010")]
    assert done.stderr == ""

    # without --json and not on a terminal: the results, no progress anywhere
    for args in (("rollups", "repair", "t:/d001"), ("stats", "repair", "t"), ("drift", "scan", "t:/d001")):
        done = run_cli(env, *args)
        assert done.stderr == "" and "progress" not in done.stdout and "\r" not in done.stdout, args


def test_a_terminal_sees_the_import_redrawn_with_its_total_and_time_left(env, tmp_path):
    root = tmp_path / "tree"
    names = make_tree(root, 20, 200)
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([*FILESTORE, "backend", "add", "t", str(root)], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=follower, text=True)
        os.close(follower)
        drawn = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end closed: the command ended
                break
            if not chunk:
                break
            drawn += chunk
        assert process.wait(60) == 0
        assert process.stdout.read().strip() == f"added backend t -> {root}"
    finally:
        os.close(leader)
    lines = [line for line in drawn.decode().split("\r") if line.strip()]
    assert f"imported entries: {names:,} of {names:,}" in lines[-1], drawn  # the last, drawn when done
    assert any(" left" in line for line in lines), drawn


def read_progress_until(process: subprocess.Popen, count: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, "the import ended before it was killed"
        data = json.loads(line)
        if data.get("count", 0) >= count:
            return data
    raise AssertionError(f"no progress line with {count} entries")


def test_an_import_killed_midway_resumes_and_ends_with_the_same_tree_as_an_uninterrupted_one(env, db, tmp_path):
    """Issue 17: SIGKILL of a real `backend add` once its progress says some thousands are in;
    the same command again finishes it (its progress counting on from what was in), and the
    tree, the rollups and the counters equal those of the same tree imported in one go."""
    root = tmp_path / "tree"
    names = make_tree(root, 40, 500, nested=8)  # about 20,000 names
    process = subprocess.Popen([*FILESTORE, "backend", "add", "resumed", str(root), "--json"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_progress_until(process, 3000)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
    options, = db.execute("SELECT options FROM filestore.backend_mounts WHERE name = 'resumed'").fetchone()
    assert options["import"]["pending"], "the kill came after the import's end"
    kept = db.execute("SELECT count(*) FROM filestore.entries e JOIN filestore.nodes n ON n.id = e.parent_id"
                      " JOIN filestore.backend_mounts b ON b.id = n.backend_id WHERE b.name = 'resumed'").fetchone()[0]
    assert seen["count"] <= kept < names
    assert not db.execute("SELECT 1 FROM filestore.journal_entries WHERE command = 'backend.add'").fetchall()

    done = run_cli(env, "backend", "add", "resumed", str(root), "--json")
    progress, result = json_lines(done)
    assert progress[0]["count"] >= kept  # counting on from what the killed run committed
    assert_progress(progress, "imported entries", names)
    assert result["added"] == "resumed" and done.stderr == ""
    run_cli(env, "backend", "add", "whole", str(root))

    resumed, whole = db_tree(db, "resumed"), db_tree(db, "whole")
    assert len(whole) == names and resumed == whole  # names, kinds, sizes, modes, targets, by path
    nodes = {name: db.execute(
        "SELECT count(*) FROM filestore.nodes n JOIN filestore.backend_mounts b ON b.id = n.backend_id"
        " WHERE b.name = %s", (name,)).fetchone()[0] for name in ("resumed", "whole")}
    assert nodes["resumed"] == nodes["whole"] == names + 1  # no node left over from the killed run
    results = dict(db.execute("SELECT args->>'name', result FROM filestore.journal_entries"
                              " WHERE command = 'backend.add'").fetchall())
    assert results["resumed"] == results["whole"]
    for name in ("resumed", "whole"):
        assert_rollups_recount(db, name)
        done = run_cli(env, "stats", "verify", name, "--json", check=False)
        assert done.returncode == 0 and json_lines(done)[1]["differences"] == [], done.stdout


def test_an_s3_import_counts_its_total_from_the_keys(env, db, s3_endpoint, bucket, s3):
    """The S3 executor's count (a LIST without delimiter): objects, and the directories their
    keys imply, once each (a directory marker too); keys the import skips are not counted."""
    from concurrent.futures import ThreadPoolExecutor

    from fixtures_s3 import S3_ENV

    keys = [f"data/d{i % 7}/e{i % 3}/f{i:03}" for i in range(150)] + ["data/top.txt", "data/empty/", "data/a//b",
                                                                       "elsewhere/x"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))
    env.update(S3_ENV)
    done = run_cli(env, "backend", "add", "s", f"s3://{bucket}/data", "--endpoint-url", s3_endpoint, "--json")
    progress, result = json_lines(done)
    names = len(db_tree(db, "s"))
    assert names == 150 + 1 + 1 + 1 + 7 + 7 * 3  # files, top.txt, empty/, a (empty: `a//b` is no name), d0-d6, e0-e2
    assert_progress(progress, "imported entries", names)
    assert any(p["total"] == names and not p["estimated"] for p in progress[:-1]) or len(progress) == 1, progress
    assert result["added"] == "s" and done.stderr == ""
