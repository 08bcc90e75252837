#!/usr/bin/env python3
"""Where a small S3 file's time goes (issue 18 B, D48): N empty creates and N files of
4 KiB through a mount over moto's server (scripts/bench_s3.py's Moto and S3Mount), the rate to
`close` and until uploaded, beside boto3 put_object one at a time in the same run; with
SPY=empty or SPY=small, `py-spy record --threads --idle` of the mount process during that phase
(raw stacks in /tmp/s3profile-KIND.txt). Not a benchmark with targets: scripts/bench --only s3 is.

    N=400 KINDS=small,empty PYTHONPATH=. .venv/bin/python scripts/profile_s3_small.py
    N=400 KINDS=small SPY=small PYTHONPATH=. .venv/bin/python scripts/profile_s3_small.py
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_s3  # noqa: E402
import boto3  # noqa: E402

N = int(os.environ.get("N", "400"))
SPY = os.environ.get("SPY")
run_dir = Path(tempfile.mkdtemp(prefix="s3profile-", dir="/var/tmp"))
moto = bench_s3.Moto(run_dir)
fs = None
try:
    s3 = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id="bench", aws_secret_access_key="bench",
                      region_name="us-east-1")
    for b in ("raw", "mnt"):
        s3.create_bucket(Bucket=b)
    fs = bench_s3.S3Mount(run_dir, moto.url, "mnt")
    base = fs.start()
    pid = subprocess.run(["pgrep", "-f", str(fs.mnt)], capture_output=True, text=True).stdout.split()[-1]
    data = b"x" * 4096
    t0 = time.perf_counter()
    for i in range(N):
        s3.put_object(Bucket="raw", Key=f"small/f{i:05d}", Body=data)
    raw = N / (time.perf_counter() - t0)
    for kind in os.environ.get("KINDS", "small,empty").split(","):
        os.mkdir(base / kind)
        paths = [base / kind / f"f{i:05d}" for i in range(N)]
        spy = None
        if SPY == kind:
            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--threads", "--idle", "-r", "50", "-f", "raw", "-o", f"/tmp/s3profile-{kind}.txt",
                                    "-p", pid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        t0 = time.perf_counter()
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            if kind == "small":
                os.write(fd, data)
            os.close(fd)
        t1 = time.perf_counter()
        bench_s3.landed(paths)
        t2 = time.perf_counter()
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        print(f"{kind}: to close {N / (t1 - t0):.1f}/s, until uploaded {N / (t2 - t0):.1f}/s; "
              f"boto3 put_object {raw:.1f}/s", flush=True)
finally:
    if fs is not None:
        fs.stop()
    moto.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
