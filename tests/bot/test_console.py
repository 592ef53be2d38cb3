"""The console chat: the same commands over stdin/stdout, and the one-liner from the README."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Config, ConsoleSettings, LimitSettings, StorageSettings
from bot.runner import run
from engine.png import read_parameters

DRAWBOT = Path(sys.executable).with_name("drawbot")


def test_readme_one_liner_draws_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAWBOT_")}
    done = subprocess.run(f"printf '/draw a red fox 7 4\\n' | {DRAWBOT} run", shell=True, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "tiny test model" in done.stderr  # no weights, no tokens: it says so plainly
    saved = re.search(r"picture saved: (\S+\.png)", done.stdout)
    assert saved, done.stdout
    png = (tmp_path / saved.group(1)).read_bytes()
    text = read_parameters(png)
    assert text.startswith("a red fox\n") and "Seed: 7," in text and "Steps: 4," in text
    assert "seed 7 · 4 steps" in done.stdout


async def test_console_session_speaks_every_command(tmp_path, tiny_settings):
    config = Config(
        engine=tiny_settings,
        storage=StorageSettings(state_dir=tmp_path / "state"),
        limits=LimitSettings(cooldown_seconds=0),
        console=ConsoleSettings(enabled=True, user="tester"),
    )
    script = "\n".join([
        "/help",
        "/cancel",
        "hello there",
        "/draw",
        "/draw a fox --steps 999",
        "/draw <i>a fox</i> & @everyone 🦊 --seed 42 --steps 2",
        "/history",
        "/usage",
        "/nonsense",
    ]) + "\n"
    out = io.StringIO()
    code = await run(config, model_override="tiny", stdin=io.StringIO(script), stdout=out)
    text = out.getvalue()
    assert code == 0
    assert "/draw <prompt> [seed] [steps]" in text  # help
    assert "Send /draw followed by what to draw" in text  # plain text gets a hint
    assert "Tell me what to draw" in text  # empty prompt
    assert "999" in text and "steps" in text.lower()  # out-of-range steps explained
    assert "<i>a fox</i> & @everyone 🦊" in text and "seed 42 · 2 steps" in text  # verbatim, with the seed
    assert "Your last pictures:" in text and "This hour: 1 of" in text
    assert "I don't know /nonsense" in text
    assert "You have nothing waiting or drawing." in text
    saved = re.search(r"picture saved: (\S+\.png)", text)
    assert saved and Path(saved.group(1)).is_file()


async def test_again_takes_the_number_history_shows_and_acknowledges_once(tmp_path, tiny_settings):
    # Room for three pictures at once: with the default two, whether /again 2 was drawn or refused depended on how
    # soon the first picture finished (CI once saw it drawn, where the test had only ever seen it refused).
    config = Config(engine=tiny_settings, storage=StorageSettings(state_dir=tmp_path / "state"),
                    limits=LimitSettings(cooldown_seconds=0, max_active_per_user=3),
                    console=ConsoleSettings(enabled=True, user="tester"))
    script = "/draw an old lighthouse 11 1\n/draw a new kettle 22 2\n/history\n/again 2\n/again 9\n"
    out = io.StringIO()
    assert await run(config, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    # /history lists newest first: 2 is the lighthouse, drawn again with its seed.
    assert "2. " in text and "“an old lighthouse”" in text
    assert "can't find that picture" not in text and "no longer valid" not in text and "You already have" not in text
    # The lighthouse's line in /history, then its two pictures' captions: the first and the one /again 2 drew.
    assert text.count("seed 11 · 1 step ·") == 3 and "1 steps" not in text and "seed 22 · 2 steps ·" in text
    assert "Queued!" not in text  # the queue message is the one acknowledgement
    assert "/again 9 is not one of them" in text


async def test_again_without_a_number_says_what_to_send(tmp_path, tiny_settings):
    """`/again` alone (or a word after it) used to answer "That button is no longer valid": no button was pressed."""
    config = Config(engine=tiny_settings, storage=StorageSettings(state_dir=tmp_path / "state"),
                    limits=LimitSettings(cooldown_seconds=0), console=ConsoleSettings(enabled=True, user="tester"))
    out = io.StringIO()
    assert await run(config, stdin=io.StringIO("/again\n/reroll the-fox\n"), stdout=out) == 0
    text = out.getvalue()
    assert "button" not in text
    assert "Send /again with the number /history shows next to the picture, e.g. /again 1" in text
    assert "Send /reroll with the number /history shows next to the picture, e.g. /reroll 1" in text


@pytest.mark.slow
async def test_150_draw_lines_with_a_queue_cap_above_the_engines_queue_are_all_delivered(tmp_path, tiny_settings):
    """Issue 17, as an owner ran it: queue_cap 200 and no per-user limits, 150 /draw lines typed at once. The engine's
    own queue (engine.max_queue, 100 by default) must not refuse what the store accepted: all 150 are drawn."""
    config = Config(
        engine=tiny_settings.model_copy(update={"max_queue": 100, "mode": "resident"}),  # as the tiny fallback runs
        storage=StorageSettings(state_dir=tmp_path / "state"),
        limits=LimitSettings(queue_cap=200, cooldown_seconds=0, max_active_per_user=200, per_hour=0, per_day=0),
        console=ConsoleSettings(enabled=True, user="tester"),
    )
    script = "".join(f"/draw fox number {n} --seed {n} --steps 1\n" for n in range(150))  # 64x64: quick
    out = io.StringIO()
    assert await run(config, model_override="tiny", stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert len(re.findall(r"^Got it - you are", text, re.M)) == 150  # the acks (edits are indented)
    assert "failed" not in text and "queue is full" not in text
    assert text.count("picture saved: ") == 150
    # Places in the store's queue, beyond the engine's 100 (lines are read while pictures are drawn, so not quite 150).
    assert max(int(n) for n in re.findall(r"#(\d+) in the queue", text)) > 100
