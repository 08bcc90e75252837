"""POSIX conformance by syscall: every scenario runs on a native directory and through the
mount in the same test, and both must record the same results and errnos and leave the same
tree (see tests/fixtures_posix.py for the harness). Errno-only refusals of single calls are
in test_errors.py; this module covers sequences of calls and what they leave behind.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from fixtures_posix import ALICE, Run, meta, renameat2, wait_tick

SCENARIOS: dict[str, dict] = {}


def scenario(group: str, *, xfail: str | None = None, root_only: bool = False):
    """Register a scenario; `root_only` for those that chown, make devices or rely on root
    bypassing permission checks (the others also run as an unprivileged user)."""
    def register(fn):
        SCENARIOS[f"{group}:{fn.__name__}"] = {"fn": fn, "xfail": xfail, "root_only": root_only}
        return fn
    return register


def write(path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode: int = 0o644) -> int:
    fd = os.open(path, flags, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def times(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


# == open flags ==========================================================================
@scenario("open")
def creat_excl(r: Run):
    r.do("create new", write, r.p("lock"), b"", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.do("create existing", write, r.p("lock"), b"", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.symlink("dangling-target", r.p("sym"))
    r.do("excl through a dangling symlink", write, r.p("sym"), b"", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.do("creat through a dangling symlink", write, r.p("sym"), b"x", os.O_WRONLY | os.O_CREAT)
    r.do("target made", read, r.p("dangling-target"), keep=bytes)


@scenario("open")
def trunc(r: Run):
    write(r.p("f"), b"hello world")
    r.do("open O_TRUNC", write, r.p("f"), b"hi", os.O_WRONLY | os.O_TRUNC)
    r.do("content", read, r.p("f"), keep=bytes)
    fd = os.open(r.p("f"), os.O_RDONLY | os.O_TRUNC)  # Linux truncates even for O_RDONLY
    os.close(fd)
    r.note("size after O_RDONLY|O_TRUNC", os.stat(r.p("f")).st_size)


@scenario("open")
def append(r: Run):
    write(r.p("f"), b"abc")
    fd = os.open(r.p("f"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"ghi")  # O_APPEND: every write goes to the end, whatever the offset
    r.note("offset after append", os.lseek(fd, 0, os.SEEK_CUR))
    os.close(fd)
    r.do("content", read, r.p("f"), keep=bytes)


@scenario("open")
def directories(r: Run):
    os.mkdir(r.p("d"))
    write(r.p("f"), b"x")
    fd = r.do("O_RDONLY on a dir", os.open, r.p("d"), os.O_RDONLY)
    if fd is not None:
        r.do("read(2) of a dir", os.read, fd, 10)
        os.close(fd)
    r.do("O_WRONLY on a dir", os.open, r.p("d"), os.O_WRONLY)
    r.do("O_DIRECTORY on a file", os.open, r.p("f"), os.O_RDONLY | os.O_DIRECTORY)
    r.do("O_DIRECTORY|O_CREAT of a new name", os.open, r.p("new"), os.O_RDONLY | os.O_DIRECTORY | os.O_CREAT)
    r.do("O_CREAT on an existing dir", os.open, r.p("d"), os.O_WRONLY | os.O_CREAT)
    r.do("open missing", os.open, r.p("missing"), os.O_RDONLY)
    r.do("open path through a file", os.open, r.p("f", "x"), os.O_RDONLY)


@scenario("open")
def nofollow(r: Run):
    write(r.p("f"), b"x")
    os.symlink("f", r.p("l"))
    r.do("O_NOFOLLOW on a symlink", os.open, r.p("l"), os.O_RDONLY | os.O_NOFOLLOW)
    fd = r.do("O_PATH|O_NOFOLLOW on a symlink", os.open, r.p("l"), os.O_PATH | os.O_NOFOLLOW)
    if fd is not None:
        r.note("fstat of the link", stat.S_ISLNK(os.fstat(fd).st_mode))
        os.close(fd)


# == read and write =======================================================================
@scenario("rw")
def two_descriptors(r: Run):
    a = os.open(r.p("f"), os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(r.p("f"), os.O_RDWR)
    os.pwrite(a, b"aaaaaaaaaa", 0)
    os.pwrite(b, b"BB", 4)
    r.note("read through a", os.pread(a, 100, 0))
    r.note("read through b", os.pread(b, 100, 0))
    r.note("fstat size", os.fstat(b).st_size)
    os.close(a)
    r.note("b after a closed", os.pread(b, 100, 0))
    os.pwrite(b, b"c", 12)
    os.close(b)
    r.do("content", read, r.p("f"), keep=bytes)


@scenario("rw")
def read_your_writes_before_close(r: Run):
    write(r.p("old"), b"0123456789")
    fd = os.open(r.p("old"), os.O_RDWR)
    os.pwrite(fd, b"xy", 3)
    other = os.open(r.p("old"), os.O_RDONLY)
    r.note("same fd", os.pread(fd, 100, 0))
    r.note("another fd", os.pread(other, 100, 0))
    r.note("by path", read(r.p("old")))
    r.note("stat size", os.stat(r.p("old")).st_size)
    os.close(other)
    os.close(fd)
    fd = os.open(r.p("new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"fresh")
    r.note("new file by path", read(r.p("new")))
    r.note("new file stat", meta(os.stat(r.p("new"))))
    os.close(fd)


@scenario("rw")
def unlinked_while_open(r: Run):
    write(r.p("f"), b"kept")
    fd = os.open(r.p("f"), os.O_RDWR)
    os.unlink(r.p("f"))
    r.do("stat by name", os.stat, r.p("f"))
    r.note("fstat nlink", os.fstat(fd).st_nlink)
    r.note("read", os.pread(fd, 100, 0))
    os.pwrite(fd, b" and more", 4)
    r.note("read after write", os.pread(fd, 100, 0))
    r.note("fstat size", os.fstat(fd).st_size)
    os.ftruncate(fd, 2)
    r.note("after ftruncate", os.pread(fd, 100, 0))
    os.close(fd)
    # a new file unlinked before its first close
    fd = os.open(r.p("g"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"gone")
    os.unlink(r.p("g"))
    os.write(fd, b"!")
    r.note("new unlinked file", os.pread(fd, 100, 0))
    os.close(fd)
    r.note("listing", sorted(os.listdir(r.root)))


@scenario("rw")
def sparse(r: Run):
    fd = os.open(r.p("s"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 1 << 20)
    r.note("size", os.fstat(fd).st_size)
    r.note("hole reads zeros", os.pread(fd, 16, 4096) == b"\0" * 16)
    os.pwrite(fd, b"mid", 5000)
    os.close(fd)
    data = read(r.p("s"))
    r.note("content", (len(data), data[:8], data[5000:5003], data[-3:], data.count(0)))


@scenario("rw")
def read_past_end_and_zero_writes(r: Run):
    write(r.p("f"), b"abc")
    fd = os.open(r.p("f"), os.O_RDWR)
    r.note("read past end", os.pread(fd, 10, 100))
    r.note("zero write", os.write(fd, b""))
    os.close(fd)
    fd = os.open(r.p("f"), os.O_RDONLY)
    r.do("write on O_RDONLY", os.write, fd, b"x")
    os.close(fd)
    fd = os.open(r.p("f"), os.O_WRONLY)
    r.do("read on O_WRONLY", os.read, fd, 1)
    os.close(fd)


@scenario("rw")
def mmap_shared_write(r: Run):
    import mmap

    write(r.p("m"), b"\0" * 8192)
    fd = os.open(r.p("m"), os.O_RDWR)
    with mmap.mmap(fd, 8192, mmap.MAP_SHARED) as m:
        m[100:105] = b"hello"
        m.flush()
    os.close(fd)
    data = read(r.p("m"))
    r.note("written through the map", data[100:105])


@scenario("rw")
def copy_file_range_and_sendfile(r: Run):
    write(r.p("a"), b"0123456789" * 1000)
    src = os.open(r.p("a"), os.O_RDONLY)
    dst = os.open(r.p("b"), os.O_WRONLY | os.O_CREAT, 0o644)
    r.do("copy_file_range", os.copy_file_range, src, dst, 5000, keep=int)
    r.do("sendfile", os.sendfile, dst, src, 5000, 5000, keep=int)
    os.close(src)
    os.close(dst)
    r.do("copy", read, r.p("b"), keep=lambda b: (len(b), b[:12], b[-12:]))


@scenario("rw")
def flock_between_descriptors(r: Run):
    import fcntl

    write(r.p("lock"), b"")
    a = os.open(r.p("lock"), os.O_RDWR)
    b = os.open(r.p("lock"), os.O_RDWR)
    r.do("first LOCK_EX", fcntl.flock, a, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r.do("second LOCK_EX", fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(a, fcntl.LOCK_UN)
    r.do("after unlock", fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(a)
    os.close(b)


@scenario("rw")
def fsync_variants(r: Run):
    fd = os.open(r.p("f"), os.O_RDWR | os.O_CREAT | os.O_SYNC, 0o644)
    r.do("O_SYNC write", os.write, fd, b"sync", keep=int)
    r.do("fsync", os.fsync, fd)
    r.do("fdatasync", os.fdatasync, fd)
    os.close(fd)
    dfd = os.open(r.root, os.O_RDONLY | os.O_DIRECTORY)
    r.do("fsync of a dir", os.fsync, dfd)
    os.close(dfd)
    r.do("content", read, r.p("f"), keep=bytes)


@scenario("open", xfail="no O_TMPFILE through FUSE here: pyfuse3 has no tmpfile handler (EOPNOTSUPP)")
def o_tmpfile(r: Run):
    fd = r.do("O_TMPFILE", os.open, r.root, os.O_TMPFILE | os.O_RDWR, 0o600)
    if fd is not None:
        os.write(fd, b"anonymous")
        os.close(fd)
    r.note("listing", os.listdir(r.root))


@scenario("rw", xfail="no lseek handler in pyfuse3: SEEK_HOLE answers the end of file, never a hole")
def seek_data_and_hole(r: Run):
    fd = os.open(r.p("s"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x" * 4096, 1 << 20)
    r.do("SEEK_DATA from 0", os.lseek, fd, 0, os.SEEK_DATA, keep=int)
    r.do("SEEK_HOLE from 0", os.lseek, fd, 0, os.SEEK_HOLE, keep=int)
    os.close(fd)


@scenario("rw", xfail="no fallocate handler in pyfuse3: fallocate(2) answers EOPNOTSUPP")
def fallocate_keep_size(r: Run):
    import ctypes as c

    libc = c.CDLL(None, use_errno=True)
    fd = os.open(r.p("f"), os.O_RDWR | os.O_CREAT, 0o644)
    ok = libc.fallocate(fd, 0, c.c_long(0), c.c_long(1 << 16)) == 0
    r.note("fallocate", ok or errno.errorcode[c.get_errno()])
    r.note("size", os.fstat(fd).st_size)
    os.close(fd)


@scenario("rw")
def posix_fallocate_works(r: Run):
    """glibc's posix_fallocate writes zeros where fallocate(2) is missing: tools that use it work."""
    fd = os.open(r.p("f"), os.O_RDWR | os.O_CREAT, 0o644)
    r.do("posix_fallocate", os.posix_fallocate, fd, 0, 1 << 16)
    r.note("size", os.fstat(fd).st_size)
    os.close(fd)


