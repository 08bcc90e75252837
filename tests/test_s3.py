"""S3 backends against a real S3 endpoint on loopback (moto server): the executor alone, and
through a real mount, with the bucket and the database compared after every mount test."""
from __future__ import annotations

import errno
import os

import pytest


def test_mount_basic(s3_tracked, s3):
    p = s3_tracked.path
    (p / "dir").mkdir()
    (p / "dir" / "hello.txt").write_bytes(b"hello s3")
    assert (p / "dir" / "hello.txt").read_bytes() == b"hello s3"
    body = s3.get_object(Bucket=s3_tracked.bucket, Key="data/dir/hello.txt")["Body"].read()
    assert body == b"hello s3"
