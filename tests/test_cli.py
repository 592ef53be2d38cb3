"""The `drawbot` command line as an owner types it: global options before or after the subcommand, and the README's
`make run` with a config.toml present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = {"run": [], "draw": ["a fox"], "download": [], "doctor": []}


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAWBOT_") and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_config_is_accepted_before_and_after_every_subcommand(command):
    parser = build_parser()
    before = parser.parse_args(["--config", "a.toml", command, *SUBCOMMANDS[command]])
    after = parser.parse_args([command, *SUBCOMMANDS[command], "--config", "b.toml"])
    assert before.command == after.command == command
    assert (before.config, after.config) == (Path("a.toml"), Path("b.toml"))
    # Not given at all: the attribute is missing, so the default ($DRAWBOT_CONFIG, ./config.toml) applies.
    assert getattr(parser.parse_args([command, *SUBCOMMANDS[command]]), "config", None) is None


def test_make_run_with_a_config_toml_starts_the_bot_and_answers(tmp_path, models_dir):
    """README: `cp config.example.toml config.toml && make run` (the Makefile puts --config after `run`)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed here (apt-get install make)")
    for name in ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
        os.utime(tmp_path / name, (1_000_000_000, 1_000_000_000))  # older than the stamp: make installs nothing
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    drawbot = venv / "bin" / "drawbot"  # the console script, run by this interpreter on this checkout
    drawbot.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bot.cli "$@"\n')
    drawbot.chmod(0o755)
    (venv / ".installed").touch()
    (tmp_path / "config.toml").write_text(
        f'[engine]\nmodel = "tiny"\nmodels_dir = {json.dumps(str(models_dir))}\ndevice = "cpu"\n'
        f'width = 64\nheight = 64\ndefault_steps = 1\n\n[storage]\nstate_dir = "state"\n\n'
        f'[console]\nuser = "maker"\n')
    done = subprocess.run(["make", "run", f"VENV={venv}"], cwd=tmp_path, input="/draw a red fox 7 1\n/usage\n",
                          capture_output=True, text=True, timeout=240, env=child_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--config config.toml" in done.stdout  # make echoes the command it ran
    assert "unrecognized arguments" not in done.stderr and "drawbot: ready: console" in done.stderr
    assert "picture saved: state/images/" in done.stdout and "seed 7 · 1 step" in done.stdout
    assert "Waiting or drawing now" in done.stdout
    assert (tmp_path / "state" / "drawbot.sqlite3").is_file()  # the config's state_dir, relative to the clone
