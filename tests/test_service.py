"""Running as a service: `drawbot run` killed or stopped while one picture draws and two wait loses nothing and
sends nothing twice; SIGHUP reloads the policy; the systemd unit passes `systemd-analyze verify`.

The process tests start the real `drawbot run` (console adapter, tiny model, 64x64) on a pipe and read its SQLite file
read-only to see what it is doing, exactly as an owner would with `sqlite3 -readonly`.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from bot.config import Config, ConsoleSettings, LimitSettings, StorageSettings, load_config
from bot.runner import run

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "drawbot.service"
FAKE_TELEGRAM_TOKEN = "123456789:AAFakeTokenForTestsOnly-abcdefghijklmnop"

# (prompt, seed, steps): the first job of a process takes a few seconds (warm-up), plenty to catch it drawing.
JOBS = [("first purple heron", 11, 8), ("second copper kettle", 22, 2), ("third misty harbour", 33, 2)]
RESTARTING = "The bot is restarting. Your picture is kept"
STILL_COMING = "The bot restarted, but your picture is still coming"


def write_config(path: Path, models_dir: Path, state_dir: Path, *, blocked: list[str] = ()) -> Path:
    path.write_text(f"""
[engine]
model = "tiny"
models_dir = {json.dumps(str(models_dir))}
device = "cpu"
width = 64
height = 64
default_steps = 2
max_steps = 200

[storage]
state_dir = {json.dumps(str(state_dir))}

[limits]
cooldown_seconds = 0
max_active_per_user = 10
per_hour = 0
per_day = 0

[policy]
blocked_words = {json.dumps(list(blocked))}

[telegram]
enabled = false

[console]
enabled = true
user = "tester"
""")
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAWBOT_") and k != "JOURNAL_STREAM"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(condition: Callable[[], bool], timeout: float, what: str, bot: "BotProcess | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if bot is not None and bot.proc.poll() is not None:
            pytest.fail(f"the bot exited ({bot.proc.returncode}) while waiting for {what}:\n{bot.err()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f":\n{bot.err()}\n{bot.out()}" if bot else ""))
        time.sleep(0.05)


class BotProcess:
    """`drawbot run` in a child process; stdout/stderr go to files the test reads while it runs."""

    def __init__(self, config: Path, workdir: Path, name: str, *, interactive: bool, env: dict[str, str],
                 args: tuple[str, ...] = ()):
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "--config", str(config), "run", *args],
                stdin=subprocess.PIPE if interactive else subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=REPO, env=env, text=True,
            )

    def out(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_ready(self) -> None:
        wait_until(lambda: "drawbot: ready" in self.err(), 90, "the bot to start", self)

    def stop_now(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def job_rows(db: Path) -> list[dict]:
    """The jobs table, read-only (never creates or changes the file)."""
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute("SELECT * FROM jobs ORDER BY seq")]
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        connection.close()


def statuses(db: Path) -> list[str]:
    return [row["status"] for row in job_rows(db)]


def submit_three_and_wait_for_the_first_to_draw(bot: BotProcess, db: Path) -> None:
    for prompt, seed, steps in JOBS:
        bot.send(f"/draw {prompt} {seed} {steps}")
    wait_until(lambda: statuses(db) == ["running", "queued", "queued"], 60, "job 1 drawing, 2 and 3 waiting", bot)


def assert_all_three_delivered_exactly_once(db: Path, images: Path, outputs: str, logs: str) -> None:
    rows = job_rows(db)
    assert [r["prompt"] for r in rows] == [prompt for prompt, _, _ in JOBS]
    for row in rows:
        assert row["status"] == "done" and row["delivered_at"] is not None, row
        assert (images / row["image_file"]).is_file()
        # Delivered once: one picture in the chat, one first-time delivery record, never a second.
        assert outputs.count(f"/again {row['id']}]") == 1, outputs
        assert logs.count(f"delivered job={row['id']} first=True") == 1
    assert "first=False" not in logs
    assert len(re.findall(r"picture saved: ", outputs)) == 3


@pytest.fixture
def service(tmp_path, models_dir):
    """Config + paths for one bot installation; kills any bot the test left running."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "config.toml", models_dir, state)
    started: list[BotProcess] = []

    def start(name: str, *, interactive: bool, env: dict[str, str] | None = None, args=()) -> BotProcess:
        bot = BotProcess(config, tmp_path, name, interactive=interactive, env=env or child_env(), args=args)
        started.append(bot)
        return bot

    yield config, state, start
    for bot in started:
        bot.stop_now()


