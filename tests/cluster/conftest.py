"""A real redis-server per test (loopback, a free port, a temp folder, append-only persistence, a password) and
`drawbot worker` subprocesses on the tiny model. Skipped, with the reason, where redis-server is not installed
(.ci/run installs it)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PASSWORD_PREFIX = "test-secret-"
"""Every server's password starts so (each is its own: a worker left over from another test, retrying its old
port, can never join a later test's server that got the same port)."""
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = PASSWORD_PREFIX + secrets.token_hex(4)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.conf = folder / "redis.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\nappendonly yes\nappendfsync always\nsave \"\"\n"
            f"requirepass {self.password}\nlogfile {folder / 'redis.log'}\ndaemonize no\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                    if b"PONG" in s.recv(100):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start: " + (self.folder / "redis.log").read_text()[-2000:])

    def kill(self) -> None:
        """A crash (SIGKILL): with appendfsync always, every write acknowledged before it is on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: redis-server flushes the append-only file and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def cluster_config(path: Path, models_dir: Path, *, lease: float = 2.0, heartbeat: float = 0.3,
                   step_sleep: float = 0.0, max_pixels: int = 2048 * 2048, model: str = "tiny",
                   extra: str = "", device: str = "cpu") -> Path:
    path.write_text(f"""
[engine]
model = "{model}"
models_dir = "{models_dir}"
mode = "resident"
device = "{device}"
width = 64
height = 64
default_steps = 2

[storage]
state_dir = "{path.parent / 'state'}"

[limits]
cooldown_seconds = 0
max_active_per_user = 20

[cluster]
enabled = true
lease_seconds = {lease}
heartbeat_seconds = {heartbeat}
step_sleep = {step_sleep}
max_pixels = {max_pixels}
{extra}
""")
    return path


class Workers:
    """`drawbot worker` subprocesses; every one is stopped at the end of the test."""

    def __init__(self, folder: Path, url: str):
        self.folder = folder
        self.url = url
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, config: Path, *args: str) -> subprocess.Popen:
        env = {**os.environ, "DRAWBOT_REDIS_URL": self.url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "worker", "--name", name,
                                 *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def workers(tmp_path, redis_server):
    pool = Workers(tmp_path, redis_server.url)
    yield pool
    pool.stop_all()
