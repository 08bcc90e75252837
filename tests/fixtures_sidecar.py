"""Fixtures for the sidecar: real `filestore sidecar` subprocesses on a free HTTP port."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FILESTORE, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Sidecar:
    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 60, *extra: str) -> "Sidecar":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*FILESTORE, "-v", "sidecar", "--http-port", str(self.port), *extra],
                                        env=self.env, stdout=log, stderr=log, cwd=REPO, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"sidecar exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(self.port, "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"sidecar not up after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def ready(self) -> tuple[int, dict]:
        code, body = http_get(self.port, "/ready")
        return code, json.loads(body)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"sidecar did not stop on SIGTERM:\n{self.log()}")
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.process = None


@pytest.fixture
def sidecars(env, tmp_path):
    """A factory of sidecar processes sharing the test's database and home; all stopped after."""
    started: list[Sidecar] = []

    def make(**env_extra: str) -> Sidecar:
        car_env = {**env, **env_extra}
        car = Sidecar(car_env, tmp_path / f"sidecar-{len(started)}.log", free_port())
        started.append(car)
        return car.start()
    yield make
    for car in started:
        if car.process is not None and car.process.poll() is None:
            car.stop()