def test_sigkill_while_drawing_then_restart_delivers_all_three_exactly_once(service):
    config, state, start = service
    db = state / "drawbot.sqlite3"
    first = start("first", interactive=True)
    first.wait_ready()
    submit_three_and_wait_for_the_first_to_draw(first, db)

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert statuses(db) == ["running", "queued", "queued"]  # nothing lost, nothing half-written

    second = start("second", interactive=False)  # stdin at end of input: finish the queue, then exit
    assert second.proc.wait(90) == 0, second.err()
    assert second.out().count(STILL_COMING) == 3  # each user hears their picture is still coming
    assert_all_three_delivered_exactly_once(db, state / "images", first.out() + second.out(),
                                            first.err() + second.err())
    assert [r["attempts"] for r in job_rows(db)] == [1, 0, 0]  # only the interrupted one counts a retry


def test_sigterm_stops_within_the_timeout_keeps_waiting_jobs_and_restart_delivers_each_once(service, tmp_path,
                                                                                              models_dir):
    config, state, start = service
    db = state / "drawbot.sqlite3"
    err_file = tmp_path / "first.err"
    err_file.touch()
    stat = os.stat(err_file)
    # Logs go to a file that JOURNAL_STREAM names, as systemd does with the journal: lines must come journal-style.
    env = child_env(DRAWBOT_TELEGRAM_TOKEN=FAKE_TELEGRAM_TOKEN, JOURNAL_STREAM=f"{stat.st_dev}:{stat.st_ino}")
    stop_timeout = 30
    first = start("first", interactive=True, env=env, args=("--stop-timeout", str(stop_timeout)))
    first.wait_ready()

    # SIGHUP re-reads the policy while running.
    write_config(config, models_dir, state, blocked=["forbidden"])
    first.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in first.err(), 10, "the reload", first)
    first.send("/draw a forbidden fruit")
    wait_until(lambda: "does not draw" in first.out(), 10, "the blocked-word refusal", first)

    submit_three_and_wait_for_the_first_to_draw(first, db)
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(stop_timeout + 10) == 0, first.err()
    assert time.monotonic() - sent < stop_timeout
    assert first.out().count(RESTARTING) == 2  # the two waiting users, not the one being drawn for
    rows = job_rows(db)
    assert [r["status"] for r in rows] == ["done", "queued", "queued"]  # the running one finished in time
    assert rows[0]["delivered_at"] is not None

    second = start("second", interactive=False, env=child_env(DRAWBOT_TELEGRAM_TOKEN=FAKE_TELEGRAM_TOKEN))
    assert second.proc.wait(90) == 0, second.err()
    assert second.out().count(STILL_COMING) == 2
    logs = first.err() + second.err()
    assert_all_three_delivered_exactly_once(db, state / "images", first.out() + second.out(), logs)

    # Default-level logs: ids and numbers, never a prompt or a token; journal-style lines under JOURNAL_STREAM.
    for prompt, _, _ in JOBS:
        assert prompt not in logs and prompt.split()[1] not in logs
    assert "forbidden fruit" not in logs
    assert FAKE_TELEGRAM_TOKEN not in logs and FAKE_TELEGRAM_TOKEN.split(":")[1] not in logs
    job_lines = [line for line in first.err().splitlines() if "job=" in line]
    assert job_lines and all(re.match(r"<[46]>bot\.core: ", line) for line in job_lines), job_lines
    assert not re.search(r"^<\d>\d{4}-\d\d-\d\d", first.err(), re.M)  # journald adds the time itself
    done = next(line for line in job_lines if line.startswith("<6>bot.core: done job="))
    assert re.search(r"platform=console user=tester seconds=[\d.]+ s_per_step=[\d.]+ peak_vram=-", done)


class PipeInput:
    """A console stdin the test types into (a real pipe, like a terminal nobody closes)."""

    def __init__(self):
        read_fd, self._write_fd = os.pipe()
        self.stream = open(read_fd, "r", encoding="utf-8")

    def type(self, line: str) -> None:
        os.write(self._write_fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self._write_fd)


class FirstPictureHeld:
    """The real tiny pipeline; the first picture it is given stays at its first step until the engine stops it (the
    engine's stop check, `on_step(0, total)`, is called while it waits), so the stop window never races the CPU."""

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline
        self.held_once = False

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def generate(self, request, on_step):
        if self.held_once:
            return self._pipeline.generate(request, on_step)
        self.held_once = True

        def held(done: int, total: int) -> None:
            on_step(done, total)
            while done == 1:  # left only by the engine's stop (it raises here)
                time.sleep(0.01)
                on_step(0, total)

        return self._pipeline.generate(request, held)


