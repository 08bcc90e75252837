"""The S3 section of scripts/bench (`scripts/bench --only s3`): the mount over an S3 backend
beside the same work done directly with boto3 (one call at a time, default transfer settings) and
through `rclone mount --vfs-cache-mode writes`, against the same loopback endpoint in the same run.

The endpoint is moto's server (`python -m moto.server`, a real HTTP S3 API) started as its own
process on a free loopback port, so that neither side shares a Python interpreter with it.
Each side has its own bucket. rclone is run when `rclone` is on PATH (Debian's package; it is
not installed by scripts/setup): configured by RCLONE_CONFIG_BENCH_* environment variables (no
config file), its VFS cache in the work directory. Without it the rclone column shows "-".

Workloads, in the order run (each side does the same file operations; boto3 the S3 calls):

  seq write   a 256 MiB file (32 MiB with --quick): 1 MiB blocks, then close. With write-back
              (the default, D34) the mount's close returns once the spool file is fsynced locally
              and the write recorded; rclone's close returns once its cache file is written. The
              row "until fsync" adds an fsync after close: the mount's returns when the upload
              landed in S3; rclone's does NOT wait for S3 (it uploads later, after
              --vfs-write-back), so rclone's figure there is marked "*". boto3 uploads the same
              file from local disk with `upload_file` (its managed transfer). MiB/s.
  seq read    read back through a fresh mount (restart: nothing in the kernel's page cache, the
              on-disk caches emptied); boto3 `download_file` to local disk. MiB/s. Then once more
              through another fresh mount without emptying the on-disk caches (rclone in mode
              "writes" has no read cache: its figure is a second cold read).
  small       2,000 files of 4 KiB in 20 directories: open/write/close; one put_object per file
              for boto3. files/s. Again "until fsync": until an fsync of every file (after all
              closes) returned (rclone: "*", as above).
  creates     1,000 empty files in 10 directories (100 with --quick): open(O_CREAT|O_EXCL)/close,
              mkdir in the time; one empty put_object per file for boto3. files/s.
  tar -x      of a tarball of this Python's standard library (scripts/bench's builder, 3,000
              files at most; 300 with --quick); boto3 puts the same files one at a time. s.
  rename      a directory of 1,000 objects (100 with --quick): os.rename; for boto3, copy_object
              then delete_object for each key. Seconds (ratio = other time / mount time).
  rm -r       that directory: `rm -r`; boto3 one delete_object per key, and (row "boto3 batched")
              delete_objects with 1,000 keys a call on another copy. Seconds.

  write-through  the seq write and the small files again through a mount started with
              FILESTORE_S3_WRITEBACK=off (upload at close), on new names.

Between workloads rclone is given time to upload (the bucket is polled until its objects are
there, untimed), so that each rclone workload starts from objects that are in S3.

Targets (ratios of the mount, higher is better; "x rclone" must be >= 1): seq write until fsync
>= 1.0x boto3; seq read cold >= 1.0x boto3; small files >= 4x boto3 and >= rclone; creates and
tar -x >= rclone; directory rename >= 3.3x boto3 and >= rclone; rm -r >= 10x boto3 one call at a
time and >= 0.5x boto3 batched.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
# key -> (target ratio to boto3, target ratio to rclone); None: not judged
TARGETS = {"seq_write": (None, None), "seq_write_landed": (1.0, None), "seq_read": (1.0, None),
           "seq_reread": (None, None), "small": (4.0, 1.0), "small_landed": (None, None),
           "creates": (None, 1.0), "untar": (None, 1.0), "rename": (1 / 0.3, 1.0), "rm": (10.0, None),
           "rm_batched": (0.5, None), "seq_write_through": (None, None), "small_through": (None, None)}
# rclone's fsync returns before the upload (it uploads after --vfs-write-back): these rows are
# what its fsync costs, not "in S3"
RCLONE_FSYNC_NOT_S3 = {"seq_write_landed", "small_landed"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self, run_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(run_dir / "moto.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, **ENV))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class S3Mount:
    def __init__(self, run_dir: Path, endpoint: str, bucket: str):
        self.home = run_dir / "home-s3"
        self.mnt = run_dir / "mnt-s3"
        # Waits for uploads (fsync after close) are bounded by FILESTORE_S3_WAIT_SECONDS: not here.
        self.env = dict(os.environ, FILESTORE_HOME=str(self.home), FILESTORE_S3_WAIT_SECONDS="3600", **ENV)
        self.env.pop("FILESTORE_BACKENDS_PATH", None)
        self.endpoint, self.bucket = endpoint, bucket
        self.external_db = bool(os.environ.get("DATABASE_URL"))
        self.name = f"s3bench_{os.getpid()}" if self.external_db else "s3bench"
        self.mounted = False

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "fsmount.cli", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"filestore {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
        return done

    def start(self) -> Path:
        self.home.mkdir(exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        self.cli("backend", "add", self.name, f"s3://{self.bucket}/data", "--endpoint-url", self.endpoint)
        self.mount()
        return self.mnt / self.name

    def mount(self) -> None:
        self.cli("mount", str(self.mnt))
        self.mounted = True
        deadline = time.monotonic() + 30
        while not (self.mnt / self.name).is_dir():
            if time.monotonic() > deadline:
                raise RuntimeError("the S3 backend did not appear in the mount")
            time.sleep(0.05)

    def umount(self) -> None:
        if self.mounted:
            self.cli("umount", str(self.mnt), check=False)
            self.mounted = False

    def stop(self) -> None:
        self.umount()
        if self.external_db:
            self.cli("backend", "remove", self.name, check=False)
        else:
            self.cli("db", "stop", check=False)


class RcloneMount:
    """`rclone mount --vfs-cache-mode writes` of its own bucket, configured by environment variables."""

    def __init__(self, run_dir: Path, endpoint: str, bucket: str):
        self.mnt = run_dir / "mnt-rclone"
        self.cache = run_dir / "rclone-cache"
        self.logpath = run_dir / "rclone.log"
        self.bucket = bucket
        self.env = dict(os.environ, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                        RCLONE_CONFIG_BENCH_ENDPOINT=endpoint,
                        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ENV["AWS_ACCESS_KEY_ID"],
                        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=ENV["AWS_SECRET_ACCESS_KEY"],
                        RCLONE_CONFIG_BENCH_REGION=ENV["AWS_DEFAULT_REGION"])
        # rclone fails to start with a custom CA bundle set (the endpoint is plain http anyway)
        self.env.pop("AWS_CA_BUNDLE", None)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("rclone") is not None

    def start(self) -> Path:
        self.mnt.mkdir(exist_ok=True)
        self.mount()
        return self.mnt

    def mounted(self) -> bool:
        want = str(self.mnt)
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == want for line in f)

    def mount(self) -> None:
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen(
                ["rclone", "mount", f"bench:{self.bucket}", str(self.mnt), "--vfs-cache-mode", "writes",
                 "--cache-dir", str(self.cache)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 30
        while not self.mounted():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone mount did not start (see {self.logpath})")
            time.sleep(0.05)

    def umount(self, empty_cache: bool = False) -> None:
        if self.proc is None:
            return
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(30)
        if self.mounted():
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        self.proc = None
        if empty_cache:
            shutil.rmtree(self.cache, ignore_errors=True)

    def stop(self) -> None:
        self.umount()


def count_objects(s3, bucket: str, prefix: str, size: int | None = None) -> int:
    """Objects under prefix, directory markers (keys ending in /) left out."""
    return sum(sum(1 for o in page.get("Contents", [])
                   if not o["Key"].endswith("/") and (size is None or o["Size"] == size))
               for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


def wait_objects(s3, bucket: str, prefix: str, count: int, size: int | None = None, timeout: float = 600) -> None:
    """Until `count` objects (of `size` bytes, if given) are under prefix: rclone uploads after close."""
    deadline = time.monotonic() + timeout
    while (n := count_objects(s3, bucket, prefix, size)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{bucket}/{prefix}: {n} objects of {count} after {timeout:.0f} s")
        time.sleep(0.25)


def load_bench():
    """scripts/bench (no .py suffix) as a module, for its tarball builder."""
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("filestore_bench", str(Path(__file__).with_name("bench")))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    if loader.name in sys.modules:
        return sys.modules[loader.name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look their module up there
    loader.exec_module(mod)
    return mod


def landed(paths: list[Path]) -> None:
    """An fsync of every file after close: the mount's returns once the upload landed (write-back);
    rclone's returns without waiting for S3."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Workloads:
    """The file-side workloads, the same for the mount and rclone (base: the directory in the mount)."""

    def __init__(self, big_mib: int, small_files: int, small_dirs: int, create_files: int, create_dirs: int,
                 rename_files: int):
        self.big_mib, self.small_files, self.small_dirs = big_mib, small_files, small_dirs
        self.create_files, self.create_dirs, self.rename_files = create_files, create_dirs, rename_files
        self.block = os.urandom(MiB)
        self.data = b"x" * 4096

    def write(self, path: Path) -> tuple[float, float]:
        """(seconds to close, seconds until an fsync after close returned)"""
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(self.big_mib):
                os.write(fd, self.block)
        finally:
            os.close(fd)
        to_close = time.perf_counter() - t0
        landed([path])
        return to_close, time.perf_counter() - t0

    def read(self, path: Path) -> float:
        def go():
            with open(path, "rb", buffering=0) as f:
                while f.read(MiB):
                    pass
        return timed(go)

    def small_paths(self, top: Path) -> list[Path]:
        return [top / f"d{i % self.small_dirs:02d}" / f"f{i:05d}" for i in range(self.small_files)]

    def small(self, top: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        os.mkdir(top)
        for d in range(self.small_dirs):
            os.mkdir(top / f"d{d:02d}")
        paths = self.small_paths(top)
        for path in paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, self.data)
            os.close(fd)
        to_close = time.perf_counter() - t0
        landed(paths)
        return to_close, time.perf_counter() - t0

    def creates(self, top: Path) -> float:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        per_dir = -(-self.create_files // self.create_dirs)
        t0 = time.perf_counter()
        os.mkdir(top)
        n = 0
        for d in range(self.create_dirs):
            os.mkdir(top / f"c{d:02d}")
            for _ in range(min(per_dir, self.create_files - n)):
                os.close(os.open(top / f"c{d:02d}" / f"e{n:05d}", flags, 0o644))
                n += 1
        return time.perf_counter() - t0

    def untar(self, dest: Path, tarball: Path) -> float:
        os.mkdir(dest)
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t0

    def make_rename_dir(self, top: Path) -> None:
        os.mkdir(top)
        for i in range(self.rename_files):
            os.close(os.open(top / f"f{i:05d}", os.O_WRONLY | os.O_CREAT, 0o644))


def run(run_dir: Path, quick: bool) -> list[tuple]:
    """Run the S3 workloads; returns rows (key, label, unit, boto3, rclone, mount, ratio to boto3,
    ratio to rclone, (target to boto3, target to rclone))."""
    import boto3

    big_mib = 32 if quick else 256
    small_files, small_dirs, rename_files = (200, 2, 100) if quick else (2000, 20, 1000)
    create_files, create_dirs = (100, 2) if quick else (1000, 10)
    tar_cap = 300 if quick else 3000
    w = Workloads(big_mib, small_files, small_dirs, create_files, create_dirs, rename_files)
    moto = Moto(run_dir)
    fs: S3Mount | None = None
    rc: RcloneMount | None = None
    rows: dict[str, list] = {}

    def row(key, label, unit, raw=None):
        rows[key] = [key, label, unit, raw, None, None]

    def put(key, side, value):
        rows[key][{"rclone": 4, "mount": 5}[side]] = value

    try:
        s3 = boto3.client("s3", endpoint_url=moto.url, **{
            "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": ENV["AWS_DEFAULT_REGION"]})
        for b in ("raw", "mnt", "rcl"):
            s3.create_bucket(Bucket=b)
        fs = S3Mount(run_dir, moto.url, "mnt")
        sides: list[tuple[str, Path, str, str]] = [("mount", fs.start(), "mnt", "data/")]
        say(f"s3: moto server at {moto.url}; mount at {sides[0][1]}")
        if RcloneMount.available():
            rc = RcloneMount(run_dir, moto.url, "rcl")
            sides.append(("rclone", rc.start(), "rcl", ""))
            say(f"s3: rclone mount --vfs-cache-mode writes at {rc.mnt}")
        else:
            say("s3: rclone is not on PATH (apt-get install rclone): its column is left out")

        def restart(side: str, empty_cache: bool) -> None:
            if side == "mount":
                fs.umount()
                if empty_cache:
                    shutil.rmtree(fs.home / "s3" / fs.name / "cache", ignore_errors=True)
                fs.mount()
            else:
                rc.umount(empty_cache=empty_cache)
                rc.mount()

        # -- sequential write and read ------------------------------------------------------
        local = run_dir / "s3-big.local"
        with open(local, "wb") as f:
            for _ in range(big_mib):
                f.write(w.block)
        row("seq_write", f"seq write {big_mib} MiB, to close", "MiB/s")
        row("seq_write_landed", "  ... until fsync returned", "MiB/s")
        raw_w = timed(lambda: s3.upload_file(str(local), "raw", "big"))
        rows["seq_write"][3] = rows["seq_write_landed"][3] = big_mib / raw_w
        for side, base, bucket, prefix in sides:
            to_close, to_fsync = w.write(base / "big")
            put("seq_write", side, big_mib / to_close)
            put("seq_write_landed", side, big_mib / to_fsync)
            wait_objects(s3, bucket, prefix + "big", 1, big_mib * MiB)

        back = run_dir / "s3-big.back"
        row("seq_read", f"seq read {big_mib} MiB (cold)", "MiB/s", big_mib / timed(
            lambda: s3.download_file("raw", "big", str(back))))
        row("seq_reread", "seq read again (fresh mount)", "MiB/s", rows["seq_read"][3])
        for side, base, _bucket, _prefix in sides:
            restart(side, empty_cache=True)
            put("seq_read", side, big_mib / w.read(base / "big"))
            restart(side, empty_cache=False)  # the kernel's page cache goes; on-disk caches stay
            put("seq_reread", side, big_mib / w.read(base / "big"))
            if (base / "big").read_bytes() != local.read_bytes():
                say(f"CHECK FAILED: the big file differs ({side})")
        if back.read_bytes() != local.read_bytes():
            say("CHECK FAILED: boto3's download differs")
        local.unlink()
        back.unlink()

        # -- small files ---------------------------------------------------------------------
        def raw_small():
            for i in range(small_files):
                s3.put_object(Bucket="raw", Key=f"small/d{i % small_dirs:02d}/f{i:05d}", Body=w.data)

        raw_t = timed(raw_small)
        row("small", f"small files {small_files} x 4 KiB, to close", "files/s", small_files / raw_t)
        row("small_landed", "  ... until fsync returned", "files/s", small_files / raw_t)
        for side, base, bucket, prefix in sides:
            to_close, to_fsync = w.small(base / "small")
            put("small", side, small_files / to_close)
            put("small_landed", side, small_files / to_fsync)
            wait_objects(s3, bucket, prefix + "small/", small_files, 4096)

        # -- creates of empty files ----------------------------------------------------------
        def raw_creates():
            for i in range(create_files):
                s3.put_object(Bucket="raw", Key=f"creates/c{i * create_dirs // create_files:02d}/e{i:05d}", Body=b"")

        row("creates", f"creates {create_files} empty files", "files/s", create_files / timed(raw_creates))
        for side, base, bucket, prefix in sides:
            put("creates", side, create_files / w.creates(base / "creates"))
            wait_objects(s3, bucket, prefix + "creates/", create_files)

        # -- tar -x of a source tree ---------------------------------------------------------
        tarball = run_dir / "s3-src.tar"
        files, dirs, size, _src = load_bench().build_tarball(tarball, tar_cap)
        plain = run_dir / "s3-src"
        plain.mkdir()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(plain)], check=True)
        local_files = [Path(r) / n for r, _d, names in os.walk(plain) for n in names]

        def raw_untar():
            for path in local_files:
                s3.put_object(Bucket="raw", Key="untar/" + str(path.relative_to(plain)), Body=path.read_bytes())

        row("untar", f"tar -x {files} files, {size / MiB:.0f} MiB", "s", timed(raw_untar))
        for side, base, bucket, prefix in sides:
            put("untar", side, w.untar(base / "untar", tarball))
            wait_objects(s3, bucket, prefix + "untar/", len(local_files))
        shutil.rmtree(plain)
        tarball.unlink()

        # -- directory rename and rm -r ------------------------------------------------------
        for side, base, bucket, prefix in sides:
            w.make_rename_dir(base / "before")
            wait_objects(s3, bucket, prefix + "before/", rename_files)
        for i in range(rename_files):
            s3.put_object(Bucket="raw", Key=f"before/f{i:05d}", Body=b"")
            s3.put_object(Bucket="raw", Key=f"batched/f{i:05d}", Body=b"")

        def raw_keys(prefix: str) -> list[str]:
            return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="raw", Prefix=prefix)
                    for o in page.get("Contents", [])]

        def raw_rename():
            for key in raw_keys("before/"):
                s3.copy_object(Bucket="raw", Key="after/" + key[len("before/"):],
                               CopySource={"Bucket": "raw", "Key": key})
                s3.delete_object(Bucket="raw", Key=key)

        row("rename", f"rename dir of {rename_files} objects", "s", timed(raw_rename))
        for side, base, bucket, prefix in sides:
            put("rename", side, timed(lambda: os.rename(base / "before", base / "after")))
            moved = len(os.listdir(base / "after"))
            if side == "rclone":  # rclone renames in S3 before answering; wait all the same
                wait_objects(s3, bucket, prefix + "after/", rename_files)
            left = count_objects(s3, bucket, prefix + "before/")
            if moved != rename_files or left:
                say(f"CHECK FAILED ({side}): {moved} entries after the rename, {left} objects left under the old name")

        def raw_rm():
            for key in raw_keys("after/"):
                s3.delete_object(Bucket="raw", Key=key)

        def raw_rm_batched():
            keys = raw_keys("batched/")
            for i in range(0, len(keys), 1000):
                s3.delete_objects(Bucket="raw", Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                        "Quiet": True})

        row("rm", f"rm -r of {rename_files} objects", "s", timed(raw_rm))
        row("rm_batched", "  ... boto3 batched DeleteObjects", "s", timed(raw_rm_batched))
        for side, base, bucket, prefix in sides:
            t = timed(lambda: subprocess.run(["rm", "-r", str(base / "after")], check=True))
            put("rm", side, t)
            put("rm_batched", side, t)
            deadline = time.monotonic() + 300  # deletes sent after rm -r returned: wait for them, untimed
            while count_objects(s3, bucket, prefix + "after/") and time.monotonic() < deadline:
                time.sleep(0.25)
            if count_objects(s3, bucket, prefix + "after/"):
                say(f"CHECK FAILED ({side}): objects left after rm -r")

        # -- the same writes with upload at close (FILESTORE_S3_WRITEBACK=off) -----------------
        fs.umount()
        fs.env["FILESTORE_S3_WRITEBACK"] = "off"
        fs.mount()
        base = sides[0][1]
        row("seq_write_through", "seq write, write-through (off)", "MiB/s", big_mib / raw_w)
        put("seq_write_through", "mount", big_mib / w.write(base / "big-through")[0])
        row("small_through", "small files, write-through (off)", "files/s", rows["small"][3])
        put("small_through", "mount", small_files / w.small(base / "small-through")[0])
        fs.env.pop("FILESTORE_S3_WRITEBACK")
    finally:
        if rc is not None:
            rc.stop()
        if fs is not None:
            fs.stop()
        moto.stop()
    out = []
    for key, label, unit, raw, rclone, mount in rows.values():
        def ratio(other):
            if other is None or mount is None:
                return None
            return other / mount if unit == "s" else mount / other
        out.append((key, label, unit, raw, rclone, mount, ratio(raw), ratio(rclone), TARGETS[key]))
    return out


