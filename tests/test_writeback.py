"""S3 write-back (docs/architecture.md D34) through real mounts on a real S3 endpoint (moto's
server), S3 failures injected by the FaultProxy: close answers before the upload, the journal
says it is pending, everything that reads or changes the node waits for it, a crash or an
unmount with S3 down resumes it at the next start, and a lost spool file is reported."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading

import pytest
from conftest import Mount, wait_until
from fixtures_s3 import pending_uploads, start_s3_mount, stop_and_check, wait_uploaded

KiB = 1 << 10


def keys(s3, bucket: str, prefix: str = "data/") -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(out)


def body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def failed_attempts(db) -> int:
    return db.execute("SELECT coalesce(min(attempts), 0) FROM filestore.uploads").fetchone()[0]


def puts_fail(method: str, path: str) -> bool:
    return method == "PUT"


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported by the caller
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def wb(s3_proxied):
    return s3_proxied


def test_close_returns_before_the_upload_which_lands_when_s3_answers(wb, s3, fault_proxy):
    t = wb
    data = os.urandom(100 * KiB)
    fault_proxy.fail_when = puts_fail
    (t.path / "f.bin").write_bytes(data)  # S3 refuses every PUT: close succeeds all the same
    node = t.node("f.bin", "s3")
    assert node["size"] == len(data) and node["checksum"] is None
    row = t.db.execute("SELECT size, path, owner FROM filestore.uploads WHERE node_id = %s", (node["id"],)).fetchone()
    assert row[0] == len(data) and bytes(row[1]) == b"f.bin" and row[2].endswith(str(t.tmp / "home"))
    write = [j for j in t.journal() if j["node_id"] == node["id"] and j["command"] == "write"]
    assert write[0]["status"] == "committed" and write[0]["args"]["upload"] == "pending"
    assert keys(s3, t.bucket) == []
    gets = fault_proxy.counts["GET"]
    assert (t.path / "f.bin").read_bytes() == data  # read your writes: from the spool file
    assert fault_proxy.counts["GET"] == gets
    wait_until(lambda: failed_attempts(t.db) >= 2, timeout=30, message="failed attempts recorded")
    assert t.db.execute("SELECT last_error FROM filestore.uploads").fetchone()[0]
    fault_proxy.fail_when = None  # S3 answers again: the upload lands by itself
    wait_uploaded(t)
    got = s3.get_object(Bucket=t.bucket, Key="data/f.bin")
    assert got["Body"].read() == data
    node = t.node("f.bin", "s3")
    assert node["checksum"] == got["ETag"].strip('"') == hashlib.md5(data).hexdigest()
    upload = [j for j in t.journal() if j["node_id"] == node["id"] and j["command"] == "upload"]
    assert len(upload) == 1 and upload[0]["actor"] == "writeback" and upload[0]["rollup"] is None
    assert upload[0]["args"]["attempts"] >= 3


def test_fsync_returns_once_the_object_is_in_s3(wb, s3, fault_proxy):
    t = wb
    fault_proxy.fail_when = puts_fail
    (t.path / "f").write_bytes(b"durable")
    fd = os.open(t.path / "f", os.O_RDONLY)
    try:
        thread, out = in_thread(lambda: os.fsync(fd))
        wait_until(lambda: failed_attempts(t.db) >= 2, timeout=30, message="failed attempts recorded")
        assert thread.is_alive()  # still waiting: the upload has not landed
        fault_proxy.fail_when = None
        thread.join(60)
        assert "error" not in out, out
        # fsync returned: the object is in S3 and the node says so, without waiting further
        assert body(s3, t.bucket, "data/f") == b"durable"
        assert t.node("f", "s3")["checksum"] is not None and pending_uploads(t.db) == 0
    finally:
        os.close(fd)


def test_status_reports_uploads_that_keep_failing_and_is_healthy_once_they_land(wb, s3, fault_proxy):
    """S3 refuses every PUT: the upload is retried for as long as it takes (its spool file is
    the only copy), and `filestore status` says so: the backend's write-back failing with S3's
    error, the report unhealthy (exit 1). Once S3 answers, it lands and the report is healthy."""
    t = wb
    fault_proxy.fail_when = puts_fail
    (t.path / "kept.bin").write_bytes(b"k" * 5000)
    (t.path / "other.bin").write_bytes(b"o" * 3000)
    wait_until(lambda: failed_attempts(t.db) >= 3, timeout=60, message="three failed attempts each")
    done = t.cli("status", "--json", check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and not report["healthy"], done.stdout
    [backlog] = report["writeback"]
    assert (backlog["backend"], backlog["uploads"], backlog["deletions"], backlog["failing"]) == ("s3", 2, 0, 2)
    assert backlog["max_attempts"] >= 3 and backlog["oldest_age_seconds"] > 0
    assert any(code in backlog["last_error"] for code in ("InternalError", "SlowDown", "ServiceUnavailable"))
    text = t.cli("status", check=False).stdout
    assert "S3 write-back" in text and "last error" in text and "NOT healthy" in text, text
    fault_proxy.fail_when = None
    wait_uploaded(t)
    done = t.cli("status", "--json", check=False)
    report = json.loads(done.stdout)
    assert report["writeback"] == [] and report["healthy"] and done.returncode == 0, done.stdout


def test_renames_and_unlinks_of_pending_files_do_not_wait_for_their_uploads(wb, s3, fault_proxy):
    """S3 refuses every PUT: renames (of files and of a directory of pending files), an unlink
    and a chmod all return at once; the uploads land under the new names once S3 answers,
    journaled after the renames, and the unlinked file's upload never happens."""
    t = wb
    (t.path / "dir").mkdir()

    def file_puts_fail(method: str, path: str) -> bool:  # a directory's marker is copied by the rename
        return method == "PUT" and not path.endswith("/")
    fault_proxy.fail_when = file_puts_fail
    (t.path / "a.txt").write_bytes(b"a")
    (t.path / "b.txt").write_bytes(b"b")
    for i in range(10):
        (t.path / "dir" / f"f{i}").write_bytes(b"%d" % i * 100)
    t.settle()
    assert pending_uploads(t.db) == 12
    os.rename(t.path / "a.txt", t.path / "c.txt")
    os.chmod(t.path / "c.txt", 0o600)
    os.unlink(t.path / "b.txt")
    os.rename(t.path / "dir", t.path / "dir2")
    assert keys(s3, t.bucket) == ["data/dir2/"]  # no upload landed meanwhile
    assert pending_uploads(t.db) == 11  # the unlink cancelled b.txt's, in its own transaction
    assert (t.path / "c.txt").read_bytes() == b"a" and (t.path / "dir2" / "f3").read_bytes() == b"3" * 100
    fault_proxy.fail_when = None
    wait_uploaded(t)
    assert keys(s3, t.bucket) == ["data/c.txt", "data/dir2/"] + [f"data/dir2/f{i}" for i in range(10)]
    assert body(s3, t.bucket, "data/c.txt") == b"a"
    assert s3.head_object(Bucket=t.bucket, Key="data/c.txt")["Metadata"]["mode"] == str(0o100600)
    assert body(s3, t.bucket, "data/dir2/f7") == b"7" * 100
    rows = t.journal()
    commands = [j["command"] for j in rows if j["path"] in ("a.txt", "c.txt")]
    assert commands == ["create", "write", "rename", "setattr", "upload"]
    unlink = [j for j in rows if j["command"] == "unlink"]
    assert unlink[0]["path"] == "b.txt" and unlink[0]["args"]["upload"] == "cancelled"
    assert not any(j["command"] == "upload" and j["path"] == "b.txt" for j in rows)