@scenario("mkdir")
def dots_and_entry_types(r: Run):
    os.mkdir(r.p("d"))
    write(r.p("d", "f"), b"")
    os.symlink("f", r.p("d", "l"))
    os.mkfifo(r.p("d", "p"))
    r.note("d/.. is the parent", os.stat(r.p("d", "..")).st_ino == os.stat(r.root).st_ino)
    r.note("d/. is d", os.stat(r.p("d", ".")).st_ino == os.stat(r.p("d")).st_ino)
    with os.scandir(r.p("d")) as it:
        r.note("d_type", sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                                 e.is_symlink()) for e in it))
    r.note("dir nlink", os.stat(r.p("d")).st_nlink)


# == truncate ===============================================================================
@scenario("truncate")
def grow_and_shrink(r: Run):
    write(r.p("f"), b"0123456789")
    os.truncate(r.p("f"), 20)
    r.note("grown", read(r.p("f")))
    os.truncate(r.p("f"), 4)
    r.note("shrunk", read(r.p("f")))
    fd = os.open(r.p("f"), os.O_RDWR)
    os.ftruncate(fd, 6)
    r.note("ftruncate grow, fstat", os.fstat(fd).st_size)
    os.pwrite(fd, b"Z", 1)
    os.ftruncate(fd, 3)
    r.note("ftruncate shrink before close", os.pread(fd, 100, 0))
    os.close(fd)
    r.do("truncate a dir", os.truncate, r.p(), 0)
    r.do("truncate missing", os.truncate, r.p("missing"), 0)
    r.do("negative size", os.truncate, r.p("f"), -1)
    fd = os.open(r.p("f"), os.O_RDONLY)
    r.do("ftruncate of O_RDONLY", os.ftruncate, fd, 0)
    os.close(fd)