async def test_stop_timeout_leaves_the_running_picture_for_the_next_start(tmp_path, tiny_settings, monkeypatch):
    from engine.pipeline import FluxPipeline

    load = FluxPipeline.load
    held = FirstPictureHeld(None)

    def load_held(settings):
        held._pipeline = held._pipeline or load(settings)
        return held

    monkeypatch.setattr(FluxPipeline, "load", staticmethod(load_held))
    config = Config(engine=tiny_settings, storage=StorageSettings(state_dir=tmp_path / "state"),
                    limits=LimitSettings(cooldown_seconds=0, per_hour=0, per_day=0),
                    console=ConsoleSettings(enabled=True, user="tester"))
    db = tmp_path / "state" / "drawbot.sqlite3"
    typed, out, stop = PipeInput(), io.StringIO(), asyncio.Event()
    running = asyncio.create_task(run(config, stdin=typed.stream, stdout=out, stop_timeout=0.2, stop=stop))
    try:
        typed.type("/draw a slow lighthouse 5 20")  # read once the bot is up
        deadline = time.monotonic() + 60
        while "running" not in statuses(db):
            if running.done() or time.monotonic() > deadline:
                pytest.fail(f"the job never started: {out.getvalue()}")
            await asyncio.sleep(0.05)
        stop.set()
        stopped_at = time.monotonic()
        assert await asyncio.wait_for(running, 30) == 0
        assert time.monotonic() - stopped_at < 10  # it stopped at a step boundary, not after all 20
    finally:
        typed.close()
    [row] = job_rows(db)
    assert row["status"] == "queued" and row["delivered_at"] is None  # queued again for the next start, not failed

    again = io.StringIO()
    assert await run(config, stdin=io.StringIO(""), stdout=again) == 0
    [row] = job_rows(db)
    assert row["status"] == "done" and row["delivered_at"] is not None
    assert row["attempts"] == 0  # a graceful stop uses up no crash retry
    assert again.getvalue().count("picture saved") == 1 and STILL_COMING in again.getvalue()


# -- the unit ------------------------------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_keeps_cuda_working_and_stops_after_the_bot_does():
    settings = unit_settings(UNIT.read_text())
    # CUDA needs the device nodes and W+X memory for its JIT.
    assert "PrivateDevices" not in settings and "MemoryDenyWriteExecute" not in settings
    assert settings["DeviceAllow"] == ["char-nvidia* rw"]
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                      "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert settings[hardening] == ["yes"], hardening
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["drawbot"] and settings["Restart"] == ["on-failure"]
    assert settings["EnvironmentFile"] == ["/etc/drawbot/drawbot.env"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and settings["KillSignal"] == ["SIGTERM"]
    # systemd must wait longer than the bot's own worst case before it sends SIGKILL.
    from bot.runner import DRAIN_TIMEOUT, ENGINE_GRACE

    stop_timeout = float(re.search(r"--stop-timeout (\d+)", settings["ExecStart"][0]).group(1))
    assert float(settings["TimeoutStopSec"][0]) > stop_timeout + ENGINE_GRACE + DRAIN_TIMEOUT


def install(tmp_path: Path) -> tuple[Path, Path]:
    """Run systemd/install.sh into a DESTDIR (no root needed), code "installed" at a fake prefix."""
    prefix, root = tmp_path / "opt" / "drawbot", tmp_path / "root"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    fake = prefix / ".venv" / "bin" / "drawbot"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    done = subprocess.run(["sh", str(REPO / "systemd" / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={**child_env(), "DESTDIR": str(root), "PREFIX": str(prefix)})
    assert done.returncode == 0, done.stderr
    return prefix, root


def test_install_script_writes_unit_config_and_a_private_token_file(tmp_path):
    prefix, root = install(tmp_path)
    unit = (root / "etc/systemd/system/drawbot.service").read_text()
    assert f"ExecStart={prefix}/.venv/bin/drawbot run" in unit and "=/opt/drawbot" not in unit
    config = load_config(root / "etc/drawbot/config.toml")
    assert config.storage.state_dir == Path("/var/lib/drawbot")
    assert config.engine.models_dir == Path("/var/lib/drawbot/models")
    env_file = root / "etc/drawbot/drawbot.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert not [line for line in env_file.read_text().splitlines() if line and not line.startswith("#")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (apt-get install systemd); see docs/deploy.md")
def test_systemd_analyze_verify_accepts_the_installed_unit(tmp_path):
    _, root = install(tmp_path)
    unit = root / "etc/systemd/system/drawbot.service"
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "drawbot" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