def table(rows: list[tuple]) -> str:
    lines = [f"{'S3 workload':<36} {'boto3':>13} {'rclone':>14} {'mount':>13} {'x boto3':>8} {'x rclone':>9}"
             f"  {'target':<26} result"]
    star = False
    for key, label, unit, raw, rclone, mount, r_raw, r_rclone, (t_raw, t_rclone) in rows:
        def fmt(v):
            if v is None:
                return "-"
            return f"{v:.2f} s" if unit == "s" else f"{v:,.1f} {unit}"
        rfmt = fmt(rclone)
        if key in RCLONE_FSYNC_NOT_S3 and rclone is not None:
            rfmt += "*"
            star = True
        targets, verdicts = [], []
        for got, want, name in ((r_raw, t_raw, "boto3"), (r_rclone, t_rclone, "rclone")):
            if want is None:
                continue
            targets.append(f">={want:.3g}x {name}")
            if got is not None:
                verdicts.append("PASS" if got >= want else "MISS")
        verdict = "-" if not verdicts else ("MISS" if "MISS" in verdicts else "PASS")
        lines.append(f"{label:<36} {fmt(raw):>13} {rfmt:>14} {fmt(mount):>13} "
                     f"{'-' if r_raw is None else f'{r_raw:.3g}':>8} {'-' if r_rclone is None else f'{r_rclone:.3g}':>9}"
                     f"  {', '.join(targets) or '-':<26} {verdict}")
    lines.append("x boto3 / x rclone: the mount's rate over theirs, or their time over the mount's "
                 "(higher is better); rm -r is timed until `rm` returned")
    if star:
        lines.append("* rclone's fsync returns before the upload (it uploads after --vfs-write-back): "
                     "not a time to S3; the mount's fsync returns once the object is in S3")
    return "\n".join(lines)