@scenario("truncate")
def huge_sizes(r: Run):
    """A size past what the filesystem holds is EFBIG (ext4: 16 TiB; an S3 object: 5 TiB),
    by path and through a descriptor, and changes nothing."""
    write(r.p("f"), b"abc")
    r.do("truncate to 999,999,999,999,999", os.truncate, r.p("f"), 999_999_999_999_999)
    fd = os.open(r.p("f"), os.O_RDWR)
    r.do("ftruncate to 999,999,999,999,999", os.ftruncate, fd, 999_999_999_999_999)
    os.write(fd, b"x")
    r.do("ftruncate after a write", os.ftruncate, fd, 999_999_999_999_999)
    os.close(fd)
    r.do("content", read, r.p("f"), keep=bytes)


@scenario("truncate")
def truncate_new_open_file(r: Run):
    fd = os.open(r.p("n"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"abcdef")
    os.truncate(r.p("n"), 2)  # by path while this process still has it open
    r.note("seen through the fd", os.pread(fd, 100, 0))
    os.write(fd, b"X")  # at offset 6: the hole is filled with zeros
    os.close(fd)
    r.do("content", read, r.p("n"), keep=bytes)


# == rename =================================================================================
@scenario("rename")
def replace_file(r: Run):
    write(r.p("a"), b"new")
    write(r.p("b"), b"old")
    ino = os.stat(r.p("a")).st_ino
    r.do("rename over a file", os.rename, r.p("a"), r.p("b"))
    r.note("moved inode kept", os.stat(r.p("b")).st_ino == ino)
    r.note("content", read(r.p("b")))
    r.do("old name gone", os.stat, r.p("a"))
    r.do("rename to itself", os.rename, r.p("b"), r.p("b"))


@scenario("rename")
def directory_cases(r: Run):
    for d in ("d", "empty", "full", "d2"):
        os.mkdir(r.p(d))
    write(r.p("full", "x"), b"")
    write(r.p("f"), b"f")
    os.mkdir(r.p("d", "sub"))
    r.do("dir over empty dir", os.rename, r.p("d"), r.p("empty"))
    r.do("dir over non-empty dir", os.rename, r.p("d2"), r.p("full"))
    r.do("dir into own subtree", os.rename, r.p("empty"), r.p("empty", "sub", "x"))
    r.do("dir onto itself", os.rename, r.p("empty"), r.p("empty"))
    r.do("file over dir", os.rename, r.p("f"), r.p("d2"))
    r.do("dir over file", os.rename, r.p("d2"), r.p("f"))
    r.do("dir to a name under a file", os.rename, r.p("d2"), r.p("f", "x"))
    r.do("missing source", os.rename, r.p("nope"), r.p("x"))
    r.do("into a missing dir", os.rename, r.p("f"), r.p("nodir", "f"))
    r.do("parent over child", os.rename, r.p("empty"), r.p("empty", "sub"))
    r.do("child over parent", os.rename, r.p("empty", "sub"), r.p("empty"))
    r.do("rename a dir away and back", os.rename, r.p("empty", "sub"), r.p("sub2"))
    r.note("nlink", (os.stat(r.p("empty")).st_nlink, os.stat(r.root).st_nlink))


@scenario("rename")
def renameat2_flags(r: Run):
    write(r.p("a"), b"a")
    write(r.p("b"), b"b")
    os.mkdir(r.p("d"))
    r.do("NOREPLACE onto existing", renameat2, r.p("a"), r.p("b"), 1)
    r.do("NOREPLACE onto free", renameat2, r.p("a"), r.p("c"), 1)
    r.do("EXCHANGE file and dir", renameat2, r.p("c"), r.p("d"), 2)
    r.do("EXCHANGE with missing", renameat2, r.p("b"), r.p("zz"), 2)
    r.do("both flags", renameat2, r.p("b"), r.p("c"), 3)
    r.note("kinds", {n: stat.S_ISDIR(os.lstat(r.p(n)).st_mode) for n in ("b", "c", "d")})


def attempt(fn, *args, **kwargs) -> str:
    """Call fn; its errno's name instead of an exception (a step whose failure is expected on
    some backend kinds, fixtures_posix.DIFFERENCES, and which later steps do not depend on)."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


@scenario("rename")
def hard_link_names(r: Run):
    write(r.p("a"), b"x")
    r.do("link", os.link, r.p("a"), r.p("b"))
    r.do("rename onto another name of the same file", os.rename, r.p("a"), r.p("b"))
    r.note("both names stay", sorted(os.listdir(r.root)))
    r.do("nlink", os.stat, r.p("a"), keep=lambda st: st.st_nlink)


@scenario("rename")
def symlinks_are_renamed_not_followed(r: Run):
    os.mkdir(r.p("d"))
    os.symlink("d", r.p("l"))
    r.do("rename a symlink to a dir", os.rename, r.p("l"), r.p("m"))
    r.note("still a link", os.readlink(r.p("m")))
    r.do("rename a dir over a symlink", os.rename, r.p("d"), r.p("m"))


# == unlink and rmdir =======================================================================
@scenario("unlink")
def unlink_and_rmdir(r: Run):
    os.mkdir(r.p("d"))
    write(r.p("d", "f"), b"x")
    os.symlink("d", r.p("l"))
    r.do("rmdir non-empty", os.rmdir, r.p("d"))
    r.do("unlink dir", os.unlink, r.p("d"))
    r.do("rmdir file", os.rmdir, r.p("d", "f"))
    r.do("rmdir symlink to dir", os.rmdir, r.p("l"))
    r.do("unlink symlink", os.unlink, r.p("l"))
    r.do("rmdir dot", os.rmdir, r.p("d", "."))
    r.do("rmdir dotdot", os.rmdir, r.p("d", ".."))
    r.do("unlink file", os.unlink, r.p("d", "f"))
    r.do("unlink again", os.unlink, r.p("d", "f"))
    r.do("rmdir now empty", os.rmdir, r.p("d"))


# == mkdir ==================================================================================
@scenario("mkdir")
def mkdir_modes(r: Run):
    r.do("mkdir 0777", os.mkdir, r.p("a"), 0o777)
    r.do("mkdir 0700", os.mkdir, r.p("b"), 0o700)
    r.do("mkdir with sticky", os.mkdir, r.p("c"), 0o1777)
    r.do("mkdir existing", os.mkdir, r.p("a"))
    r.do("mkdir in missing parent", os.mkdir, r.p("x", "y"))
    r.do("mkdir trailing slash", os.mkdir, str(r.p("t")) + "/")
    r.note("modes", [oct(stat.S_IMODE(os.stat(r.p(n)).st_mode)) for n in ("a", "b", "c")])
    r.note("parent nlink", os.stat(r.root).st_nlink)
    r.note("new dir nlink", os.stat(r.p("a")).st_nlink)


@scenario("mkdir")
def umask_applies_to_every_kind(r: Run):
    old = os.umask(0o027)
    try:
        write(r.p("f"), b"", mode=0o666)
        os.mkdir(r.p("d"), 0o777)
        os.mkfifo(r.p("p"), 0o666)
        os.mknod(r.p("n"), stat.S_IFREG | 0o666)
    finally:
        os.umask(old)
    r.note("modes", [oct(stat.S_IMODE(os.lstat(r.p(n)).st_mode)) for n in ("f", "d", "p", "n")])


# == symlinks ===============================================================================
@scenario("symlink")
def symlink_semantics(r: Run):
    os.mkdir(r.p("d"))
    os.mkdir(r.p("d", "sub"))
    write(r.p("f"), b"target")
    r.do("dangling", os.symlink, "does/not/exist", r.p("dangling"))
    r.do("stat dangling", os.stat, r.p("dangling"))
    r.note("lstat dangling", meta(os.lstat(r.p("dangling"))))
    r.do("dotdot target", os.symlink, "../../f", r.p("d", "sub", "up"))
    r.do("read through dotdot", read, r.p("d", "sub", "up"), keep=bytes)
    r.note("readlink", os.readlink(r.p("d", "sub", "up")))
    r.do("absolute target", os.symlink, "/nonexistent/abs", r.p("abs"))
    r.note("readlink absolute", os.readlink(r.p("abs")))
    r.do("link to dir", os.symlink, "d", r.p("ld"))
    r.note("stat vs lstat", (stat.S_ISDIR(os.stat(r.p("ld")).st_mode), stat.S_ISLNK(os.lstat(r.p("ld")).st_mode)))
    r.note("list through link", sorted(os.listdir(r.p("ld"))))
    r.do("loop a", os.symlink, "loopb", r.p("loopa"))
    r.do("loop b", os.symlink, "loopa", r.p("loopb"))
    r.do("open a loop", os.open, r.p("loopa"), os.O_RDONLY)
    r.do("readlink of a file", os.readlink, r.p("f"))
    r.do("symlink onto existing", os.symlink, "x", r.p("f"))
    r.do("empty target", os.symlink, "", r.p("empty"))
    long_target = "t/" * 2000
    r.do("4000-byte target", os.symlink, long_target, r.p("long"))
    r.note("long target back", os.readlink(r.p("long")) == long_target if os.path.lexists(r.p("long")) else None)
    r.note("lstat size", os.lstat(r.p("d", "sub", "up")).st_size)
    os.symlink("made", r.p("dangling2"))
    r.do("create through dangling", write, r.p("dangling2"), b"y")
    r.note("made", read(r.p("made")))


@scenario("symlink", root_only=True)
def symlink_times_and_owner(r: Run):
    os.symlink("nowhere", r.p("l"))
    os.utime(r.p("l"), ns=(1_000_000_001, 2_000_000_002), follow_symlinks=False)
    st = os.lstat(r.p("l"))
    r.note("lutimes", (st.st_atime_ns, st.st_mtime_ns))
    r.do("lchown", os.lchown, r.p("l"), 1234, 5678)
    r.note("owner", (os.lstat(r.p("l")).st_uid, os.lstat(r.p("l")).st_gid))
    r.note("mode", oct(os.lstat(r.p("l")).st_mode))


# == link ===================================================================================
@scenario("link")
def hard_links(r: Run):
    write(r.p("a"), b"shared")
    os.mkdir(r.p("d"))
    r.do("link", os.link, r.p("a"), r.p("d", "b"))
    if os.path.exists(r.p("d", "b")):  # not on a backend without hard links (DIFFERENCES)
        r.note("same inode", os.stat(r.p("a")).st_ino == os.stat(r.p("d", "b")).st_ino)
        r.note("nlink", os.stat(r.p("a")).st_nlink)
        write(r.p("d", "b"), b"changed", os.O_WRONLY | os.O_TRUNC)
        r.note("content through other name", read(r.p("a")))
        os.chmod(r.p("a"), 0o600)
        r.note("mode through other name", oct(stat.S_IMODE(os.stat(r.p("d", "b")).st_mode)))
    else:
        write(r.p("d", "b"), b"changed")
    r.do("link a dir", os.link, r.p("d"), r.p("d2"))
    r.do("link onto existing", os.link, r.p("a"), r.p("d", "b"))
    r.do("link missing", os.link, r.p("missing"), r.p("x"))
    os.unlink(r.p("a"))
    r.note("after unlink", (read(r.p("d", "b")), os.stat(r.p("d", "b")).st_nlink))
    os.symlink("d/b", r.p("sym"))
    r.do("link a symlink (not followed)", os.link, r.p("sym"), r.p("sym2"), follow_symlinks=False)
    r.do("link of a symlink is a symlink", os.lstat, r.p("sym2"), keep=lambda st: stat.S_ISLNK(st.st_mode))
    os.mkfifo(r.p("fifo"))
    r.do("link a fifo", os.link, r.p("fifo"), r.p("fifo2"))


# == chmod and chown ========================================================================
@scenario("chmod", root_only=True)
def chmod_chown(r: Run):
    write(r.p("f"), b"x")
    os.mkdir(r.p("d"))
    for mode in (0o4755, 0o2755, 0o1777, 0o0, 0o7777, 0o644):
        r.do(f"chmod {oct(mode)}", os.chmod, r.p("f"), mode)
        r.note("mode", oct(stat.S_IMODE(os.stat(r.p("f")).st_mode)))
    r.do("chmod dir", os.chmod, r.p("d"), 0o2711)
    r.do("chown", os.chown, r.p("f"), 1234, 5678)
    r.do("chown uid only", os.chown, r.p("f"), 4321, -1)
    r.do("chown gid only", os.chown, r.p("f"), -1, 8765)
    r.note("owner", (os.stat(r.p("f")).st_uid, os.stat(r.p("f")).st_gid))
    r.do("chmod missing", os.chmod, r.p("missing"), 0o644)
    fd = os.open(r.p("f"), os.O_RDONLY)
    r.do("fchmod", os.fchmod, fd, 0o640)
    r.do("fchown", os.fchown, fd, 0, 0)
    os.close(fd)


@scenario("chmod", root_only=True)
def chown_clears_setuid_setgid(r: Run):
    write(r.p("f"), b"x")
    os.chmod(r.p("f"), 0o6755)
    os.chown(r.p("f"), 1000, 1000)
    r.note("after chown by root", oct(stat.S_IMODE(os.stat(r.p("f")).st_mode)))
    write(r.p("g"), b"x")
    os.chmod(r.p("g"), 0o2745)  # setgid without group exec: mandatory-locking marker, kept
    os.chown(r.p("g"), 1000, 1000)
    r.note("setgid without g+x", oct(stat.S_IMODE(os.stat(r.p("g")).st_mode)))
    os.mkdir(r.p("d"))
    os.chmod(r.p("d"), 0o2755)
    os.chown(r.p("d"), 1000, 1000)
    r.note("setgid dir kept", oct(stat.S_IMODE(os.stat(r.p("d")).st_mode)))


# == times ==================================================================================
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if libc.utimensat(-100, os.fsencode(path), ts, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def moved(before: os.stat_result, after: os.stat_result) -> tuple[str, ...]:
    """Which of atime, mtime, ctime changed."""
    return tuple(n for n, a, b in zip(("atime", "mtime", "ctime"), times(before), times(after)) if a != b)


@scenario("times", root_only=True)
def ctime_and_mtime_rules(r: Run):
    write(r.p("f"), b"x")
    os.mkdir(r.p("d"))
    os.utime(r.p("f"), ns=(10**18, 10**18))
    steps = [
        ("chmod", lambda: os.chmod(r.p("f"), 0o600), "f"),
        ("chown", lambda: os.chown(r.p("f"), 0, 0), "f"),
        ("write", lambda: write(r.p("f"), b"yy", os.O_WRONLY), "f"),
        ("append", lambda: write(r.p("f"), b"z", os.O_WRONLY | os.O_APPEND), "f"),
        ("truncate", lambda: os.truncate(r.p("f"), 1), "f"),
        ("truncate same size", lambda: os.truncate(r.p("f"), 1), "f"),
        ("O_TRUNC open", lambda: os.close(os.open(r.p("f"), os.O_WRONLY | os.O_TRUNC)), "f"),
        ("link", lambda: attempt(os.link, r.p("f"), r.p("f2")), "f"),
        ("unlink other name", lambda: attempt(os.unlink, r.p("f2")), "f"),
        ("rename", lambda: os.rename(r.p("f"), r.p("g")), ("f", "g")),
        ("read", lambda: read(r.p("g")), "g"),
        ("create in dir", lambda: write(r.p("d", "x"), b""), "d"),
        ("unlink in dir", lambda: os.unlink(r.p("d", "x")), "d"),
        ("mkdir in dir", lambda: os.mkdir(r.p("d", "s")), "d"),
        ("rename within dir", lambda: os.rename(r.p("d", "s"), r.p("d", "t")), "d"),
        ("chmod dir", lambda: os.chmod(r.p("d"), 0o700), "d"),
    ]
    for label, action, name in steps:
        old, new = name if isinstance(name, tuple) else (name, name)
        before = os.stat(r.p(old))
        wait_tick()
        action()
        after = os.stat(r.p(new))
        # atime depends on relatime and mount options, compared only where POSIX fixes it
        r.note(label, tuple(m for m in moved(before, after) if m != "atime"))


@scenario("times")
def utimensat_now_omit_and_ns(r: Run):
    write(r.p("f"), b"x")
    os.utime(r.p("f"), ns=(1_234_567_890_123_456_789, 1_111_111_111_987_654_321))
    r.note("nanoseconds kept", times(os.stat(r.p("f")))[:2])
    utimensat(r.p("f"), (0, UTIME_OMIT), (5, 6))
    r.note("atime omitted", times(os.stat(r.p("f")))[:2])
    before = os.stat(r.p("f"))
    wait_tick()
    utimensat(r.p("f"), (0, UTIME_NOW), (0, UTIME_OMIT))
    after = os.stat(r.p("f"))
    r.note("UTIME_NOW on atime", (after.st_atime_ns > before.st_atime_ns, after.st_mtime_ns == before.st_mtime_ns))
    utimensat(r.p("f"), (0, UTIME_OMIT), (0, UTIME_OMIT))
    r.note("both omitted: nothing moves", times(os.stat(r.p("f")))[:2] == times(after)[:2])
    utimensat(r.p("f"), (0, UTIME_NOW), (0, UTIME_NOW))
    now = os.stat(r.p("f"))
    r.note("both now", (now.st_atime_ns == now.st_mtime_ns, now.st_mtime_ns >= after.st_ctime_ns))
    r.do("invalid nsec", utimensat, r.p("f"), (0, 2_000_000_000), (0, 0))
    r.do("negative times", os.utime, r.p("f"), ns=(-1_500_000_000, -1))
    r.note("negative kept", times(os.stat(r.p("f")))[:2])
    os.mkdir(r.p("d"))
    os.utime(r.p("d"), ns=(3, 4))
    r.note("dir times", times(os.stat(r.p("d")))[:2])


@scenario("times")
def atime_relatime(r: Run):
    """relatime: a read updates atime when it is not after mtime (or older than a day)."""
    write(r.p("f"), b"content")
    os.utime(r.p("f"), ns=(1_000_000_000, 2_000_000_000))  # atime before mtime
    read(r.p("f"))
    st = os.stat(r.p("f"))
    r.note("read moved atime", (st.st_atime_ns > 2_000_000_000, st.st_mtime_ns))
    os.utime(r.p("f"), ns=(4_000_000_000_000_000_000, 3_000_000_000_000_000_000))  # atime after mtime, recent
    read(r.p("f"))
    r.note("second read leaves a later atime", os.stat(r.p("f")).st_atime_ns)


@scenario("times")
def times_of_new_entries(r: Run):
    before = os.stat(r.root)
    wait_tick()
    write(r.p("f"), b"x")
    st = os.stat(r.p("f"))
    r.note("new file: m == c, a <= m", (st.st_mtime_ns == st.st_ctime_ns, st.st_atime_ns <= st.st_mtime_ns))
    r.note("new file after parent's old mtime", st.st_mtime_ns > before.st_mtime_ns)
    r.note("parent m and c moved", moved(before, os.stat(r.root))[-2:])


# == mknod ==================================================================================
@scenario("mknod", root_only=True)
def special_files(r: Run):
    r.do("fifo", os.mknod, r.p("p"), stat.S_IFIFO | 0o640)
    r.do("socket", os.mknod, r.p("s"), stat.S_IFSOCK | 0o600)
    r.do("char dev", os.mknod, r.p("c"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    r.do("block dev", os.mknod, r.p("b"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    r.do("regular", os.mknod, r.p("f"), stat.S_IFREG | 0o644)
    r.do("dir via mknod", os.mknod, r.p("d"), stat.S_IFDIR | 0o755)
    r.do("existing", os.mknod, r.p("p"), stat.S_IFIFO | 0o640)
    for n in "pscbf":
        r.note(n, meta(os.lstat(r.p(n))))
    r.do("rename a fifo", os.rename, r.p("p"), r.p("p2"))
    r.do("chmod a socket", os.chmod, r.p("s"), 0o666)
    r.do("open a fifo nonblocking for reading", lambda: os.close(os.open(r.p("p2"), os.O_RDONLY | os.O_NONBLOCK)))
    r.do("unlink a device", os.unlink, r.p("c"))


# == statfs =================================================================================
def test_statfs_reports_the_backend_filesystem(sides):
    if sides.kind == "s3":  # S3 has no capacity: a large constant, as s3fs and rclone report
        mine = os.statvfs(sides.mount)
        assert mine.f_namemax == 255 and mine.f_bavail * mine.f_frsize >= 1 << 50
        return
    mine, disk = os.statvfs(sides.mount), os.statvfs(sides.tracked.backend_root)
    assert mine.f_namemax == 255
    assert mine.f_blocks * mine.f_frsize == disk.f_blocks * disk.f_frsize
    # free space moves with other writers on the machine: within 1 % of the disk's own figure
    assert abs(mine.f_bavail * mine.f_frsize - disk.f_bavail * disk.f_frsize) <= disk.f_blocks * disk.f_frsize // 100
    assert mine.f_files == disk.f_files
    r = subprocess.run(["df", "-P", str(sides.mount)], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[1].split()[1] == str(disk.f_blocks * disk.f_frsize // 1024)


# == names ==================================================================================
EVERY_BYTE = bytes(b for b in range(1, 256) if b != ord("/"))  # 254 bytes


@scenario("names")
def every_byte_but_slash_and_nul(r: Run):
    r.do("create", write, r.p(EVERY_BYTE), b"x")
    r.note("listed", EVERY_BYTE in os.listdir(os.fsencode(r.root)))
    r.do("stat", os.stat, r.p(EVERY_BYTE), keep=meta)
    r.do("mkdir", os.mkdir, r.p(EVERY_BYTE[::-1]))
    for i, chunk in enumerate((b"\x01\x02", b"\xff\xfe", b" lead", b"trail ", b"-", b"\n", b"\\", b"\xc3\x28")):
        # the newline name is a directory: a file's object is written back after close, where
        # the tests' S3 endpoint (moto) refuses such a key (fixtures_posix.DIFFERENCES)
        r.do(f"name {i}", *((os.mkdir, r.p(chunk)) if chunk == b"\n" else (write, r.p(chunk), b"")))
    r.do("rename to the odd name", os.rename, r.p(b"\n"), r.p(b"\x80odd"))
    r.note("listing", sorted(os.listdir(os.fsencode(r.root))))


@scenario("names")
def name_lengths(r: Run):
    r.do("255 bytes", write, r.p("a" * 255), b"x")
    r.do("255 bytes of UTF-8 (85 x 3)", write, r.p("€" * 85), b"x")
    r.do("256 bytes", write, r.p("b" * 256), b"x")
    r.do("mkdir 256", os.mkdir, r.p("c" * 256))
    r.do("stat 256", os.stat, r.p("c" * 256))
    r.do("symlink named 256", os.symlink, "x", r.p("d" * 256))
    r.do("link to 256", os.link, r.p("a" * 255), r.p("e" * 256))
    r.do("rename to 256", os.rename, r.p("a" * 255), r.p("f" * 256))
    r.do("a path of 4096 bytes", os.stat, r.p(*(["x" * 200] * 21)))
    r.note("listing", sorted(os.listdir(r.root)))


@scenario("names")
def deep_long_paths(r: Run):
    """Paths of 1,000-2,000 bytes: fine natively (PATH_MAX is 4,096); past 1,024 bytes of key
    an S3 backend refuses new names (fixtures_posix.DIFFERENCES)."""
    parts: list[str] = []
    for i in range(9):
        parts.append(f"{i}" + "d" * 199)
        r.do(f"mkdir at depth {i + 1}", os.mkdir, r.p(*parts))
    r.do("file at the bottom", write, r.p(*parts[:4], "f" * 200), b"x")
    r.do("rename to a longer path", os.rename, r.p(*parts[:4], "f" * 200), r.p(*parts[:5], "g" * 200))
    r.note("depth reached", sum(1 for _ in os.walk(r.root)))


# == extended attributes ====================================================================
def _xattr(fn, path, *args, **kwargs):
    return fn(os.fsencode(path), *args, **kwargs)


@scenario("xattr")
def user_xattrs(r: Run):
    write(r.p("f"), b"x")
    os.mkdir(r.p("d"))
    os.symlink("f", r.p("l"))
    os.mkfifo(r.p("p"))
    r.do("get missing", os.getxattr, r.p("f"), "user.a")
    r.do("set", os.setxattr, r.p("f"), "user.a", b"1")
    r.do("get", os.getxattr, r.p("f"), "user.a", keep=bytes)
    r.do("set CREATE existing", os.setxattr, r.p("f"), "user.a", b"2", os.XATTR_CREATE)
    r.do("set REPLACE missing", os.setxattr, r.p("f"), "user.b", b"2", os.XATTR_REPLACE)
    r.do("set REPLACE existing", os.setxattr, r.p("f"), "user.a", b"3", os.XATTR_REPLACE)
    r.do("set CREATE new", os.setxattr, r.p("f"), "user.b", b"\0binary\xff", os.XATTR_CREATE)
    r.do("empty value", os.setxattr, r.p("f"), "user.empty", b"")
    r.do("get empty", os.getxattr, r.p("f"), "user.empty", keep=bytes)
    r.do("list", os.listxattr, r.p("f"), keep=sorted)
    r.do("remove", os.removexattr, r.p("f"), "user.a")
    r.do("remove missing", os.removexattr, r.p("f"), "user.a")
    r.do("list after remove", os.listxattr, r.p("f"), keep=sorted)
    r.do("on a dir", os.setxattr, r.p("d"), "user.dir", b"v")
    # user.filestore.* (the rollup fields of a directory) exist only in the mount
    r.do("dir list", os.listxattr, r.p("d"), keep=lambda names: sorted(n for n in names if not n.startswith("user.filestore.")))
    r.do("on a symlink (not followed)", os.setxattr, r.p("l"), "user.x", b"v", follow_symlinks=False)
    r.do("through a symlink", os.getxattr, r.p("l"), "user.b", keep=bytes)
    r.do("list of a symlink", os.listxattr, r.p("l"), follow_symlinks=False, keep=sorted)
    r.do("on a fifo", os.setxattr, r.p("p"), "user.x", b"v")
    r.do("name of 255 bytes", os.setxattr, r.p("f"), "user." + "n" * 250, b"v")
    r.do("name of 256 bytes", os.setxattr, r.p("f"), "user." + "n" * 251, b"v")
    r.do("empty user name", os.setxattr, r.p("f"), "user.", b"v")
    r.do("value over 64 KiB", os.setxattr, r.p("f"), "user.big", b"v" * 65537)
    r.do("unknown namespace set", os.setxattr, r.p("f"), "nonsense.x", b"v")
    r.do("unknown namespace get", os.getxattr, r.p("f"), "nonsense.x")
    r.do("security get", os.getxattr, r.p("f"), "security.capability")
    r.do("acl get", os.getxattr, r.p("f"), "system.posix_acl_access")
    r.do("missing file", os.getxattr, r.p("missing"), "user.a")
    fd = os.open(r.p("f"), os.O_RDONLY)
    r.do("fsetxattr on a read-only fd", os.setxattr, fd, "user.fd", b"v")
    r.do("fgetxattr", os.getxattr, fd, "user.fd", keep=bytes)
    os.close(fd)
    before = os.stat(r.p("f"))
    wait_tick()
    os.setxattr(r.p("f"), "user.t", b"t")
    r.note("setxattr moves ctime only", moved(before, os.stat(r.p("f")))[1:])
    r.do("link", os.link, r.p("f"), r.p("f2"))
    r.do("shared by hard links", os.getxattr, r.p("f2"), "user.t", keep=bytes)
    write(r.p("f"), b"rewritten", os.O_WRONLY | os.O_TRUNC)
    r.do("kept by an O_TRUNC rewrite", os.listxattr, r.p("f"), keep=sorted)
    write(r.p("n"), b"old")
    os.setxattr(r.p("n"), "user.keep", b"k")
    write(r.p("n"), b"new", os.O_WRONLY | os.O_TRUNC)
    r.do("kept by a rewrite of a single-link file", os.getxattr, r.p("n"), "user.keep", keep=bytes)
    os.rename(r.p("n"), r.p("m"))
    r.do("kept by rename", os.getxattr, r.p("m"), "user.keep", keep=bytes)


@scenario("xattr")
def xattr_on_a_new_open_file(r: Run):
    fd = os.open(r.p("new"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    r.do("set before the first close", os.setxattr, r.p("new"), "user.early", b"e")
    os.write(fd, b" more")
    os.close(fd)
    r.do("get after close", os.getxattr, r.p("new"), "user.early", keep=bytes)
    r.do("content", read, r.p("new"), keep=bytes)


# == the parametrized runner ================================================================
def _param(key: str):
    entry = SCENARIOS[key]
    marks = [pytest.mark.xfail(strict=True, reason=entry["xfail"])] if entry["xfail"] else []
    return pytest.param(key, id=key, marks=marks)


@pytest.mark.parametrize("key", [_param(k) for k in SCENARIOS])
def test_scenario_matches_native(sides, key):
    if os.geteuid() != 0:
        pytest.skip("run as root; each scenario also runs as another user (test_scenario_as_a_user_matches_native)")
    sides.conform(SCENARIOS[key]["fn"])


@pytest.mark.parametrize("key", [_param(k) for k in SCENARIOS if not SCENARIOS[k]["root_only"]])
def test_scenario_as_a_user_matches_native(sides, key):
    """The same scenarios from a child running as an unprivileged user, so that the kernel's
    permission checks apply to every step (the scenario's directory is mode 0777)."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    sides.conform(SCENARIOS[key]["fn"], user=ALICE)


# == concurrency ============================================================================
APPENDER = textwrap.dedent("""
    import os, sys
    path, tag, count = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    for i in range(count):
        os.write(fd, tag + b"%05d\\n" % i)
    os.close(fd)
""")


@pytest.mark.parametrize("where", ["native", "mount"])
def test_concurrent_appenders_lose_no_bytes(sides, where):
    """Four processes append 500 records each to one O_APPEND file: every record arrives whole."""
    path = getattr(sides, where) / "log"
    write(path, b"")
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), tag, "500"]) for tag in "ABCD"]
    assert [p.wait(120) for p in procs] == [0] * 4
    lines = read(path).splitlines()
    assert len(lines) == 2000 and len(set(lines)) == 2000
    for tag in "ABCD":
        mine = [x for x in lines if x.startswith(tag.encode())]
        assert mine == sorted(mine) and len(mine) == 500


