"""S3 backends against a real S3 endpoint on loopback (moto's server): the executor alone, and
through a real mount, with the bucket and the database compared after every mount test."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import assert_consistent, wait_until
from fixtures_s3 import assert_bucket_consistent, start_s3_mount, stop_and_check, wait_uploaded

from core.errors import errno_for
from executors import base
from executors.s3 import S3Executor
from executors.s3cache import ChunkCache, Reader

MiB = 1 << 20


def make_executor(endpoint: str, bucket: str, tmp_path, **kwargs) -> S3Executor:
    opts = dict(part_size=5 * MiB, multipart_threshold=6 * MiB, chunk_size=1 * MiB, region="us-east-1")
    opts.update(kwargs)
    return S3Executor(f"s3://{bucket}/root", spool_dir=tmp_path / "spool", cache_dir=tmp_path / "cache",
                      endpoint_url=endpoint, **opts)


@pytest.fixture
def x(s3_endpoint, bucket, tmp_path):
    ex = make_executor(s3_endpoint, bucket, tmp_path)
    yield ex
    ex.close()


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(out)


def land_bytes(x: S3Executor, parent: bytes, name: bytes, data: bytes, staging_id: str = "1.t"):
    fd = x.stage(staging_id)
    try:
        os.write(fd, data)
        return x.land(staging_id, parent, name, mode=0o640, uid=1000, gid=100, times_ns=None, durable=False)
    finally:
        os.close(fd)


# == the executor ==========================================================================
def test_layout_follows_the_s3fs_metadata_convention(x, s3, bucket):
    x.mkdir(b"", b"d", 0o750, 1000, 100)
    x.create_file(b"d", b"empty", 0o600, 1000, 100)
    x.symlink(b"d", b"link", b"../target", 1000, 100)
    x.mknod(b"d", b"pipe", "fifo", 0o644, 0, 0, 0)
    assert keys(s3, bucket) == ["root/d/", "root/d/empty", "root/d/link", "root/d/pipe"]
    meta = s3.head_object(Bucket=bucket, Key="root/d/")["Metadata"]
    assert int(meta["mode"]) == stat.S_IFDIR | 0o750 and meta["uid"] == "1000" and meta["gid"] == "100"
    assert int(s3.head_object(Bucket=bucket, Key="root/d/empty")["Metadata"]["mode"]) == stat.S_IFREG | 0o600
    link = s3.get_object(Bucket=bucket, Key="root/d/link")
    assert link["Body"].read() == b"../target" and stat.S_ISLNK(int(link["Metadata"]["mode"]))
    assert stat.S_ISFIFO(int(s3.head_object(Bucket=bucket, Key="root/d/pipe")["Metadata"]["mode"]))
    st = x.stat(b"d/link")
    assert (st.kind, st.target, st.size) == ("symlink", b"../target", 9)
    assert x.stat(b"d/pipe").kind == "fifo"
    assert x.readlink(b"d/link") == b"../target"


def test_objects_written_by_other_tools_read_sensibly(x, s3, bucket):
    # rclone writes the mode in octal and mtime with a fraction; plain uploads have no metadata.
    s3.put_object(Bucket=bucket, Key="root/a/b/deep.txt", Body=b"12345",
                  Metadata={"mode": "0100600", "mtime": "1700000000.5", "uid": "7", "gid": "8"})
    s3.put_object(Bucket=bucket, Key="root/plain.bin", Body=b"x" * 10)
    listing = dict(x.listdir(b""))
    assert listing[b"a"].kind == "dir" and listing[b"a"].mode == 0o755  # implied by a key under it
    assert (listing[b"plain.bin"].kind, listing[b"plain.bin"].size, listing[b"plain.bin"].mode) == ("file", 10, 0o644)
    deep = x.stat(b"a/b/deep.txt")
    assert (deep.mode, deep.uid, deep.gid, deep.size) == (0o600, 7, 8, 5)
    assert deep.mtime_ns == 1_700_000_000_500_000_000
    assert x.stat(b"a/b").kind == "dir"
    with pytest.raises(base.NotFound):
        x.stat(b"a/nothing")


def test_listing_is_paginated(x, s3, bucket):
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"root/many/f{i:04d}", Body=b""), range(1100)))
    names = {name for name, _ in x.listdir(b"many")}
    assert len(names) == 1100  # more than one page of 1,000 keys


def test_multipart_upload_is_verified_and_parallel(x, s3, bucket):
    data = os.urandom(13 * MiB)
    st = land_bytes(x, b"", b"big", data)
    head = s3.head_object(Bucket=bucket, Key="root/big")
    assert head["ETag"].strip('"') == st.checksum and st.checksum.endswith("-3")  # 5 + 5 + 3 MiB
    assert s3.get_object(Bucket=bucket, Key="root/big")["Body"].read() == data
    assert int(head["Metadata"]["mode"]) == stat.S_IFREG | 0o640
    assert x.staged() == []  # the spool file is gone once uploaded
    # each part carried a CRC32 the server checked, so the object holds a composite checksum
    # (without one S3 computes a full-object CRC64NVME at completion: slow in moto)
    checked = s3.head_object(Bucket=bucket, Key="root/big", ChecksumMode="ENABLED")
    assert checked.get("ChecksumCRC32") and "ChecksumCRC64NVME" not in checked, checked


def test_a_part_received_wrong_by_a_store_without_checksums_fails_the_upload(fault_proxy, bucket, s3, tmp_path):
    """A store that answers no part checksum (the proxy strips them: moto echoes the CRC32 it was
    sent without checking it) has each part's ETag compared with the part's MD5 here, and the
    object's ETag with the MD5 of the part MD5s (D54): a clean upload passes both, and a part
    corrupted on the way fails the upload, which leaves the old object as it was."""
    ex = make_executor(fault_proxy.url, bucket, tmp_path, max_attempts=1)
    try:
        fault_proxy.strip_checksums = True
        old = os.urandom(13 * MiB)
        st = land_bytes(ex, b"", b"big", old)
        assert st.checksum.endswith("-3") and s3.get_object(Bucket=bucket, Key="root/big")["Body"].read() == old
        fault_proxy.mangle_when = lambda method, path: method == "PUT" and "partNumber=2" in path
        with pytest.raises(base.ExecutorError, match="part 2 of root/big: ETag does not match"):
            land_bytes(ex, b"", b"big", os.urandom(13 * MiB), staging_id="2.t")
        got = s3.get_object(Bucket=bucket, Key="root/big")
        assert got["ETag"].strip('"') == st.checksum and got["Body"].read() == old
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # the failed one aborted
    finally:
        ex.close()


def test_multipart_copy_above_the_copy_limit(s3_endpoint, bucket, s3, tmp_path):
    # CopyObject stops at 5 GiB; the limit is lowered here so that UploadPartCopy is exercised.
    ex = make_executor(s3_endpoint, bucket, tmp_path, copy_threshold=6 * MiB)
    try:
        data = os.urandom(12 * MiB)
        land_bytes(ex, b"", b"src", data)
        ex.rename(b"", b"src", b"", b"dst")
        assert keys(s3, bucket) == ["root/dst"]
        got = s3.get_object(Bucket=bucket, Key="root/dst")
        assert got["Body"].read() == data and got["ETag"].strip('"').endswith("-3")
        assert got["Metadata"]["uid"] == "1000"  # metadata carried over
    finally:
        ex.close()


def test_rmdir_of_a_non_empty_prefix_and_directory_rename(x, s3, bucket):
    x.mkdir(b"", b"d", 0o755, 0, 0)
    land_bytes(x, b"d", b"f", b"content")
    s3.put_object(Bucket=bucket, Key="root/d/sub/implied", Body=b"i")
    with pytest.raises(base.NotEmpty):
        x.rmdir(b"", b"d")
    x.rename(b"", b"d", b"", b"e")
    assert keys(s3, bucket) == ["root/e/", "root/e/f", "root/e/sub/implied"]
    with pytest.raises(base.AlreadyExists):
        x.rename(b"e", b"f", b"e", b"sub", noreplace=True)
    x.unlink(b"e", b"f")
    x.unlink(b"e/sub", b"implied")
    x.rmdir(b"", b"e")
    assert keys(s3, bucket) == []


def test_an_interrupted_directory_rename_can_be_finished(x, s3, bucket):
    for i in range(20):
        s3.put_object(Bucket=bucket, Key=f"root/old/f{i}", Body=b"%d" % i)
    # As if a crash hit midway: some objects copied, some sources already deleted.
    for i in range(10):
        s3.copy_object(Bucket=bucket, Key=f"root/new/f{i}", CopySource={"Bucket": bucket, "Key": f"root/old/f{i}"})
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"root/old/f{i}"} for i in range(5)]})
    x.finish_rename(b"old", b"new")
    assert keys(s3, bucket) == sorted(f"root/new/f{i}" for i in range(20))
    assert s3.get_object(Bucket=bucket, Key="root/new/f17")["Body"].read() == b"17"


def test_names_s3_cannot_hold_are_refused_before_any_upload(x, s3, bucket):
    with pytest.raises(base.IllegalName) as raised:
        x.mkdir(b"", b"caf\xe9", 0o755, 0, 0)
    assert errno_for(raised.value) == errno.EILSEQ
    deep = b"/".join([b"d" * 250] * 5)
    with pytest.raises(base.NameTooLong):
        x.create_file(deep, b"f", 0o644, 0, 0)
    with pytest.raises(base.NotPermitted) as raised:
        x.link(b"a", b"", b"b")
    assert errno_for(raised.value) == errno.EPERM
    assert keys(s3, bucket) == []


def test_reads_are_ranged_cached_and_survive_a_restart(s3_endpoint, bucket, s3, tmp_path, fault_proxy):
    data = os.urandom(5 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="root/f", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="root/f")["ETag"].strip('"')
    ex = make_executor(fault_proxy.url, bucket, tmp_path)
    try:
        reader = ex.reader(b"f", size=len(data), etag=etag, cache_key=f"9.{etag}")
        assert reader.read(3 * MiB + 5, 1000) == data[3 * MiB + 5:3 * MiB + 1005]  # one ranged GET
        assert fault_proxy.counts["GET"] == 1
        got = b"".join(reader.read(off, 128 * 1024) for off in range(0, len(data), 128 * 1024))
        assert got == data
        reader.close()
    finally:
        ex.close()
    gets = fault_proxy.counts["GET"]
    assert gets <= 6 and fault_proxy.bytes_out == len(data)  # six 1 MiB chunks, each fetched once
    ex = make_executor(fault_proxy.url, bucket, tmp_path)  # a new process finds the cache on disk
    try:
        reader = ex.reader(b"f", size=len(data), etag=etag, cache_key=f"9.{etag}")
        assert reader.read(0, len(data)) == data
        assert fault_proxy.counts["GET"] == gets
    finally:
        ex.close()


def test_a_sequential_read_takes_longer_gets_as_it_goes_and_fetches_each_byte_once(s3_endpoint, bucket, s3,
                                                                                      tmp_path, fault_proxy):
    data = os.urandom(32 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="root/big", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="root/big")["ETag"].strip('"')
    ex = make_executor(fault_proxy.url, bucket, tmp_path, readahead=8)  # runs of up to 4 chunks
    try:
        reader = ex.reader(b"big", size=len(data), etag=etag, cache_key=None)
        got = b"".join(reader.read(off, 128 * 1024) for off in range(0, len(data), 128 * 1024))
        reader.close()
    finally:
        ex.close()
    assert got == data
    # 33 chunks of 1 MiB: one GET each before; runs of 1, 2, 4, 4, ... now
    assert fault_proxy.counts["GET"] <= 12 and fault_proxy.bytes_out == len(data)


def test_a_read_ahead_cut_midway_is_fetched_again_by_the_reader(tmp_path):
    """A fake fetch, on purpose: a GET whose body breaks off after its first chunk is a fault
    the loopback endpoint cannot produce on demand."""
    chunk, data = 1000, os.urandom(20_000)
    ranges = []

    def fetch(start, end):
        ranges.append((start, end))
        for offset in range(start, end + 1, chunk):
            if end - start + 1 > chunk and offset > start:
                raise base.RetriesExhausted("connection reset")
            yield data[offset:min(offset + chunk, end + 1)]

    pool = ThreadPoolExecutor(4)
    reader = Reader(fetch, len(data), None, "", pool, chunk, readahead=4)
    try:
        got = b"".join(reader.read(off, 300) for off in range(0, len(data), 300))
    finally:
        reader.close()
        pool.shutdown()
    assert got == data
    cut = [(start, end) for start, end in ranges if end - start + 1 > chunk]
    assert cut  # runs were asked for, and each broke off after its first chunk...
    for start, _end in cut:  # ...so the reader asked for the next chunk on its own
        assert (start + chunk, start + 2 * chunk - 1) in ranges


def test_read_cache_evicts_least_recently_used(tmp_path):
    cache = ChunkCache(tmp_path / "c", limit=3000)
    for i in range(3):
        cache.put("k", i, bytes([i]) * 1000)
    assert cache.get("k", 0) is not None  # 0 is now the most recently used
    cache.put("k", 3, b"3" * 1000)
    assert cache.get("k", 1) is None and cache.get("k", 0) is not None
    assert cache.used <= 3000 and len(os.listdir(tmp_path / "c")) == 3


def test_throttling_is_retried_and_a_final_failure_is_eio(s3_endpoint, bucket, s3, tmp_path, fault_proxy):
    ex = make_executor(fault_proxy.url, bucket, tmp_path, max_attempts=10)
    try:
        fault_proxy.fail_rate = 0.3
        for i in range(20):
            ex.create_file(b"", b"f%d" % i, 0o644, 0, 0)
        assert fault_proxy.failed > 0
        assert len(keys(s3, bucket)) == 20
    finally:
        ex.close()
    ex = make_executor(fault_proxy.url, bucket, tmp_path, max_attempts=2)
    try:
        fault_proxy.fail_rate = 1.0
        with pytest.raises(base.RetriesExhausted) as raised:
            ex.create_file(b"", b"never", 0o644, 0, 0)
        assert errno_for(raised.value) == errno.EIO
    finally:
        fault_proxy.fail_rate = 0.0
        ex.close()
    assert "root/never" not in keys(s3, bucket)


# == through the mount =====================================================================
def test_write_and_read_a_small_file(s3_tracked, s3):
    t = s3_tracked
    (t.path / "dir").mkdir(mode=0o750)
    (t.path / "dir" / "hello.txt").write_bytes(b"hello s3")
    os.chmod(t.path / "dir" / "hello.txt", 0o600)
    assert (t.path / "dir" / "hello.txt").read_bytes() == b"hello s3"
    wait_uploaded(t)
    obj = s3.get_object(Bucket=t.bucket, Key="data/dir/hello.txt")
    assert obj["Body"].read() == b"hello s3"
    assert int(obj["Metadata"]["mode"]) == stat.S_IFREG | 0o600
    assert obj["Metadata"]["uid"] == str(os.getuid())
    node = t.node("dir/hello.txt", "s3")
    assert node["checksum"] == hashlib.md5(b"hello s3").hexdigest() == obj["ETag"].strip('"')
    rows = [j for j in t.journal() if j["node_id"] == node["id"]]
    # written back (D34): the write recorded at close as pending, the upload its own command;
    # chmod does not wait for it (D39): recorded before the landing (which applies the mode) or
    # after it, as the upload thread was quicker; either way the object above has the mode
    commands = [j["command"] for j in rows]
    assert commands in (["create", "write", "setattr", "upload"], ["create", "write", "upload", "setattr"])
    assert rows[1]["args"]["upload"] == "pending"
    assert rows[commands.index("upload")]["actor"] == "writeback"
    if commands[2] == "setattr":
        assert rows[2]["args"]["upload"] == "pending"
    assert os.statvfs(t.path).f_bavail > 0  # S3 has no capacity: a large constant, as s3fs reports


def test_multipart_sized_write_then_ranged_and_cached_reads(tmp_path, env, db, s3_endpoint, bucket, s3,
                                                            fault_proxy):
    env["FILESTORE_INLINE_LOOPS"] = "0"  # no list audits: every GET counted below is a read
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket)
    try:
        data = os.urandom(13 * MiB + 7)
        with open(t.path / "big.bin", "wb") as f:
            for off in range(0, len(data), MiB):
                f.write(data[off:off + MiB])
        wait_uploaded(t)
        head = s3.head_object(Bucket=t.bucket, Key="data/big.bin")
        assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")
        assert t.node("big.bin", "s3")["checksum"] == head["ETag"].strip('"')
        t.restart()  # the kernel's page cache and the writer's spool copy are gone
        before = fault_proxy.counts["GET"]
        with open(t.path / "big.bin", "rb") as f:
            f.seek(9 * MiB + 3)
            assert f.read(4096) == data[9 * MiB + 3:9 * MiB + 3 + 4096]
            f.seek(0)
            assert f.read() == data
        first = fault_proxy.counts["GET"] - before
        assert 0 < first <= 15  # 1 MiB chunks, each fetched once
        t.restart()
        before = fault_proxy.counts["GET"]
        assert (t.path / "big.bin").read_bytes() == data
        assert fault_proxy.counts["GET"] == before  # the on-disk cache answered
        node = t.node("big.bin", "s3")
        assert any(n.startswith(f"{node['id']}.{node['checksum']}.") for n in os.listdir(t.cache))
    finally:
        stop_and_check(t, s3)


def test_append_and_overwrite_change_what_is_read(s3_tracked, s3):
    t = s3_tracked
    f = t.path / "log.txt"
    f.write_bytes(b"first\n")
    t.restart()
    assert f.read_bytes() == b"first\n"  # cached now
    since = t.last_journal_id()
    with open(f, "ab") as out:
        out.write(b"second\n")
    assert f.read_bytes() == b"first\nsecond\n"  # before it is uploaded: from the spool file
    wait_uploaded(t)
    assert [j["command"] for j in t.journal(since)] == ["write", "upload"]
    t.restart()
    assert f.read_bytes() == b"first\nsecond\n"  # a new ETag: the old cached chunks are not used
    with open(f, "r+b") as out:
        out.seek(0)
        out.write(b"FIRST")
    wait_uploaded(t)
    assert s3.get_object(Bucket=t.bucket, Key="data/log.txt")["Body"].read() == b"FIRST\nsecond\n"
    os.truncate(f, 3)
    assert s3.get_object(Bucket=t.bucket, Key="data/log.txt")["Body"].read() == b"FIR"
    with open(f, "wb") as out:
        out.write(b"new")
    assert f.read_bytes() == b"new"


def test_import_then_rename_a_directory_of_1000_objects(tmp_path, env, db, s3_endpoint, bucket, s3):
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"data/tree/sub{i % 10}/f{i:04d}",
                                              Body=b"%d" % i), range(1000)))
    s3.put_object(Bucket=bucket, Key="data/tree/", Body=b"", Metadata={"mode": str(stat.S_IFDIR | 0o700)})
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        kind, root, options = db.execute("SELECT kind, root, options FROM filestore.backend_mounts"
                                         " WHERE name = 's3'").fetchone()
        assert (kind, root, options["endpoint_url"]) == ("s3", f"s3://{bucket}/data", s3_endpoint)
        added = [j for j in t.journal() if j["command"] == "backend.add"]
        assert len(added) == 1 and added[0]["result"]["imported_entries"] == 1000
        assert len(list((t.path / "tree").rglob("f*"))) == 1000  # imported at backend add
        assert stat.S_IMODE((t.path / "tree").stat().st_mode) == 0o700
        since = t.last_journal_id()
        os.rename(t.path / "tree", t.path / "moved")
        assert [j["command"] for j in t.journal(since)] == ["rename"]
        assert keys(s3, bucket, "data/tree") == []
        assert len(keys(s3, bucket, "data/moved/")) == 1001
        assert (t.path / "moved" / "sub3" / "f0513").read_bytes() == b"513"
        os.rename(t.path / "moved" / "sub3" / "f0513", t.path / "moved" / "renamed")
        assert s3.get_object(Bucket=bucket, Key="data/moved/renamed")["Body"].read() == b"513"
        subprocess.run(["rm", "-r", str(t.path / "moved")], check=True)
        # the deletions are sent in batches once rm -r answered (D49)
        wait_until(lambda: keys(s3, bucket, "data/") == [], message="the objects to be deleted")
    finally:
        stop_and_check(t, s3)


def test_the_errnos_of_a_native_filesystem(s3_tracked, s3):
    t = s3_tracked
    p = t.path
    (p / "d").mkdir()
    (p / "d" / "f").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        (p / "d").mkdir()
    with pytest.raises(FileNotFoundError):
        (p / "missing").read_bytes()
    with pytest.raises(OSError) as raised:
        os.rmdir(p / "d")
    assert raised.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as raised:
        os.link(p / "d" / "f", p / "d" / "hard")
    assert raised.value.errno == errno.EPERM
    with pytest.raises(OSError) as raised:
        (p / ("n" * 256)).write_bytes(b"")
    assert raised.value.errno == errno.ENAMETOOLONG
    deep = p
    for _ in range(4):
        deep = deep / ("d" * 250)
        deep.mkdir()
    with pytest.raises(OSError) as raised:  # a key over 1,024 bytes
        (deep / ("f" * 250)).write_bytes(b"x")
    assert raised.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as raised:
        open(os.path.join(os.fsencode(p), b"caf\xe9"), "wb").close()
    assert raised.value.errno == errno.EILSEQ
    with pytest.raises(OSError) as raised:
        os.mkdir(os.path.join(os.fsencode(p), b"caf\xe9"))
    assert raised.value.errno == errno.EILSEQ
    os.symlink("d/f", p / "link")
    assert os.readlink(p / "link") == "d/f" and (p / "link").read_bytes() == b"x"
    os.mkfifo(p / "fifo")
    assert stat.S_ISFIFO(os.lstat(p / "fifo").st_mode)
    os.unlink(p / "d" / "f")
    os.rmdir(p / "d")
    assert not (p / "d").exists()
    assert not [k for k in keys(s3, t.bucket) if "caf" in k]


def test_exdev_and_erofs_beside_other_backends(s3_tracked, s3):
    t = s3_tracked
    local_root = t.tmp / "backend-local"
    local_root.mkdir()
    t.cli("backend", "add", "local", str(local_root))
    s3.put_object(Bucket=t.bucket, Key="ro/existing", Body=b"ro")
    t.cli("backend", "add", "ro", f"s3://{t.bucket}/ro", "--endpoint-url", t.endpoint, "--read-only")
    t.restart()
    mnt = t.mount.mountpoint
    (t.path / "f").write_bytes(b"s3")
    with pytest.raises(OSError) as raised:
        os.rename(t.path / "f", mnt / "local" / "f")
    assert raised.value.errno == errno.EXDEV
    subprocess.run(["mv", str(t.path / "f"), str(mnt / "local" / "f")], check=True)  # copy + delete
    assert (local_root / "f").read_bytes() == b"s3"
    assert (mnt / "ro" / "existing").read_bytes() == b"ro"
    with pytest.raises(OSError) as raised:
        (mnt / "ro" / "new").write_bytes(b"")
    assert raised.value.errno == errno.EROFS
    with pytest.raises(OSError) as raised:
        open(mnt / "ro" / "existing", "r+b")
    assert raised.value.errno == errno.EROFS
    t.mount.stop()
    assert_consistent(t.db, "local", local_root)


def test_cli_refuses_a_missing_bucket_in_one_line(env, s3_endpoint):
    from conftest import run_cli
    from fixtures_s3 import S3_ENV

    env.update(S3_ENV)
    done = run_cli(env, "backend", "add", "x", "s3://no-such-bucket-here/p", "--endpoint-url", s3_endpoint,
                   check=False)
    assert done.returncode == 1 and done.stderr.startswith("filestore: ") and len(done.stderr.splitlines()) == 1
    done = run_cli(env, "backend", "add", "y", "/tmp", "--endpoint-url", s3_endpoint, check=False)
    assert done.returncode == 2


def test_faults_complete_or_fail_cleanly_with_eio(tmp_path, env, db, s3_endpoint, bucket, s3, fault_proxy):
    # Upload at close: a write fails with EIO when S3 does (write-back answers close at once:
    # test_writeback.py)
    env["FILESTORE_S3_WRITEBACK"] = "off"
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 6})
    try:
        p = t.path
        fault_proxy.fail_rate = 0.2
        outcomes = []

        def attempt(fn):
            try:
                fn()
                outcomes.append("ok")
            except OSError as exc:
                outcomes.append(exc.errno)

        attempt(lambda: (p / "dir").mkdir())
        for i in range(30):
            attempt(lambda i=i: (p / "dir" / f"f{i}").write_bytes(b"%d" % i * 100))
        attempt(lambda: (p / "dir" / "big").write_bytes(os.urandom(7 * MiB)))
        for i in range(0, 30, 3):
            attempt(lambda i=i: os.rename(p / "dir" / f"f{i}", p / "dir" / f"g{i}"))
        attempt(lambda: os.rename(p / "dir", p / "dir2"))
        for i in range(1, 30, 3):
            attempt(lambda i=i: os.unlink(p / "dir2" / f"f{i}"))
        assert fault_proxy.failed > 10
        assert set(outcomes) <= {"ok", errno.EIO, errno.ENOENT}  # ENOENT: an earlier step failed
        assert outcomes.count("ok") >= len(outcomes) * 0.8

        fault_proxy.fail_rate = 1.0  # the endpoint is down: every command fails, nothing changes
        since = t.last_journal_id()
        with pytest.raises(OSError) as raised:
            (p / "new-file").write_bytes(b"never")
        assert raised.value.errno == errno.EIO
        with pytest.raises(OSError) as raised:
            (p / "new-dir").mkdir()
        assert raised.value.errno == errno.EIO
        assert not (p / "new-file").exists() and not (p / "new-dir").exists()
        failed = [j for j in t.journal(since) if j["status"] == "failed"]
        assert {j["command"] for j in failed} == {"create", "mkdir"} and {j["errno"] for j in failed} == {errno.EIO}
    finally:
        fault_proxy.fail_rate = 0.0
        stop_and_check(t, s3)


def test_a_directory_rename_cut_off_midway_is_finished_when_s3_answers(tmp_path, env, db, s3_endpoint, bucket,
                                                                     s3, fault_proxy):
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 2})
    try:
        (t.path / "src").mkdir()
        for i in range(30):
            (t.path / "src" / f"f{i}").write_bytes(b"%d" % i)
        wait_uploaded(t)  # the objects to move are in S3
        # Every object gets copied, then the batch deletes fail: the rename can only go forward.
        fault_proxy.fail_when = lambda method, path: method == "POST" and "delete" in path
        with pytest.raises(OSError) as raised:
            os.rename(t.path / "src", t.path / "dst")
        assert raised.value.errno == errno.EIO
        assert len(keys(s3, bucket, "data/dst/")) == 31 and len(keys(s3, bucket, "data/src/")) == 31
        fault_proxy.fail_when = None
        (t.path / "next").mkdir()  # the next command first finishes and adopts the cut-off rename
        assert keys(s3, bucket, "data/src/") == []
        assert t.node("dst/f7", "s3") is not None and t.node("src", "s3") is None
        # The kernel may keep its negative entry for `dst` for the entry timeout (nothing tells it).
        wait_until(lambda: (t.path / "dst" / "f7").exists(), message="dst to appear in the mount")
        assert (t.path / "dst" / "f7").read_bytes() == b"7"
        assert [j["command"] for j in t.journal() if j["command"] in ("rename", "recover")] == ["recover"]
    finally:
        stop_and_check(t, s3)


def test_a_crash_midway_through_a_directory_rename_is_finished_at_restart(tmp_path, env, db, s3_endpoint, bucket,
                                                                        s3, fault_proxy):
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 1})
    try:
        (t.path / "src").mkdir()
        for i in range(30):
            (t.path / "src" / f"f{i}").write_bytes(b"%d" % i)
        wait_uploaded(t)  # the objects to move are in S3
        fault_proxy.hold_when = lambda method, path: method == "POST" and "delete" in path
        mover = subprocess.Popen(["mv", str(t.path / "src"), str(t.path / "dst")], stderr=subprocess.DEVNULL)
        deadline = __import__("time").monotonic() + 60
        while fault_proxy.held == 0:  # all copies made, the deletes under way: crash now
            assert __import__("time").monotonic() < deadline, "the rename never reached its deletes"
            __import__("time").sleep(0.05)
        t.mount.kill()
        mover.wait(30)
        fault_proxy.hold_when = None
        fault_proxy.release()
        assert len(keys(s3, bucket, "data/src/")) == 31  # both trees: cut off between the phases
        t.mount.start()  # recovery finishes the rename from its intent
        assert keys(s3, bucket, "data/src/") == [] and len(keys(s3, bucket, "data/dst/")) == 31
        assert sorted(os.listdir(t.path)) == ["dst"]
        assert (t.path / "dst" / "f29").read_bytes() == b"29"
    finally:
        stop_and_check(t, s3)


def test_a_small_change_to_a_large_object_uploads_only_the_changed_parts(x, s3, bucket):
    data = bytearray(os.urandom(16 * MiB))
    st = land_bytes(x, b"", b"big", bytes(data))
    fd = x.stage("2.change", copy_of=b"big", copy_size=st.size, etag=st.checksum)
    try:
        x.prepare("2.change", fd, 6 * MiB, 10)  # fetches part 2 (5-10 MiB) only
        os.pwrite(fd, b"0123456789", 6 * MiB)
        x.prepare("2.change", fd, len(data), 100)
        os.pwrite(fd, b"a" * 100, len(data))
        new = x.land("2.change", b"", b"big", mode=0o640, uid=1000, gid=100, times_ns=None, durable=False)
    finally:
        os.close(fd)
    data[6 * MiB:6 * MiB + 10] = b"0123456789"
    data += b"a" * 100
    assert x.parts_copied == 2  # 0-5 and 10-15 MiB copied server-side; 5-10 and 15-16 uploaded
    got = s3.get_object(Bucket=bucket, Key="root/big")
    assert got["Body"].read() == bytes(data) and got["ETag"].strip('"') == new.checksum
    assert keys(s3, bucket) == ["root/big"] and x.staged() == []
    checked = s3.head_object(Bucket=bucket, Key="root/big", ChecksumMode="ENABLED")
    assert checked.get("ChecksumCRC32") and "ChecksumCRC64NVME" not in checked, checked  # copied parts too


def test_truncation_of_a_sparse_spool_drops_the_old_bytes_for_good(x, s3, bucket):
    data = os.urandom(12 * MiB)
    st = land_bytes(x, b"", b"big", data)
    fd = x.stage("3.t", copy_of=b"big", copy_size=st.size, etag=st.checksum)
    try:
        x.prepare_truncate("3.t", fd, 7 * MiB)
        os.ftruncate(fd, 7 * MiB)
        x.prepare("3.t", fd, 11 * MiB, 1)  # beyond the cut: zeros, not the old bytes
        os.pwrite(fd, b"z", 11 * MiB)
        x.land("3.t", b"", b"big", mode=0o640, uid=0, gid=0, times_ns=None, durable=False)
    finally:
        os.close(fd)
    expect = data[:7 * MiB] + bytes(4 * MiB) + b"z"
    assert s3.get_object(Bucket=bucket, Key="root/big")["Body"].read() == expect
    assert x.parts_copied == 1  # 0-5 MiB


def test_appending_to_a_large_object_through_the_mount_sends_only_the_tail(tmp_path, env, db, s3_endpoint, bucket,
                                                                         s3, fault_proxy):
    data = os.urandom(16 * MiB)
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket)
    try:
        (t.path / "log").write_bytes(data)
        t.restart()
        sent = fault_proxy.bytes_in
        with open(t.path / "log", "ab") as f:
            f.write(b"appended")
        assert fault_proxy.bytes_in - sent < 2 * MiB  # the last 1 MiB part and the appended bytes
        assert s3.get_object(Bucket=bucket, Key="data/log")["Body"].read() == data + b"appended"
        assert (t.path / "log").read_bytes() == data + b"appended"
        with open(t.path / "log", "r+b") as f:  # a page write in the middle, read back through the handle
            f.seek(7 * MiB)
            f.write(b"PAGE")
            f.seek(7 * MiB - 2)
            assert f.read(8) == data[7 * MiB - 2:7 * MiB] + b"PAGE" + data[7 * MiB + 4:7 * MiB + 6]
        expect = data[:7 * MiB] + b"PAGE" + data[7 * MiB + 4:] + b"appended"
        assert s3.get_object(Bucket=bucket, Key="data/log")["Body"].read() == expect
    finally:
        stop_and_check(t, s3)


def test_a_failed_read_is_eio_and_the_next_read_tries_again(s3_endpoint, bucket, s3, tmp_path, fault_proxy):
    data = os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="root/f", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="root/f")["ETag"].strip('"')
    ex = make_executor(fault_proxy.url, bucket, tmp_path, max_attempts=1)
    try:
        reader = ex.reader(b"f", size=len(data), etag=etag, cache_key=None)
        fault_proxy.fail_rate = 1.0
        with pytest.raises(base.RetriesExhausted):
            reader.read(0, 4096)
        fault_proxy.fail_rate = 0.0
        assert reader.read(0, 4096) == data[:4096]
        s3.put_object(Bucket=bucket, Key="root/f", Body=b"changed behind the mount's back")
        with pytest.raises(base.ExecutorError):  # If-Match on the recorded ETag: no mixed versions
            reader.read(2 * MiB, 10)
    finally:
        fault_proxy.fail_rate = 0.0
        ex.close()


def test_backends_declared_in_a_file_can_be_s3(env, s3_endpoint, bucket, s3, tmp_path):
    from conftest import run_cli
    from fixtures_s3 import S3_ENV

    s3.put_object(Bucket=bucket, Key="declared/a.txt", Body=b"a")
    config = tmp_path / "backends.yaml"
    config.write_text(f"- {{name: declared, path: 's3://{bucket}/declared', endpoint_url: '{s3_endpoint}'}}\n")
    env.update(S3_ENV, FILESTORE_BACKENDS_PATH=str(config))
    listed = json.loads(run_cli(env, "backend", "list", "--json").stdout)
    assert [(b["name"], b["kind"], b["root"]) for b in listed] == [("declared", "s3", f"s3://{bucket}/declared")]
    done = run_cli(env, "history", "declared:/a.txt", "--json")
    assert json.loads(done.stdout)  # the imported object is a node with a history


def test_an_import_cut_off_midway_resumes_where_it_stopped(env, db, s3_endpoint, bucket, s3, tmp_path, fault_proxy):
    from conftest import run_cli
    from fixtures_s3 import S3_ENV

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"data/tree/sub{i % 10}/f{i:03d}", Body=b"x"),
                      range(300)))
    s3.put_object(Bucket=bucket, Key="data/top.txt", Body=b"top")
    config = tmp_path / "backends.yaml"
    config.write_text(f"- {{name: s3, path: 's3://{bucket}/data', endpoint_url: '{fault_proxy.url}', max_attempts: 1}}\n")
    # Batches of 5 entries: committed as it goes, before the cut (a batch is ~2,000 entries by default)
    env.update(S3_ENV, FILESTORE_BACKENDS_PATH=str(config), FILESTORE_IMPORT_BATCH="5")
    fault_proxy.fail_when = lambda method, path: method == "GET" and "prefix=data%2Ftree%2Fsub5%2F" in path
    done = run_cli(env, "backend", "list", check=False)
    assert done.returncode == 1 and "run the same command to resume" in done.stderr
    options, = db.execute("SELECT options FROM filestore.backend_mounts WHERE name = 's3'").fetchone()
    assert len(options["import"]["pending"]) > 0
    kept = db.execute("SELECT count(*) FROM filestore.nodes").fetchone()[0]
    # the root, top.txt, tree and its 10 directories at least were committed before the cut, and
    # none of sub5's files (its listing is what failed)
    assert 13 <= kept < 1 + 2 + 10 + 300
    assert not db.execute("SELECT 1 FROM filestore.entries e JOIN filestore.entries p ON p.node_id = e.parent_id"
                          " WHERE p.name = 'sub5'::bytea").fetchall()
    assert not [j for j in db.execute("SELECT command FROM filestore.journal_entries").fetchall()]
    fault_proxy.fail_when = None
    run_cli(env, "backend", "list")  # the declared backend again: the import resumes
    assert db.execute("SELECT count(*) FROM filestore.nodes").fetchone()[0] == 1 + 2 + 10 + 300
    options, = db.execute("SELECT options FROM filestore.backend_mounts WHERE name = 's3'").fetchone()
    assert "import" not in options
    journal = db.execute("SELECT command, result FROM filestore.journal_entries ORDER BY id").fetchall()
    # one import, then the imported tree's rollups built set-based
    assert [c for c, _ in journal] == ["backend.add", "rollups.recalculate"]
    dirs = db.execute("SELECT count(*) FROM filestore.nodes WHERE kind = 'dir'").fetchone()[0]
    assert journal[0][1]["imported_entries"] == 301 and journal[1][1]["directories"] == dirs
    assert_bucket_consistent(db, "s3", s3, bucket, "data/")


def test_truncating_a_large_object_keeps_what_stays_server_side(x, s3, bucket):
    data = os.urandom(21 * MiB)
    land_bytes(x, b"", b"big", data)
    st = x.set_attrs(b"big", size=17 * MiB)
    assert x.parts_copied == 3  # 0-15 MiB copied; 15-17 MiB fetched and uploaded
    got = s3.get_object(Bucket=bucket, Key="root/big")
    assert got["Body"].read() == data[:17 * MiB] and got["ETag"].strip('"') == st.checksum
    x.set_attrs(b"big", size=100)
    assert s3.get_object(Bucket=bucket, Key="root/big")["Body"].read() == data[:100]


def test_changes_made_directly_in_the_bucket_are_audited_and_reconciled(tmp_path, env, db, s3_endpoint, bucket,
                                                                       s3):
    """S3 sends no notifications: the mount's loops list the prefix every
    FILESTORE_S3_AUDIT_SECONDS and reconcile what differs (drift, then reconcile rows)."""
    env["FILESTORE_S3_AUDIT_SECONDS"] = "1"
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        (t.path / "kept.txt").write_bytes(b"through the mount")
        s3.put_object(Bucket=bucket, Key="data/outside.txt", Body=b"put by another tool")
        s3.put_object(Bucket=bucket, Key="data/sub/deep.txt", Body=b"deep")
        wait_until(lambda: "outside.txt" in os.listdir(t.path), timeout=20, message="the audit to adopt it")
        assert (t.path / "outside.txt").read_bytes() == b"put by another tool"
        wait_until(lambda: t.node("sub/deep.txt", "s3") is not None, timeout=20, message="a new prefix too")
        s3.delete_object(Bucket=bucket, Key="data/outside.txt")
        wait_until(lambda: t.node("outside.txt", "s3") is None, timeout=20, message="the deletion")
        commands = [(r["command"], r["actor"]) for r in t.journal() if r["path"] in ("outside.txt", "sub/deep.txt")]
        assert ("drift", "audit") in commands and ("reconcile", "reconciler") in commands
        assert not [r for r in t.journal() if r["command"] == "drift" and r["path"] == "kept.txt"]  # own write
        assert t.cli("rollups", "verify", "s3:/", check=False).returncode == 0
    finally:
        stop_and_check(t, s3)


def test_a_chmod_or_chown_to_what_a_directory_has_sends_nothing_a_real_change_rewrites_its_marker(
        s3_proxied, s3, fault_proxy):
    """`tar -x` ends every directory with a chmod and a chown to the values it has: S3 metadata
    holds no ctime, so those are journaled and nothing is sent; a change of value still
    rewrites the directory's marker."""
    t = s3_proxied
    (t.path / "d").mkdir(0o755)
    st = os.stat(t.path / "d")
    marker = s3.head_object(Bucket=t.bucket, Key="data/d/")["Metadata"]
    t.settle()
    puts = fault_proxy.counts["PUT"]  # a marker is rewritten by a PUT (other requests: the health probe)
    os.chmod(t.path / "d", 0o755)
    os.chown(t.path / "d", st.st_uid, st.st_gid)
    t.settle()
    assert fault_proxy.counts["PUT"] == puts
    same = [j for j in t.journal() if j["command"] == "setattr" and j["path"] == "d"]
    assert [j["args"].get("object") for j in same] == ["unchanged", "unchanged"]
    assert os.stat(t.path / "d").st_ctime_ns >= st.st_ctime_ns
    os.chmod(t.path / "d", 0o700)
    os.utime(t.path / "d", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert fault_proxy.counts["PUT"] == puts + 2
    after = s3.head_object(Bucket=t.bucket, Key="data/d/")["Metadata"]
    assert int(after["mode"]) & 0o7777 == 0o700 and after["mtime"] != marker["mtime"]
    assert os.stat(t.path / "d").st_mode & 0o7777 == 0o700
