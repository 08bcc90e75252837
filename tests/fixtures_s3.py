"""S3 fixtures: a real S3 endpoint on loopback (moto's server mode, a real HTTP S3 API), a fresh
bucket per test, a mount with an S3 backend, and the bucket-vs-database invariant check."""
from __future__ import annotations

import collections
import http.client
import http.server
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import Mount, Tracked, db_tree, run_cli, wait_until

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's server on a free loopback port, for the whole session, in a process of its own:
    in the test process it would share the GIL with the tests, and a test whose thread is held
    in the kernel with the GIL (a write through a shared mapping of a file in the mount, which
    waits for the mount, which waits for S3) would stop it."""
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-c", MOTO_SERVER, str(port)], stdout=log, stderr=log,
                              start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's server did not start ({server.returncode})") from None
            time.sleep(0.05)
    yield url
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


MOTO_SERVER = """
import sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
threading.Event().wait()
"""


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3_endpoint):
    """A new, empty bucket for one test."""
    name = f"b-{uuid.uuid4().hex[:16]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_endpoint):
    return s3_client(s3_endpoint)


class S3Tracked(Tracked):
    """A mounted filestore with one S3 backend named `s3` (bucket `bucket`, prefix `data/`)."""
    bucket: str = ""
    endpoint: str = ""

    @property
    def path(self) -> Path:
        return self.mount.mountpoint / "s3"

    @property
    def spool(self) -> Path:
        return self.tmp / "home" / "s3" / "s3" / "spool"

    @property
    def pending(self) -> Path:
        return self.tmp / "home" / "s3" / "s3" / "pending"

    @property
    def cache(self) -> Path:
        return self.tmp / "home" / "s3" / "s3" / "cache"


# Small parts so that multipart uploads and copies are exercised by files of a few MiB.
TEST_OPTIONS = {"part_size": 5 << 20, "multipart_threshold": 6 << 20, "chunk_size": 1 << 20}


def start_s3_mount(tmp_path: Path, env: dict, db, endpoint: str, bucket: str, *, options: dict | None = None,
                   prefix: str = "data", read_only: bool = False, xattrs: bool = False) -> S3Tracked:
    """Register `s3://bucket/prefix` as backend `s3` (importing what is there) and mount it."""
    env.update(S3_ENV)
    run_cli(env, "backend", "add", "s3", f"s3://{bucket}/{prefix}", "--endpoint-url", endpoint,
            *(["--read-only"] if read_only else []), *(["--xattrs"] if xattrs else []))
    opts = {**TEST_OPTIONS, **(options or {})}
    db.execute("UPDATE filestore.backend_mounts SET options = options || %s::jsonb WHERE name = 's3'",
               (json.dumps(opts),))
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "test-mount.log")
    mount.start()
    t = S3Tracked(env, db, tmp_path, mount, Path("/nonexistent"), {})
    t.bucket, t.endpoint = bucket, endpoint
    return t


def pending_uploads(db) -> int:
    return db.execute("SELECT count(*) FROM filestore.uploads").fetchone()[0]


def wait_uploaded(t: S3Tracked, timeout: float = 60) -> None:
    """Write-back (D34): wait until every upload recorded at close has landed (the closes'
    records committed first: an upload starts once its write command is in the journal), and
    every deletion queued by an unlink or rmdir has been sent (their rows are uploads rows, D49)."""
    t.settle()
    wait_until(lambda: pending_uploads(t.db) == 0, timeout=timeout, message="pending uploads to land")


def stop_and_check(t: S3Tracked, s3, prefix: str = "data/") -> None:
    if t.mount.process is not None:
        t.mount.stop()
    assert_bucket_consistent(t.db, "s3", s3, t.bucket, prefix)
    left = os.listdir(t.spool) if t.spool.exists() else []
    assert not left, f"spool files left behind: {left}"
    # an unmount with S3 answering drains the write-back uploads: nothing left to resume
    assert pending_uploads(t.db) == 0
    kept = os.listdir(t.pending) if t.pending.exists() else []
    assert not kept, f"kept spool files left behind: {kept}"


@pytest.fixture
def s3_tracked(tmp_path, env, db, s3_endpoint, bucket, s3):
    t = start_s3_mount(tmp_path, env, db, s3_endpoint, bucket)
    try:
        yield t
    finally:
        stop_and_check(t, s3)


class FaultProxy:
    """A fake, on purpose: a thin HTTP proxy in front of the real S3 endpoint that answers a
    share of requests with 500 InternalError, 503 SlowDown or 503 ServiceUnavailable instead of
    forwarding them. The real endpoint cannot fail on demand; AWS does so under load.
    `fail_rate` can be changed while it runs; `counts` tallies what was forwarded by method, `bytes_in` the bodies sent, `bytes_out` the bodies
    answered to GETs.
    `fail_when(method, path)` fails the requests it picks, every time; `hold_when(method, path)`
    holds them (as a request stuck on the network would be) until `release()`, then fails them;
    `mangle_when(method, path)` flips a bit in the middle of the bodies it picks (corrupted on the
    way); `strip_checksums` drops the x-amz-checksum-* headers from answers (a store that knows
    no checksums)."""

    ERRORS = [(500, "InternalError"), (503, "SlowDown"), (503, "ServiceUnavailable")]

    def __init__(self, upstream: str, seed: int = 7):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fail_rate = 0.0
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.failed = 0
        self.bytes_in = 0  # request bodies forwarded: what clients uploaded
        self.bytes_out = 0  # GET answers' bodies: what clients downloaded
        self.fail_when = None
        self.hold_when = None
        self.mangle_when = None
        self.strip_checksums = False
        self.held = 0
        self._released = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                if body and proxy.mangle_when and proxy.mangle_when(self.command, self.path):
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 1]) + body[middle + 1:]
                held = bool(proxy.hold_when and proxy.hold_when(self.command, self.path))
                if held:
                    with proxy.lock:
                        proxy.held += 1
                    proxy._released.wait(120)
                with proxy.lock:
                    fail = held or proxy.random.random() < proxy.fail_rate or bool(
                        proxy.fail_when and proxy.fail_when(self.command, self.path))
                    if fail:
                        proxy.failed += 1
                    else:
                        proxy.counts[self.command] += 1
                        proxy.bytes_in += len(body)
                if fail:
                    status, code = proxy.random.choice(proxy.ERRORS)
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.bytes_out += len(data)
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() in ("transfer-encoding", "content-length", "connection", "server", "date") or \
                            (proxy.strip_checksums and key.lower().startswith("x-amz-checksum-")):
                        continue
                    self.send_header(key, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint)
    yield proxy
    proxy.close()


def bucket_tree(s3, bucket: str, prefix: str) -> dict[bytes, tuple]:
    """The tree the bucket holds under `prefix`, as (kind, size, mode, symlink target) per path;
    implied prefixes are directories."""
    out: dict[bytes, tuple] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel:
                continue
            parts = rel.rstrip("/").split("/")
            for i in range(1, len(parts)):
                out.setdefault("/".join(parts[:i]).encode(), ("dir", 0, 0o755, None))
            head = s3.head_object(Bucket=bucket, Key=obj["Key"])
            raw = int(head["Metadata"].get("mode", "0") or 0)
            if rel.endswith("/"):
                out[rel.rstrip("/").encode()] = ("dir", 0, stat.S_IMODE(raw) or 0o755, None)
                continue
            kind = {stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
                    stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev"}.get(stat.S_IFMT(raw), "file")
            target = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read() if kind == "symlink" else None
            out[rel.encode()] = (kind, obj["Size"] if kind == "file" else 0,
                                 None if kind == "symlink" else stat.S_IMODE(raw) or 0o644, target)
    return out


def assert_bucket_consistent(db, backend: str, s3, bucket: str, prefix: str, *, modes: bool = True) -> None:
    """The bucket and the database hold the same tree, and no multipart upload is left open."""
    in_bucket, recorded = bucket_tree(s3, bucket, prefix), db_tree(db, backend)
    if not modes:  # implied directories have no mode of their own
        in_bucket = {p: v[:2] + v[3:] for p, v in in_bucket.items()}
        recorded = {p: v[:2] + v[3:] for p, v in recorded.items()}
    only_bucket = sorted(set(in_bucket) - set(recorded))[:10]
    only_db = sorted(set(recorded) - set(in_bucket))[:10]
    assert not only_bucket and not only_db, f"{backend}: in bucket only {only_bucket}; in database only {only_db}"
    differing = [(p, in_bucket[p], recorded[p]) for p in in_bucket if in_bucket[p] != recorded[p]][:10]
    assert not differing, f"{backend}: bucket vs database differ: {differing}"
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert not uploads, f"multipart uploads left open: {[u['Key'] for u in uploads]}"


@pytest.fixture
def s3_proxied(tmp_path, env, db, s3_endpoint, bucket, s3, fault_proxy):
    """A mount over the bucket through the fault proxy, one attempt per request and no inline
    audits: the requests the proxy counts are the mount's own."""
    env["FILESTORE_INLINE_LOOPS"] = "0"
    t = start_s3_mount(tmp_path, env, db, fault_proxy.url, bucket, options={"max_attempts": 1})
    try:
        yield t
    finally:
        fault_proxy.fail_when = None
        stop_and_check(t, s3)