READER = textwrap.dedent("""
    import os, sys
    path, rounds = sys.argv[1], int(sys.argv[2])
    bad = []
    for _ in range(rounds):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            bad.append(exc.strerror)
            continue
        if data not in (b"old" * 1000, b"new" * 1000):
            bad.append(f"{len(data)} bytes: {data[:12]!r}")
    print(len(bad), sorted(set(bad)))
""")


def test_rename_over_is_atomic_for_a_concurrent_reader(sides):
    """A reader opening the name in a loop while it is replaced by rename sees old or new
    content, whole, and never a missing name."""
    target = sides.mount / "config"
    write(target, b"old" * 1000)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), "3000"], stdout=subprocess.PIPE, text=True)
    rounds = 0
    while reader.poll() is None and rounds < 400:
        content = b"new" * 1000 if rounds % 2 else b"old" * 1000
        write(sides.mount / "config.tmp", content)
        os.rename(sides.mount / "config.tmp", target)
        rounds += 1
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and rounds > 10
    assert out.split()[0] == "0", f"reads that saw no file or a torn one: {out.strip()}"


def test_descriptors_kept_for_removed_files_are_released(tracked):
    """A removed file's descriptor is kept only until the kernel forgets the inode: after
    removing many files, the daemon holds no more descriptors than before."""
    from conftest import wait_until

    fd_dir = f"/proc/{tracked.mount.process.pid}/fd"
    for i in range(300):
        write(tracked.path / f"f{i}", b"x")
    baseline = len(os.listdir(fd_dir))
    for i in range(300):
        os.unlink(tracked.path / f"f{i}")
    subprocess.run(["sync"], check=True)
    # the kernel sends its forgets in batches, soon after each inode is evicted
    wait_until(lambda: len(os.listdir(fd_dir)) <= baseline + 2, timeout=30, message="descriptors released")


@pytest.fixture
def low_open_file_limit():
    """A soft limit of 1,024 descriptors, as on most machines, inherited by the mount started after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3000:
        pytest.skip(f"the hard limit ({hard}) is too low to open 2,000 files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_many_files_open_at_once(low_open_file_limit, tracked):
    """More open files than the usual soft limit of 1,024 descriptors: the daemon raises its own."""
    import resource

    hard = low_open_file_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process opens 2,000 too
    fds = []
    for i in range(2000):
        write(tracked.path / f"f{i}", b"%d" % i)
    try:
        for i in range(2000):  # a write makes the daemon hold the backend file open until close
            fds.append(os.open(tracked.path / f"f{i}", os.O_RDWR | os.O_APPEND))
            os.write(fds[-1], b"+")
        assert [os.pread(fd, 10, 0) for fd in fds[::500]] == [b"0+", b"500+", b"1000+", b"1500+"]
    finally:
        for fd in fds:
            os.close(fd)
