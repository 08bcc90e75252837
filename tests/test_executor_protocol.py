"""Both executors satisfy the Executor protocol (executors/base.py), with their capability flags,
and answer what they cannot do with a domain error that core turns into an errno in one place."""
from __future__ import annotations

import errno

import pytest

from core.errors import FsError, errno_for, translated
from executors.base import Executor, ExecutorError, NotFound, Unsupported, WriteBackStore
from executors.local import LocalExecutor

FLAGS = ("in_place", "owns_files", "moves_objects_one_by_one", "writes_back")


@pytest.fixture
def local(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    executor = LocalExecutor(root)
    yield executor
    executor.close()


@pytest.fixture
def s3_executor(tmp_path, s3_endpoint, bucket):
    from executors.s3 import S3Executor

    executor = S3Executor(f"s3://{bucket}/root", spool_dir=tmp_path / "spool", cache_dir=tmp_path / "cache",
                          endpoint_url=s3_endpoint, region="us-east-1")
    yield executor
    executor.close()


def _methods(protocol) -> list[str]:
    return sorted(name for name in vars(protocol) if not name.startswith("_") and callable(getattr(protocol, name)))


@pytest.mark.parametrize("which", ["local", "s3_executor"])
def test_each_executor_has_every_method_and_flag(which, request):
    executor = request.getfixturevalue(which)
    assert isinstance(executor, Executor)
    missing = [name for name in _methods(Executor) if not callable(getattr(executor, name, None))]
    assert not missing, f"{type(executor).__name__} lacks {missing}"
    for flag in FLAGS:
        assert isinstance(getattr(executor, flag), bool), flag
    assert isinstance(executor, WriteBackStore) == executor.writes_back


def test_the_flags_say_what_each_backend_does(local, s3_executor):
    assert (local.in_place, local.moves_objects_one_by_one, local.writes_back) == (True, False, False)
    assert (s3_executor.in_place, s3_executor.owns_files, s3_executor.moves_objects_one_by_one,
            s3_executor.writes_back) == (False, True, True, True)


def test_s3_xattrs_are_a_domain_error_not_an_attribute_error(s3_executor):
    """Core keeps user xattrs of S3 files in the database only: the executor says it cannot
    (Unsupported), it does not lack the method (which answered EIO and left an intent open)."""
    s3_executor.create_file(b"", b"f", 0o644, 0, 0)
    with pytest.raises(Unsupported):
        s3_executor.set_xattr(b"f", b"user.a", b"1")
    with pytest.raises(Unsupported):
        s3_executor.remove_xattr(b"f", b"user.a")
    assert s3_executor.xattrs(b"f") == {}
    assert s3_executor.stat_node(b"f").kind == "file"


def test_executor_errors_become_errnos_in_one_place(local):
    with pytest.raises(FsError) as raised, translated():
        local.stat(b"absent")
    assert raised.value.errno == errno.ENOENT
    assert errno_for(NotFound("x")) == errno.ENOENT
    assert errno_for(Unsupported("x")) == errno.EOPNOTSUPP
    assert errno_for(ExecutorError("anything else")) == errno.EIO
