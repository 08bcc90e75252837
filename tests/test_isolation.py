"""One backend down, the mount stays up (issue 15; docs/architecture.md D40).

A real mount of two local backends and an S3 one. The S3 endpoint is made to go away for real
(a TCP proxy in front of moto stops listening and resets its connections: connection refused,
as when an endpoint is gone), then a local root is renamed away (as an unmounted disk): the
backend that is down answers EIO and `/ready` names it, while a writer keeps working on
another backend the whole time; each comes back without a remount, is watched again (a change
made behind its back afterwards is seen), and nothing it held is taken for deleted. An empty
directory of another file system put where the root was (what an unmounted disk leaves) is not
taken for the backend.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import urllib.parse

import pytest
from conftest import Mount, assert_consistent, errno_of, run_cli, wait_until
from fixtures_s3 import S3_ENV, TEST_OPTIONS, assert_bucket_consistent, pending_uploads
from fixtures_sidecar import http_get


class CuttableProxy:
    """A TCP forwarder to an upstream that can stop listening and reset every connection
    (`cut`), then listen again on the same port (`restore`)."""

    def __init__(self, upstream: str):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        server, self.server = self.server, None
        server.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # RST
            except OSError:
                pass

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def shm_dir(tmp_path):
    """An empty directory on another file system than tmp_path (tmpfs), or None."""
    import shutil
    import tempfile
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        yield None
        return
    path = tempfile.mkdtemp(dir="/dev/shm", prefix="filestore-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ready(db) -> tuple[int, dict]:
    """The mount's /ready. The mount registers its HTTP port once it serves, a moment after its
    mount point appears (CI once asked in between)."""
    query = ("SELECT (info->>'http_port')::int FROM filestore.processes WHERE role = 'mount'"
             " AND stopped_at IS NULL ORDER BY started_at DESC LIMIT 1")
    wait_until(lambda: db.execute(query).fetchone() is not None, timeout=20, message="the mount to register")
    port = db.execute(query).fetchone()[0]
    code, body = http_get(port, "/ready")
    return code, json.loads(body)


class Writer(threading.Thread):
    """Keeps creating, writing and reading files on one backend; records every failure."""

    def __init__(self, base):
        super().__init__(daemon=True)
        self.base, self.done, self.failures, self.count = base, threading.Event(), [], 0

    def run(self) -> None:
        while not self.done.is_set():
            path = self.base / f"w{self.count % 20}.txt"
            try:
                path.write_bytes(b"x" * (self.count % 100))
                assert path.read_bytes() == b"x" * (self.count % 100)
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            self.count += 1
            time.sleep(0.005)


@pytest.mark.log_errors  # the probe logs each backend going away as an ERROR
def test_a_backend_down_answers_eio_alone_and_comes_back_without_a_remount(tmp_path, env, db, s3_endpoint, bucket,
                                                                           s3, shm_dir):
    env.update(S3_ENV, FILESTORE_HTTP_PORT="0", FILESTORE_BACKEND_PROBE_SECONDS="0.2")
    roots = {name: tmp_path / name for name in ("local", "other")}
    for name, root in roots.items():
        root.mkdir()
        run_cli(env, "backend", "add", name, str(root))
    (roots["other"] / "kept.txt").write_bytes(b"kept while away")
    run_cli(env, "backend", "remove", "other")
    run_cli(env, "backend", "add", "other", str(roots["other"]))
    proxy = CuttableProxy(s3_endpoint)
    run_cli(env, "backend", "add", "s3", f"s3://{bucket}/data", "--endpoint-url", proxy.url)
    db.execute("UPDATE filestore.backend_mounts SET options = options || %s::jsonb WHERE name = 's3'",
               (json.dumps({**TEST_OPTIONS, "max_attempts": 2}),))
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "mount.log").start()
    mnt = mount.mountpoint
    writer = Writer(mnt / "local")
    try:
        (mnt / "s3" / "before.txt").write_bytes(b"uploaded before")
        fd = os.open(mnt / "s3" / "before.txt", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        wait_until(lambda: ready(db)[0] == 200, timeout=20, message="ready")
        writer.start()

        # -- the S3 endpoint goes away ---------------------------------------------------
        proxy.cut()
        wait_until(lambda: "backend:s3" in ready(db)[1]["failed"], timeout=20, message="/ready to name s3")
        code, body = ready(db)
        assert code == 503 and body["failed"] == ["backend:s3"], body
        assert errno_of(lambda: (mnt / "s3" / "new.txt").write_bytes(b"n")) == errno.EIO
        assert errno_of(os.mkdir, mnt / "s3" / "dir") == errno.EIO
        assert os.stat(mnt / "s3" / "before.txt").st_size == 15  # what the mount knows, it still says
        assert (mnt / "local" / "during.txt").write_bytes(b"fine") == 4  # the others serve
        count = writer.count
        wait_until(lambda: writer.count > count + 20, timeout=20, message="the writer going on")

        proxy.restore()  # back: no remount
        wait_until(lambda: ready(db)[0] == 200, timeout=20, message="s3 back in /ready")
        try:
            fd = os.open(mnt / "s3" / "after.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AssertionError(f"open {exc}")
        try:
            os.write(fd, b"after the outage")
        except OSError as exc:
            raise AssertionError(f"write {exc}")
        try:
            os.close(fd)
        except OSError as exc:
            raise AssertionError(f"close {exc}")
        assert (mnt / "s3" / "before.txt").read_bytes() == b"uploaded before"

        # -- a local root goes away (an unmounted disk) ----------------------------------
        away = tmp_path / "other-away"
        os.rename(roots["other"], away)
        wait_until(lambda: "backend:other" in ready(db)[1]["failed"], timeout=20, message="/ready to name other")
        assert ready(db)[1]["failed"] == ["backend:other"]
        assert errno_of(lambda: (mnt / "other" / "new.txt").write_bytes(b"n")) == errno.EIO
        assert errno_of(lambda: (mnt / "other" / "kept.txt").read_bytes()) == errno.EIO
        assert not (away / "new.txt").exists()  # nothing written into the directory that went away
        count = writer.count
        wait_until(lambda: writer.count > count + 20, timeout=20, message="the writer going on")
        # An empty directory of another file system where the root was (what an unmounted
        # disk leaves): not taken for the backend, which would make every file look deleted.
        if shm_dir is not None:
            os.symlink(shm_dir, roots["other"])
            wait_until(lambda: "another directory" in ready(db)[1]["checks"]["backend:other"].get("error", ""),
                       timeout=20, message="/ready to say the root is another directory")
            assert errno_of(lambda: (mnt / "other" / "kept.txt").read_bytes()) == errno.EIO
            assert os.listdir(shm_dir) == []
            os.unlink(roots["other"])
        os.rename(away, roots["other"])
        wait_until(lambda: ready(db)[0] == 200, timeout=20, message="other back in /ready")
        assert (mnt / "other" / "kept.txt").read_bytes() == b"kept while away"
        (mnt / "other" / "new.txt").write_bytes(b"after")
        # still watched: a change made behind the mount's back is seen
        (roots["other"] / "behind.txt").write_bytes(b"behind its back")
        wait_until(lambda: "behind.txt" in os.listdir(mnt / "other"), timeout=20, message="the change behind")
        writer.done.set()
        writer.join(30)
        assert writer.failures == [] and writer.count > 40
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        wait_until(lambda: pending_uploads(db) == 0, timeout=60, message="uploads landed")
        # nothing was taken for deleted while it was away
        assert db.execute("SELECT count(*) FROM filestore.nodes WHERE state IN ('MISSING', 'INCONSISTENT')"
                          ).fetchone()[0] == 0
    finally:
        writer.done.set()
        if proxy.server is None:
            proxy.restore()  # (a failed test: let the unmount drain the uploads)
        mount.stop()
        proxy.cut()
    for name, root in roots.items():
        assert_consistent(db, name, root, home=tmp_path / "home")
    assert_bucket_consistent(db, "s3", s3, bucket, "data/")


@pytest.mark.log_errors  # the backend that cannot be opened at start is logged as an ERROR
def test_a_backend_away_at_start_is_named_and_joins_when_it_is_back(tmp_path, env, db):
    env.update(FILESTORE_HTTP_PORT="0", FILESTORE_BACKEND_PROBE_SECONDS="0.2")
    roots = {name: tmp_path / name for name in ("local", "other")}
    for name, root in roots.items():
        root.mkdir()
        (root / "f.txt").write_bytes(name.encode())
        run_cli(env, "backend", "add", name, str(root))
    away = tmp_path / "other-away"
    os.rename(roots["other"], away)
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "mount.log").start()
    try:
        code, body = ready(db)
        assert code == 503 and body["failed"] == ["backend:other"], body
        assert os.listdir(mount.mountpoint) == ["local"]
        assert (mount.mountpoint / "local" / "f.txt").read_bytes() == b"local"
        os.rename(away, roots["other"])
        wait_until(lambda: ready(db)[0] == 200, timeout=20, message="other opened")
        wait_until(lambda: sorted(os.listdir(mount.mountpoint)) == ["local", "other"], timeout=20,
                   message="other in the mount root")
        assert (mount.mountpoint / "other" / "f.txt").read_bytes() == b"other"
        (mount.mountpoint / "other" / "g.txt").write_bytes(b"g")
        # watched since it joined: a change made behind the mount's back is seen
        (roots["other"] / "behind.txt").write_bytes(b"behind its back")
        wait_until(lambda: "behind.txt" in os.listdir(mount.mountpoint / "other"), timeout=20,
                   message="the change behind")
    finally:
        mount.stop()
    for name, root in roots.items():
        assert_consistent(db, name, root, home=tmp_path / "home")


def test_an_s3_endpoint_out_of_reach_fails_at_once_then_is_tried_again(tmp_path, s3_endpoint, bucket):
    """An S3 request that cannot connect marks the endpoint out of reach: the requests that follow
    fail at once with Unavailable (EIO) instead of each running all its retries, which held the
    mount's core lock (every backend waited) until the next probe marked the backend down. A
    moment later requests try again, so a process with no probing loop is not stuck."""
    from executors.base import Unavailable
    from executors.s3 import S3Executor
    proxy = CuttableProxy(s3_endpoint)
    executor = S3Executor(f"s3://{bucket}/root", spool_dir=tmp_path / "spool", cache_dir=None,
                          endpoint_url=proxy.url, **TEST_OPTIONS)
    try:
        executor.mkdir(b"", b"d", 0o755, 0, 0)
        proxy.cut()
        for _ in range(3):  # before: RetriesExhausted, each after every retry of its own
            with pytest.raises(Unavailable):
                executor.stat(b"d")
        proxy.restore()

        def answers() -> bool:
            try:
                return executor.stat(b"d").kind == "dir"
            except Unavailable:
                return False
        wait_until(answers, timeout=10, message="tried again")
    finally:
        proxy.cut()
        executor.close()
