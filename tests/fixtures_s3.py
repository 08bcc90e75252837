"""S3 fixtures: a real S3 endpoint on loopback (moto's server mode, a real HTTP S3 API), a fresh
bucket per test, a mount with an S3 backend, and the bucket-vs-database invariant check."""
from __future__ import annotations

import os
import socket
import stat
import uuid
from pathlib import Path

import boto3
import pytest

from conftest import Mount, Tracked, db_tree, run_cli

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


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


@pytest.fixture
def s3_tracked(tmp_path, env, db, s3_endpoint, bucket, s3):
    env.update(S3_ENV)
    run_cli(env, "backend", "add", "s3", f"s3://{bucket}/data", "--endpoint-url", s3_endpoint)
    mount = Mount(env, tmp_path / "mnt", tmp_path / "home" / "logs" / "test-mount.log")
    mount.start()
    t = S3Tracked(env, db, tmp_path, mount, Path("/nonexistent"), {})
    t.bucket, t.endpoint = bucket, s3_endpoint
    try:
        yield t
    finally:
        if mount.process is not None:
            mount.stop()
    assert_bucket_consistent(db, "s3", s3, bucket, "data/")
    spool = tmp_path / "home" / "s3" / "s3" / "spool"
    left = os.listdir(spool) if spool.exists() else []
    assert not left, f"spool files left behind: {left}"


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