GiB = 1 << 30


def test_a_pending_1_gib_file_is_renamed_and_another_unlinked_while_their_uploads_are_held(wb, s3, fault_proxy):
    """Two sparse 1 GiB files are being sent (their parts held by the proxy, as a slow network
    would): renaming one and unlinking the other return while the sends are still held; the
    renamed one lands under its new key only, the unlinked one nowhere, and no multipart
    upload is left open."""
    t = wb
    for name in ("big1", "big2"):
        with open(t.path / name, "wb") as f:
            f.truncate(GiB)
            f.seek(GiB - 5)
            f.write(name.encode() + b"!")
            f.seek(0)
            f.write(b"head-" + name.encode())
    fault_proxy.hold_when = lambda method, path: method == "PUT" and "partNumber" in path and "/data/big" in path
    t.settle()
    wait_until(lambda: fault_proxy.held >= 2, timeout=60, message="both sends to be under way")
    os.rename(t.path / "big1", t.path / "moved")
    os.unlink(t.path / "big2")
    held = fault_proxy.held
    assert not fault_proxy._released.is_set() and held >= 2  # answered while the sends are held
    assert sorted(os.listdir(t.path)) == ["moved"]
    with open(t.path / "moved", "rb") as f:  # read from the spool file meanwhile
        assert f.read(9) == b"head-big1" and os.pread(f.fileno(), 6, GiB - 6) == b"\0big1!"[-6:]
    fault_proxy.hold_when = None
    fault_proxy.release()  # the held parts fail; the renamed file is sent again, to its new key
    wait_uploaded(t, timeout=240)
    assert keys(s3, t.bucket) == ["data/moved"]
    head = s3.head_object(Bucket=t.bucket, Key="data/moved")
    assert head["ContentLength"] == GiB
    got = s3.get_object(Bucket=t.bucket, Key="data/moved", Range=f"bytes={GiB - 5}-{GiB - 1}")["Body"].read()
    assert got == b"big1!"
    assert not s3.list_multipart_uploads(Bucket=t.bucket).get("Uploads")
    rows = t.journal()
    assert [j["command"] for j in rows if j["path"] in ("big1", "moved")] == ["create", "write", "rename", "upload"]
    assert [j["args"].get("upload") for j in rows if j["command"] == "unlink"] == ["cancelled"]
    assert not os.listdir(t.pending)


