"""Hostile conditions, met as an owner meets them: the real `drawbot` in a subprocess (`python -m bot.cli`) against a
broken state dir, database or config, a second instance, a kill mid-job.

In each case: stderr holds no traceback, the exit code is the documented one (0 ok, 1 run-time failure, 2 set-up or
config problem: README "Exit codes"), and no accepted job or history row is lost (read from the SQLite file).
Conditions that need root (a tmpfs mount) skip with the reason when the tests are not root; CI runs as root.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_service import REPO, BotProcess, child_env, job_rows, statuses, wait_until, write_config


def drawbot(*args: str, cwd: Path, stdin: str = "", timeout: float = 120, env: dict | None = None):
    """One `drawbot ...` run to its end, as an owner types it."""
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=env or child_env(), timeout=timeout)


def assert_one_clean_line(stderr: str, *expected: str) -> str:
    """No traceback, and the complaint is one `drawbot:` line holding every expected piece."""
    assert "Traceback" not in stderr and "⏎" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("drawbot: ") and all(e in line for e in expected)]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def setup(tmp_path, models_dir):
    state = tmp_path / "state"
    config = write_config(tmp_path / "config.toml", models_dir, state)
    started: list[BotProcess] = []

    def start(name: str, *, interactive: bool = True) -> BotProcess:
        bot = BotProcess(config, tmp_path, name, interactive=interactive, env=child_env())
        started.append(bot)
        return bot

    yield config, state, start
    for bot in started:
        bot.stop_now()


def test_a_second_instance_on_the_same_state_dir_exits_2_naming_the_first(setup, tmp_path):
    config, state, start = setup
    db = state / "drawbot.sqlite3"
    first = start("first")
    first.wait_ready()
    first.send("/draw a slow heron 5 8")
    wait_until(lambda: statuses(db) == ["running"], 60, "the job to start drawing", first)

    second = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert second.returncode == 2
    assert_one_clean_line(second.stderr, "already running", f"process {first.proc.pid}", str(state))
    assert "picture saved" not in second.stdout

    first.proc.stdin.close()  # end of input: the first finishes its picture and exits
    assert first.proc.wait(120) == 0, first.err()
    [row] = job_rows(db)
    # Drawn once, by the first: the second never took it for a crash leftover.
    assert row["status"] == "done" and row["attempts"] == 0 and row["delivered_at"] is not None
    assert "restarted" not in first.out() and first.out().count("picture saved") == 1


def test_sigkill_mid_job_then_restart_loses_nothing(setup, tmp_path):
    config, state, start = setup
    db = state / "drawbot.sqlite3"
    first = start("first")
    first.wait_ready()
    first.send("/draw a killed heron 5 8")
    first.send("/draw a waiting kettle 6 1")
    wait_until(lambda: statuses(db) == ["running", "queued"], 60, "one job drawing, one waiting", first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    # The kernel dropped the dead bot's lock: the next start is not blocked, and picks both jobs up.
    second = drawbot("run", "--config", str(config), cwd=tmp_path, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    rows = job_rows(db)
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["delivered_at"] for r in rows)
    assert second.stdout.count("picture saved") == 2
