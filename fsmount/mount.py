"""Serving one mount: the process that owns the FUSE session, and its detached launcher."""
from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from core.config import Settings
from core.errors import ConfigError
from core.events import loops as eventloops
from core.journal import recovery
from core.service import Filestore

from .inline import Inline
from .mounts import check_mountpoint, filestore_mounts, mounted_at  # noqa: F401  (part of this module's API)
from .operations import Operations

log = logging.getLogger(__name__)


def _hold_home_lock(settings: Settings, path: str) -> int:
    """One mount per FILESTORE_HOME: a second would take the first's live intents for unfinished."""
    fd = os.open(settings.home / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another mount is serving FILESTORE_HOME {settings.home}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {path}\n".encode())
    return fd


def _raise_open_file_limit() -> None:
    """The daemon holds a descriptor per open file and per removed file the kernel still
    references (core.files.retain): the soft limit of 1,024 is too low for a filesystem."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(settings: Settings, mountpoint: str) -> None:
    """Mount, serve until unmounted or signalled, then close cleanly. Blocks."""
    path = check_mountpoint(mountpoint)
    _raise_open_file_limit()
    settings.ensure_dirs()
    lock_fd = _hold_home_lock(settings, path)
    fs = Filestore(settings)
    try:
        report = recovery.run(fs)
        if report.total:
            log.info("recovery: %s", report)
        fs.writeback.start()
        fs.writeback.resume(fs.ns.backends)  # uploads a crash left pending, before serving
        fs.deletes.start()
        fs.deletes.resume(fs.ns.backends)  # S3 deletions a crash left queued
        loops = eventloops.start_in_mount(fs)
        fs.warm()
        options = set(pyfuse3.default_options)
        options |= {"fsname=filestore", "subtype=filestore"}
        if os.geteuid() == 0:
            options.add("allow_other")
        pyfuse3.init(Operations(fs), path, options)
        log.info("mounted %s", path)
        fs.start_workers()
        started: list[Inline] = []
        try:
            trio.run(_main, fs, path, started)
        finally:
            for inline in started:  # before the session closes: workers may still invalidate
                inline.close()
            pyfuse3.close(unmount=True)
            fs.writeback.drain()  # before the workers and loops stop: the uploads journal and announce
            # Every answered command committed, durably; with PostgreSQL away past the bound,
            # they stay in the intent log and the next start commits them.
            left = fs.pipeline.close(timeout=fs.pipeline.settings.wait_seconds)
            fs.stop_workers()
            loops.stop()
        if not left:
            recovery.mark_clean(fs)
    finally:
        fs.close()
        os.close(lock_fd)


async def _main(fs: Filestore, path: str, started: list) -> None:
    token = trio.lowlevel.current_trio_token()

    def locked(fn) -> None:
        with fs.core_lock:
            fn()

    def on_serving_thread(fn) -> None:
        try:
            trio.from_thread.run_sync(locked, fn, trio_token=token)
        except trio.RunFinishedError:
            locked(fn)  # the mount is gone: nothing serves any more

    def post_to_serving_thread(fn) -> None:
        try:
            token.run_sync_soon(locked, fn)
        except trio.RunFinishedError:
            locked(fn)
    fs.serving_call = on_serving_thread
    fs.serving_post = post_to_serving_thread
    # The sidecar's loops (inline mode), health endpoints and registration need the trio token.
    started.append(Inline(fs, path, token))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return


def launch_detached(settings: Settings, mountpoint: str, timeout: float = 60.0) -> int:
    """Start `filestore mount --foreground` in its own session and wait until it is mounted."""
    path = check_mountpoint(mountpoint)
    _raise_open_file_limit()
    settings.ensure_dirs()
    log_path = settings.logs_dir / f"mount-{Path(path).name or 'root'}.log"
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            # -v: the detached server's log (FILESTORE_HOME/logs) keeps INFO lines: recovery, mounts
            [sys.executable, "-m", "fsmount.cli", "-v", "mount", "--foreground", path],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mounted_at(path):
            return child.pid
        if child.poll() is not None:
            raise ConfigError(f"mount failed: {_last_error(log_path)} (log: {log_path})")
        time.sleep(0.05)
    child.terminate()
    raise ConfigError(f"mount did not become ready in {timeout:.0f}s (log: {log_path})")


def _last_error(log_path: Path) -> str:
    try:
        lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "see the log"
    for line in reversed(lines):
        if line.startswith("filestore: "):
            return line[len("filestore: "):]
    return lines[-1] if lines else "no output"


def unmount(mountpoint: str, settings: Settings, timeout: float = 30.0) -> None:
    """Unmount, then wait for the serving process of this FILESTORE_HOME to finish closing."""
    path = os.path.realpath(mountpoint)
    if not mounted_at(path):
        raise ConfigError(f"{mountpoint} is not mounted")
    cmd = ["fusermount3", "-u", path] if os.geteuid() != 0 else ["umount", path]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"cannot unmount {mountpoint}: {message[-1] if message else 'failed'}")
    deadline = time.monotonic() + timeout
    server = _server_pid(settings, path)
    while time.monotonic() < deadline and (mounted_at(path) or (server and _running(server))):
        time.sleep(0.05)


def _server_pid(settings: Settings, path: str) -> int | None:
    try:
        pid, _, point = (settings.home / "mount.lock").read_text().partition(" ")
        return int(pid) if point.strip() == path else None
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as finished
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
