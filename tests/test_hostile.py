"""Hostile conditions, met as an owner meets them: the real `drawbot` in a subprocess (`python -m bot.cli`) against a
broken state dir, database or config, a second instance, a kill mid-job.

In each case: stderr holds no traceback, the exit code is the documented one (0 ok, 1 run-time failure, 2 set-up or
config problem: README "Exit codes"), and no accepted job or history row is lost (read from the SQLite file).
Conditions that need root (a tmpfs mount) skip with the reason when the tests are not root; CI runs as root.
"""

from __future__ import annotations

import asyncio
import errno
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
    assert "Traceback" not in first.err() and "⏎" not in first.err(), first.err()


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

    # A picture half-written when the process died (a fresh one: not yet an hour old) is swept at the next start.
    leftover = state / "images" / f".{job_rows(db)[0]['id']}.0badc0de.tmp"
    leftover.write_bytes(b"\x89PNG half")
    # The kernel dropped the dead bot's lock: the next start is not blocked, and picks both jobs up.
    second = drawbot("run", "--config", str(config), cwd=tmp_path, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    rows = job_rows(db)
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["delivered_at"] for r in rows)
    assert second.stdout.count("picture saved") == 2
    assert not list((state / "images").glob(".*.tmp"))


def test_sigkill_twice_mid_job_retries_it_once_then_fails_it_and_tells_the_user(setup, tmp_path):
    """A picture during which the process dies is drawn again once (store.RESTART_RETRIES), not into the same crash
    at every start: at the third start it is failed, its user told, and the job waiting behind it is drawn."""
    from bot import replies
    from bot.chat import PlainMarkup
    from bot.store import RESTART_RETRIES
    from engine.jobs import Failure

    assert RESTART_RETRIES == 1
    config, state, start = setup
    db = state / "drawbot.sqlite3"
    first = start("first")
    first.wait_ready()
    first.send("/draw a deadly heron 5 200")
    first.send("/draw a patient kettle 6 1")
    wait_until(lambda: statuses(db) == ["running", "queued"], 60, "one job drawing, one waiting", first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    # The retry goes behind the job that was waiting: the kettle is drawn first, then the heron again.
    second = start("second")
    # The kettle delivered too: killed between drawing and delivering it, the third start would deliver it (nothing
    # is lost), and the check below that nothing is drawn then would see its picture.
    wait_until(lambda: [(r["status"], r["attempts"], r["delivered_at"] is not None) for r in job_rows(db)]
               == [("running", 1, False), ("done", 0, True)], 90, "the crash retry to be drawing", second)
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(10)

    third = drawbot("run", "--config", str(config), cwd=tmp_path, timeout=180)  # stdin at end: exits when done
    assert third.returncode == 0, third.stderr
    for stderr in (first.err(), second.err(), third.stderr):
        assert "Traceback" not in stderr and "⏎" not in stderr, stderr
    heron, kettle = job_rows(db)
    assert (heron["status"], heron["attempts"], heron["error"]) == ("failed", 2, Failure.RESTARTED)
    told = replies.failed(PlainMarkup(), Failure.RESTARTED)
    assert told.startswith("Sorry, that picture failed") and "twice" in told
    assert told in third.stdout  # its user is told
    assert "picture saved" not in third.stdout  # not drawn a third time
    assert kettle["status"] == "done" and kettle["delivered_at"] is not None  # nothing else lost


def test_an_oversized_picture_on_the_cpu_is_refused_up_front_and_the_bot_keeps_drawing(setup, tmp_path):
    from engine.size_cost import cpu_size_cost

    cost = cpu_size_cost()
    if cost is None or cost.affordable(2048, 2048):
        pytest.skip("this machine has the memory for a 2048x2048 picture on the CPU (≈37 GiB): nothing to refuse")
    config, state, _ = setup
    done = drawbot("run", "--config", str(config), cwd=tmp_path, timeout=180,
                   stdin="/draw a huge fox --size 2048x2048 --steps 1\n/draw a small fox 3 1\n")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    refusal = re.search(r"too big for this bot's computer: the largest picture of that shape it can draw is "
                        r"(\d+)x(\d+)", done.stdout)
    assert refusal, done.stdout
    width, height = int(refusal[1]), int(refusal[2])
    assert width == height and width % 16 == 0 and 64 <= width < 2048  # same shape, what the bot measured fits
    rows = job_rows(state / "drawbot.sqlite3")
    assert [(r["prompt"], r["status"]) for r in rows] == [("a small fox", "done")]  # refused before accepted

    # `drawbot draw` refuses it the same way before drawing: one line, run-time failure (1), no file.
    out = tmp_path / "huge.png"
    drawn = drawbot("draw", "a huge fox", "--width", "2048", "--height", "2048", "--steps", "1", "-o", str(out),
                    "--config", str(config), cwd=tmp_path)
    assert drawn.returncode == 1
    assert_one_clean_line(drawn.stderr, "2048x2048 needs more memory than this CPU has")
    assert not out.exists()


# -- set-up problems: exit 2, one line, the files left as they were -------------------------------------------------


def draw_one_picture(config: Path, cwd: Path) -> list[dict]:
    """A bot that has drawn one picture: its history row must survive whatever comes next."""
    done = drawbot("run", "--config", str(config), cwd=cwd, stdin="/draw a remembered heron 3 1\n")
    assert done.returncode == 0, done.stderr
    rows = job_rows(config.parent / "state" / "drawbot.sqlite3")
    assert [r["status"] for r in rows] == ["done"]
    return rows


@pytest.fixture
def mounts():
    """Mount points to undo after the test (root only)."""
    mounted: list[Path] = []
    yield mounted
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def mount(mounted: list[Path], *args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a file system (CI runs as root)")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}); CI can")
    mounted.append(Path(args[-1]))


def read_only_bind(mounted: list[Path], folder: Path) -> None:
    mount(mounted, "--bind", str(folder), str(folder))
    mount(mounted, "-o", "remount,bind,ro", str(folder))


def fill(folder: Path) -> Path:
    """Fill the file system holding `folder` to the last byte (as a runaway log would); returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_tells_the_user_keeps_the_job_starts_again_and_draws_it_when_room_returns(setup, tmp_path,
                                                                                            mounts):
    config, state, start = setup
    state.mkdir()
    mount(mounts, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state))
    db = state / "drawbot.sqlite3"
    first = start("first")
    first.wait_ready()
    first.send("/draw a heron on a full disk 5 60")  # long enough to fill the disk while it draws
    wait_until(lambda: statuses(db) == ["running"], 60, "the job to start drawing", first)
    filler = fill(state)

    # Its picture cannot be saved: the user hears why, the job goes back to the queue (not left running).
    wait_until(lambda: "could not be saved: the bot's disk is full" in first.out(), 120, "the user to be told", first)
    wait_until(lambda: statuses(db) == ["queued"], 10, "the job to be queued again", first)
    first.send("/usage")
    first.send("/draw a second heron 6 1")
    wait_until(lambda: "cannot take new pictures right now" in first.out(), 10, "the refusal", first)
    assert "Waiting or drawing now: 1 of 10" in first.out()  # /usage agrees: one kept
    assert "went wrong" not in first.out()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0, first.err()
    assert statuses(db) == ["queued"]  # kept for the next start, no crash retry counted
    assert job_rows(db)[0]["attempts"] == 0

    # A restart while the disk is still full: it starts, says so once, and draws when there is room again.
    second = start("second")
    second.wait_ready()
    assert_one_clean_line(second.err(), "warning", str(state), "full")
    second.send("/history")
    wait_until(lambda: "a heron on a full disk" in second.out(), 10, "the history", second)
    filler.unlink()
    wait_until(lambda: "picture saved" in second.out(), 120, "the kept picture to be drawn", second)
    second.proc.stdin.close()
    assert second.proc.wait(60) == 0, second.err()

    [row] = job_rows(db)
    assert row["status"] == "done" and row["delivered_at"] is not None and (state / "images" / row["image_file"]).is_file()
    for bot in (first, second):
        assert "Traceback" not in bot.err() and "⏎" not in bot.err(), bot.err()
    assert first.err().count("the disk is full (") == 1  # one line for the owner per episode, not one per message
    assert second.err().count("the disk has room again") == 1
    assert not list((state / "images").glob(".*.tmp"))


def test_a_read_only_state_dir_exits_2_and_keeps_the_history(setup, tmp_path, mounts):
    config, state, _ = setup
    rows = draw_one_picture(config, tmp_path)
    read_only_bind(mounts, state)
    done = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert_one_clean_line(done.stderr, str(state), "read-only file system", "writable")
    assert job_rows(state / "drawbot.sqlite3") == rows


def test_a_database_on_a_read_only_mount_is_called_read_only_not_damaged(tmp_path, models_dir, mounts):
    state, elsewhere = tmp_path / "state", tmp_path / "db"
    config = write_config(tmp_path / "config.toml", models_dir, state)
    config.write_text(config.read_text().replace("[storage]\n", f'[storage]\ndatabase = "{elsewhere}/bot.sqlite3"\n'))
    done = drawbot("run", "--config", str(config), cwd=tmp_path, stdin="/draw a remembered heron 3 1\n")
    assert done.returncode == 0, done.stderr
    rows = job_rows(elsewhere / "bot.sqlite3")
    assert len(rows) == 1
    read_only_bind(mounts, elsewhere)
    done = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    line = assert_one_clean_line(done.stderr, str(elsewhere / "bot.sqlite3"), "read-only")
    assert "damaged" not in line
    assert job_rows(elsewhere / "bot.sqlite3") == rows


def test_drawbot_draw_into_a_read_only_folder_is_refused_before_drawing(tmp_path, models_dir, mounts):
    config = write_config(tmp_path / "config.toml", models_dir, tmp_path / "state")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    read_only_bind(mounts, pictures)
    done = drawbot("draw", "a fox", "--steps", "1", "-o", str(pictures / "fox.png"), "--config", str(config),
                   cwd=tmp_path)
    assert done.returncode == 2
    assert_one_clean_line(done.stderr, f"cannot write into {pictures}")
    assert "drawing" not in done.stderr and "loading" not in done.stderr  # refused before the model loaded
    assert not list(pictures.iterdir())


def test_a_garbage_database_exits_2_and_is_left_alone(setup, tmp_path):
    config, state, _ = setup
    state.mkdir()
    garbage = b"\x00garbage, not SQLite\xff" * 500
    (state / "drawbot.sqlite3").write_bytes(garbage)
    done = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert_one_clean_line(done.stderr, "is not a SQLite database", "move it away")
    assert (state / "drawbot.sqlite3").read_bytes() == garbage


def test_another_programs_sqlite_file_exits_2_and_gets_none_of_our_tables(setup, tmp_path):
    config, state, _ = setup
    state.mkdir()
    with sqlite3.connect(state / "drawbot.sqlite3") as other:
        other.execute("CREATE TABLE invoices (number INTEGER, total REAL)")
        other.execute("INSERT INTO invoices VALUES (1, 9.5)")
        other.execute("PRAGMA user_version = 7")
    before = (state / "drawbot.sqlite3").read_bytes()
    done = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert_one_clean_line(done.stderr, "another program's SQLite database", "invoices")
    assert (state / "drawbot.sqlite3").read_bytes() == before  # not a byte changed: no tables, no WAL switch


def test_a_database_path_that_is_a_folder_exits_2_in_one_line(setup, tmp_path):
    """SQLite cannot open a folder: one line saying so (it used to end in aiosqlite's thread reporting to a closed
    event loop: two tracebacks after the line), and the folder is left as it was."""
    config, state, _ = setup
    (state / "drawbot.sqlite3" / "inside").mkdir(parents=True)
    done = drawbot("run", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert_one_clean_line(done.stderr, str(state / "drawbot.sqlite3"), "is a folder")
    assert "Exception in thread" not in done.stderr, done.stderr
    assert [p.name for p in (state / "drawbot.sqlite3").iterdir()] == ["inside"]


@pytest.mark.parametrize("command", [["run"], ["draw", "a fox"], ["doctor"], ["download"], ["worker"]])
def test_a_config_that_is_not_utf8_or_is_a_folder_exits_2_in_one_line(tmp_path, command):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[console]\nuser = "José"\n'.encode("latin-1"))
    folder = tmp_path / "conf.d"
    folder.mkdir()
    for config, expected in ((latin1, "not UTF-8"), (folder, "is a folder")):
        done = drawbot(*command, "--config", str(config), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert_one_clean_line(done.stderr, str(config), expected)


async def test_a_telegram_token_the_platform_refuses_exits_2_in_one_line(tmp_path, models_dir):
    from tests.fakes.telegram_api import FakeTelegramServer

    wrong = "999:not-the-token-of-this-bot"
    async with FakeTelegramServer(bot_username="DrawTestBot") as tg:
        config = write_config(tmp_path / "config.toml", models_dir, tmp_path / "state")
        config.write_text(config.read_text().replace(
            "[telegram]\nenabled = false\n", f'[telegram]\napi_base_url = "{tg.base_url}"\n'
                                               f'base_file_url = "{tg.base_file_url}"\n').replace(
            "[console]\nenabled = true\n", "[console]\nenabled = false\n"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "run", "--config", str(config), cwd=tmp_path,
            env=child_env(DRAWBOT_TELEGRAM_TOKEN=wrong), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert_one_clean_line(stderr, "Telegram refused the bot token", "DRAWBOT_TELEGRAM_TOKEN")
    assert wrong not in stderr and "not-the-token" not in stderr


async def test_a_discord_token_the_platform_refuses_exits_2_in_one_line(tmp_path, models_dir):
    from tests.fakes.discord_api import FakeDiscord

    wrong = "d3Jvbmc.not-the.token-of-this-bot"
    async with FakeDiscord() as discord_api:
        config = write_config(tmp_path / "config.toml", models_dir, tmp_path / "state")
        config.write_text(config.read_text().replace(
            "[console]\nenabled = true\n", f'[discord]\napi_base_url = "{discord_api.api_base}"\n'
                                             f'gateway_url = "{discord_api.gateway_url}"\n\n'
                                             "[console]\nenabled = false\n"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "run", "--config", str(config), cwd=tmp_path,
            env=child_env(DRAWBOT_DISCORD_TOKEN=wrong), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    stderr = err.decode()
    assert proc.returncode == 2, stderr
    assert_one_clean_line(stderr, "Discord refused the bot token", "DRAWBOT_DISCORD_TOKEN")
    assert wrong not in stderr and "not-the" not in stderr


def test_ctrl_c_in_the_console_says_what_happens_and_a_second_one_stops_at_once(setup):
    config, state, start = setup
    db = state / "drawbot.sqlite3"
    bot = start("console")
    bot.wait_ready()
    bot.send("/draw a very slow heron 5 200")
    bot.send("/draw a waiting kettle 6 1")
    wait_until(lambda: statuses(db) == ["running", "queued"], 60, "one job drawing, one waiting", bot)
    bot.proc.send_signal(signal.SIGINT)
    wait_until(lambda: "Press Ctrl-C again to stop at once" in bot.out(), 10, "the Ctrl-C notice", bot)
    assert bot.proc.poll() is None  # still finishing the picture
    bot.proc.send_signal(signal.SIGINT)
    assert bot.proc.wait(30) == 0, bot.err()  # far less than the 200 steps would take
    assert "Traceback" not in bot.err()
    assert [(row["status"], row["attempts"]) for row in job_rows(db)] == [("queued", 0), ("queued", 0)]
    # The person quitting hears what their Ctrl-C does, and not also that "the bot is restarting".
    assert "pictures still waiting stay queued" in bot.out()
    assert "restarting" not in bot.out(), bot.out()


def test_a_person_at_a_terminal_sees_no_log_lines_between_their_messages(setup, tmp_path):
    """Start-up INFO lines used to come before the runner quietened them; a terminal now gets none at all."""
    import pty

    config, state, _ = setup
    controller, terminal = pty.openpty()
    err_path = tmp_path / "tty.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", "--config", str(config)], stdin=terminal,
                                stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=child_env())
    os.close(terminal)
    try:
        wait_until(lambda: "drawbot: ready" in err_path.read_text(), 90, "the bot to start")
        os.write(controller, b"\x04")  # Ctrl-D: end of input
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    logged = [line for line in err_path.read_text().splitlines() if re.search(r" (INFO|DEBUG) ", line)]
    assert not logged, logged