def test_a_new_open_for_writing_waits_and_starts_from_the_uploaded_content(wb, s3, fault_proxy):
    t = wb
    (t.path / "log").write_bytes(b"one\n")
    with open(t.path / "log", "ab") as f:  # the first upload may still be pending
        f.write(b"two\n")
    with open(t.path / "log", "ab") as f:
        f.write(b"three\n")
    wait_uploaded(t)
    assert body(s3, t.bucket, "data/log") == b"one\ntwo\nthree\n"
    assert [j["command"] for j in t.journal() if j["path"] == "log"].count("upload") == 3


def test_a_crash_after_close_is_uploaded_at_the_next_start(wb, s3, fault_proxy):
    t = wb
    data = {f"f{i}": os.urandom(5 * KiB + i) for i in range(5)}
    fault_proxy.fail_when = puts_fail
    for name, content in data.items():
        (t.path / name).write_bytes(content)
    # SIGKILL right after the closes returned: nothing was uploaded, and the write commands
    # (with their upload rows) may not even be committed: the next start commits them first
    t.mount.kill()
    assert keys(s3, t.bucket) == [] and len(os.listdir(t.pending)) == 5
    fault_proxy.fail_when = None
    t.mount.start()  # resumes this home's uploads before serving
    wait_uploaded(t)
    for name, content in data.items():
        got = s3.get_object(Bucket=t.bucket, Key=f"data/{name}")
        assert got["Body"].read() == content
        assert t.node(name, "s3")["checksum"] == got["ETag"].strip('"')
        assert (t.path / name).read_bytes() == content
    assert sum(1 for j in t.journal() if j["command"] == "upload") == 5


def test_unmount_with_s3_down_keeps_the_uploads_for_the_next_start(wb, s3, fault_proxy):
    t = wb
    fault_proxy.fail_when = puts_fail
    (t.path / "kept").write_bytes(b"kept while S3 is down")
    t.mount.stop()  # exits (code 0) though the upload could not land
    assert pending_uploads(t.db) == 1 and keys(s3, t.bucket) == []
    assert "uploads still pending" in t.mount.log()
    fault_proxy.fail_when = None
    t.mount.start()
    wait_uploaded(t)
    assert body(s3, t.bucket, "data/kept") == b"kept while S3 is down"


def test_a_lost_spool_file_is_reported_and_reconciled(tmp_path, env, db, s3_endpoint, bucket, s3, fault_proxy):
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 1})
    try:
        (t.path / "old").write_bytes(b"old content")
        wait_uploaded(t)
        fault_proxy.fail_when = puts_fail
        (t.path / "old").write_bytes(b"new content, never uploaded")
        t.mount.kill()
        for name in os.listdir(t.pending):
            os.unlink(t.pending / name)  # the host lost it
        fault_proxy.fail_when = None
        t.mount.start()
        assert "LOST UPLOAD" in t.mount.log()
        drift = [j for j in t.journal() if j["command"] == "drift" and j["actor"] == "writeback"]
        assert len(drift) == 1 and drift[0]["path"] == "old"
        assert pending_uploads(t.db) == 0
        # The reconciler adopts what S3 holds (the old object) instead of the lost content.
        wait_until(lambda: (t.node("old", "s3") or {}).get("state") == "ACTIVE", timeout=30,
                   message="the reconciler to adopt the object")
        assert t.node("old", "s3")["size"] == len(b"old content")
        assert (t.path / "old").read_bytes() == b"old content"
    finally:
        fault_proxy.fail_when = None
        stop_and_check(t, s3)


