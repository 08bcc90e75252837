"""Large sparse files through an S3 backend: written, read, renamed, truncated and deleted, with
the mount's memory bounded (multipart parts streamed from the spool file, reads in 8 MiB chunks,
copies server-side). The endpoint is tests/s3disk.py, which keeps objects in (sparse) files: moto
keeps them in memory and reads a whole object for every ranged GET (s3disk.py says why no other
server would do). A 2 GiB file runs with the suite (about 30 s on 2 cores); FILESTORE_TEST_LARGE=1
adds a 10 GiB one (about 160 s; measured figures in docs/architecture.md D39)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import REPO
from fixtures_s3 import free_port, s3_client, start_s3_mount, stop_and_check, wait_uploaded

MiB, GiB = 1 << 20, 1 << 30
SIZES = [2 * GiB] + ([10 * GiB] if os.environ.get("FILESTORE_TEST_LARGE") else [])
# the executor's defaults (not the small parts of fixtures_s3.TEST_OPTIONS)
DEFAULTS = {"part_size": 8 * MiB, "multipart_threshold": 32 * MiB, "chunk_size": 8 * MiB}
MEMORY_BOUND = 768 * MiB  # the mount's peak resident memory, whatever the file's size


@pytest.fixture(scope="module")
def disk_s3(tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("s3disk")
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "s3disk.py"), str(port), str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            s3_client(url).list_buckets()
            break
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


def peak_memory(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("size", SIZES, ids=[f"{s // GiB}GiB" for s in SIZES])
def test_a_large_sparse_file_is_written_read_renamed_truncated_and_deleted(tmp_path, env, db, disk_s3, size):
    s3 = s3_client(disk_s3)
    bucket = f"b-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    env["FILESTORE_INLINE_LOOPS"] = "0"  # no audits listing the bucket meanwhile
    t = start_s3_mount(tmp_path, env, db, disk_s3, bucket, options=DEFAULTS)
    try:
        path, middle = t.path / "big", size // 2 + 12345
        with open(path, "wb") as f:  # sparse: three islands of data in `size` bytes
            f.write(b"head")
            f.seek(middle)
            f.write(b"middle")
            f.seek(size - 4)
            f.write(b"tail")
        wait_uploaded(t, timeout=900)
        assert s3.head_object(Bucket=bucket, Key="data/big")["ContentLength"] == size
        with open(path, "rb") as f:
            fd = f.fileno()
            assert os.pread(fd, 4, 0) == b"head" and os.pread(fd, 4, size - 4) == b"tail"
            assert os.pread(fd, 6, middle) == b"middle"
            window = os.pread(fd, 32 * MiB, middle - 16 * MiB)  # 4 chunks across the middle island
            assert len(window) == 32 * MiB and window.count(0) == 32 * MiB - 6
        os.rename(path, t.path / "moved")  # server-side (a multipart copy above 5 GiB)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["data/moved"]
        os.truncate(t.path / "moved", middle + 3)  # the parts below the cut copied server-side
        assert os.stat(t.path / "moved").st_size == middle + 3
        with open(t.path / "moved", "rb") as f:
            assert os.pread(f.fileno(), 10, middle - 2) == b"\0\0mid"
        with open(t.path / "moved", "r+b") as f:  # grown again through the descriptor
            os.ftruncate(f.fileno(), size)
            os.pwrite(f.fileno(), b"again", size - 5)
        assert os.stat(t.path / "moved").st_size == size
        with open(t.path / "moved", "rb") as f:
            assert os.pread(f.fileno(), 5, size - 5) == b"again"
            assert os.pread(f.fileno(), 8, middle) == b"mid\0\0\0\0\0"
        os.unlink(t.path / "moved")
        assert os.listdir(t.path) == []
        wait_uploaded(t)  # the object's deletion is sent in a batch once the unlink is committed (D49)
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
        peak = peak_memory(t.mount.process.pid)
        assert peak < MEMORY_BOUND, f"the mount's peak memory {peak // MiB} MiB for a {size // GiB} GiB file"
        print(f"\n{size // GiB} GiB: peak resident memory of the mount {peak // MiB} MiB")
    finally:
        stop_and_check(t, s3)
