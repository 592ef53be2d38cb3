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
SUBCOMMANDS = {"run": [], "draw": ["a fox"], "download": [], "doctor": [], "worker": []}


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAWBOT_") and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_config_is_accepted_before_and_after_every_subcommand(command):
    parser = build_parser()
    assert set(SUBCOMMANDS) == set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
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


def drawbot(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=child_env(), timeout=timeout)


def tiny_draw_args(models_dir: Path, tmp_path: Path) -> list[str]:
    config = tmp_path / "draw.toml"
    config.write_text(f'[engine]\nmodel = "tiny"\nmodels_dir = {json.dumps(str(models_dir))}\ndevice = "cpu"\n'
                      'width = 64\nheight = 64\n')
    return ["--config", str(config), "--steps", "1", "--seed", "5"]


@pytest.mark.parametrize(("args", "expected"), [
    (["", "-o", "x.png"], "Tell me what to draw"),  # the same rule (and words) as chat
    (["  \u3164 ", "-o", "x.png"], "Tell me what to draw"),
    (["a fox", "-o", "missing_dir/x.png"], "the folder missing_dir does not exist"),
    (["a fox", "-o", "x.gif"], ".png, .jpg, .jpeg, .webp"),
])
def test_draw_refuses_bad_input_before_drawing(tmp_path, models_dir, args, expected):
    done = drawbot("draw", *args, *tiny_draw_args(models_dir, tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and expected in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1  # one line; nothing loaded, nothing drawn
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.gif"))


@pytest.mark.parametrize(("name", "image_format"), [("fox.jpg", "JPEG"), ("fox.webp", "WEBP")])
def test_draw_writes_the_format_the_suffix_names(tmp_path, models_dir, name, image_format):
    from PIL import Image

    done = drawbot("draw", "a red fox", "-o", name, *tiny_draw_args(models_dir, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / name) as image:
        assert image.format == image_format and image.size == (64, 64)
        if image_format == "PNG":
            parameters = image.text["parameters"]
        else:  # A1111's place for JPEG/WebP: EXIF UserComment, UTF-16 after an 8-byte "UNICODE" header
            parameters = image.getexif().get_ifd(0x8769)[0x9286][8:].decode("utf-16-be")
    assert parameters.startswith("a red fox\n") and "Seed: 5," in parameters


def test_download_without_network_says_so_in_one_line_and_leaves_no_temp_folder(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) to cut the network off; CI runs as root")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not allowed here (no network namespaces); CI can")
    config = tmp_path / "dl.toml"
    config.write_text(f'[engine]\nmodels_dir = {json.dumps(str(tmp_path / "models"))}\n')
    done = subprocess.run(["unshare", "-n", sys.executable, "-m", "bot.cli", "download", "--config", str(config)],
                          capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("drawbot:")]
    assert "cannot download MAILAND/majicflus_v1 from ModelScope" in line and "check the network" in line
    assert not list((tmp_path / "models").rglob("._____temp"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", [["draw", "a fox", "-o", "fox.png"], ["run"], ["worker", "--device", "cuda:3"]])
def test_a_gpu_the_machine_lacks_is_a_config_error_in_one_line(tmp_path, models_dir, command):
    """engine.device = "cuda" (or a worker's --device cuda:3) on a machine whose torch sees no such GPU: exit 2, one
    line with the fix, no traceback, nothing drawn."""
    config = tmp_path / "c.toml"
    config.write_text(f'[engine]\nmodel = "tiny"\ndevice = "cuda"\nmodels_dir = "{models_dir}"\n'
                      f'[cluster]\nredis_url_file = "{tmp_path / "redis-url"}"\n')
    (tmp_path / "redis-url").write_text("redis://127.0.0.1:1/0\n")
    done = drawbot(*command, "--config", str(config), cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1 and "sees no CUDA GPU" in errors[0]
    assert 'set engine.device = "auto"' in errors[0] or "numbered from 0" in errors[0], errors[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "fox.png").exists()