def test_another_mount_never_reads_the_old_object_of_a_pending_file(wb, s3, fault_proxy):
    t = wb
    (t.path / "f").write_bytes(b"old")
    wait_uploaded(t)
    home_b = t.tmp / "home-b"
    b = Mount({**t.env, "FILESTORE_HOME": str(home_b), "FILESTORE_S3_WAIT_SECONDS": "3"},
              t.tmp / "mnt-b", home_b / "logs" / "b.log").start()
    try:
        fault_proxy.fail_when = puts_fail
        (t.path / "f").write_bytes(b"new, bigger")  # recorded in A; the old object stays in S3
        # Other mounts see the write once its group is committed (answered before: section 4 of
        # docs/architecture.md), which under load can take longer than B's first read.
        wait_until(lambda: pending_uploads(t.db) == 1, message="A's write to be committed")
        assert body(s3, t.bucket, "data/f") == b"old"
        with pytest.raises(OSError) as raised:  # B waits for the upload, bounded: EIO
            (b.mountpoint / "s3" / "f").read_bytes()
        assert raised.value.errno == errno.EIO
        thread, out = in_thread(lambda: (b.mountpoint / "s3" / "f").read_bytes())
        wait_until(lambda: failed_attempts(t.db) >= 2, timeout=30, message="failed attempts recorded")
        fault_proxy.fail_when = None
        thread.join(60)
        assert out.get("value") == b"new, bigger", out
    finally:
        fault_proxy.fail_when = None
        b.stop()


def test_an_unmount_right_after_a_write_and_its_unlink_leaves_no_spool_file(tmp_path, env, db, s3_endpoint, bucket,
                                                                            s3):
    """A file written (its content kept in a spool file for write-back) and unlinked before its
    group committed, then the unmount: the upload, handed over at commit, is dropped with its
    spool file. Groups wait 3 s for company here, so the unmount begins before the commit (the
    window SQLite's -wal file met in CI: written, closed, unlinked, unmounted)."""
    env["FILESTORE_INLINE_LOOPS"] = "0"
    env["FILESTORE_COMMIT_DELAY_MS"] = "3000"
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        (t.path / "gone").write_bytes(b"written, then unlinked before its commit")
        assert len(os.listdir(t.pending)) == 1  # kept for write-back, not committed yet
        os.unlink(t.path / "gone")
        t.mount.stop()  # no upload pending any more: only the commit hands this one over
        assert keys(s3, bucket) == []
    finally:
        stop_and_check(t, s3)  # no spool file left, bucket = database


def test_two_thousand_small_files_are_all_in_the_bucket_after_unmount(tmp_path, env, db, s3_endpoint, bucket, s3):
    env["FILESTORE_INLINE_LOOPS"] = "0"
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        for d in range(20):
            (t.path / f"d{d}").mkdir()
            for i in range(100):
                (t.path / f"d{d}" / f"f{i}").write_bytes(b"%04d-%02d " % (i, d) * 512)
        t.mount.stop(timeout=600)  # the unmount drains the uploads
        assert pending_uploads(t.db) == 0
        names = [k for k in keys(s3, bucket) if not k.endswith("/")]
        assert len(names) == 2000
        for d in (0, 7, 19):
            for i in (0, 42, 99):
                assert body(s3, bucket, f"data/d{d}/f{i}") == b"%04d-%02d " % (i, d) * 512
        etags = {o["Key"]: o["ETag"].strip('"') for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="data/") for o in page.get("Contents", [])}
        for d in range(20):
            for i in range(100):
                assert etags[f"data/d{d}/f{i}"] == hashlib.md5(b"%04d-%02d " % (i, d) * 512).hexdigest()
    finally:
        stop_and_check(t, s3)


def test_an_empty_file_created_and_closed_waits_for_no_put_and_is_uploaded_empty(wb, s3, fault_proxy):
    """D48: the create of an empty file is answered from the namespace and its close
    from the local spool (S3 refuses every PUT meanwhile); ONE PUT lands the empty object after."""
    t = wb
    fault_proxy.fail_when = puts_fail
    fd = os.open(t.path / "empty", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)  # answered although S3 refuses every PUT
    with pytest.raises(FileExistsError):  # O_EXCL decided by the namespace
        os.open(t.path / "empty", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    st = os.stat(t.path / "empty")
    assert st.st_size == 0 and st.st_mode & 0o777 == 0o640
    assert "empty" in os.listdir(t.path) and (t.path / "empty").read_bytes() == b""
    node = t.node("empty", "s3")
    assert node["checksum"] is None and pending_uploads(t.db) == 1
    assert not t.pending.exists() or os.listdir(t.pending) == []  # D58: empty content needs no spool file
    create = [j for j in t.journal() if j["node_id"] == node["id"] and j["command"] == "create"]
    assert create[0]["status"] == "committed" and create[0]["args"]["upload"] == "pending"
    assert keys(s3, t.bucket) == []
    os.chmod(t.path / "empty", 0o600)  # recorded; the landing applies it
    os.rename(t.path / "empty", t.path / "renamed")  # retargets the pending upload
    fd = os.open(t.path / "gone", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    os.unlink(t.path / "gone")  # cancels its upload
    fault_proxy.fail_when = None
    wait_uploaded(t)
    assert keys(s3, t.bucket) == ["data/renamed"]
    head = s3.head_object(Bucket=t.bucket, Key="data/renamed")
    assert head["ContentLength"] == 0 and int(head["Metadata"]["mode"]) & 0o777 == 0o600
    assert t.node("renamed", "s3")["checksum"] == head["ETag"].strip('"') == hashlib.md5(b"").hexdigest()


def test_a_crash_after_empty_creates_are_closed_uploads_them_at_the_next_start(wb, s3, fault_proxy):
    t = wb
    fault_proxy.fail_when = puts_fail
    for i in range(5):
        os.close(os.open(t.path / f"e{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    t.mount.kill()  # SIGKILL after the creates and closes were answered, before any PUT landed
    # empty content is kept as its upload row alone (D58, committed or in the intent log): no
    # spool file to find at the start
    assert keys(s3, t.bucket) == []
    assert not t.pending.exists() or os.listdir(t.pending) == []
    fault_proxy.fail_when = None
    t.mount.start()  # resumes this home's uploads before serving
    wait_uploaded(t)
    assert keys(s3, t.bucket) == [f"data/e{i}" for i in range(5)]
    for i in range(5):
        node = t.node(f"e{i}", "s3")
        assert node["size"] == 0 and node["checksum"] == hashlib.md5(b"").hexdigest()
        assert os.stat(t.path / f"e{i}").st_size == 0
    journal = t.journal()
    assert sum(1 for j in journal if j["command"] == "create" and j["status"] == "committed") == 5
    assert sum(1 for j in journal if j["command"] == "upload") == 5


HOUR = "3600"


@pytest.fixture
def holding(request, tmp_path, env, db, bucket, s3, fault_proxy):
    """A mount whose write-back holds uploads (D55) by the settings given as the test's
    parameter: (FILESTORE_S3_WRITEBACK_IDLE_MS, FILESTORE_S3_WRITEBACK_HOLD_SECONDS)."""
    idle_ms, hold_seconds = request.param
    env.update(FILESTORE_INLINE_LOOPS="0", FILESTORE_S3_WRITEBACK_IDLE_MS=idle_ms,
               FILESTORE_S3_WRITEBACK_HOLD_SECONDS=hold_seconds)
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 1})
    try:
        yield t
    finally:
        stop_and_check(t, s3)


@pytest.mark.parametrize("holding", [(HOUR + "000", HOUR)], indirect=True)
def test_held_uploads_wait_for_a_pause_but_an_fsync_sends_its_file_at_once_and_the_unmount_the_rest(
        holding, s3, fault_proxy):
    """Closes keep coming (no pause is long enough here, no hold ends): the uploads are held,
    committed and readable from the spool. Whoever waits for one is not held: fsync sends its
    own file alone; the unmount sends the others."""
    t = holding
    for name in ("a", "b", "c"):
        (t.path / name).write_bytes(name.encode() * 1000)
    t.settle()
    assert pending_uploads(t.db) == 3
    threading.Event().wait(1.5)  # time enough for three uploads, were they not held
    assert fault_proxy.counts["PUT"] == 0 and keys(s3, t.bucket) == []
    assert (t.path / "b").read_bytes() == b"b" * 1000
    fd = os.open(t.path / "b", os.O_RDONLY)
    try:
        os.fsync(fd)  # durable in the backend: uploaded before it returns
    finally:
        os.close(fd)
    assert keys(s3, t.bucket) == ["data/b"] and fault_proxy.counts["PUT"] == 1
    assert pending_uploads(t.db) == 2
    t.mount.stop()
    assert keys(s3, t.bucket) == ["data/a", "data/b", "data/c"]
    assert body(s3, t.bucket, "data/c") == b"c" * 1000


@pytest.mark.parametrize("holding", [("200", HOUR), (HOUR + "000", "1")], indirect=True,
                         ids=["a pause in closes", "the hold's end"])
def test_held_uploads_are_released_by_a_pause_in_closes_or_at_the_end_of_their_hold(holding, s3):
    """Either release alone lands them, with nobody waiting for them (the other is an hour)."""
    t = holding
    for name in ("a", "b"):
        (t.path / name).write_bytes(name.encode() * 1000)
    wait_uploaded(t, timeout=30)
    assert keys(s3, t.bucket) == ["data/a", "data/b"]
