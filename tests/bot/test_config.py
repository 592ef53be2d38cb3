"""Config errors fail at start-up naming the file, the key and what is allowed; tokens never come from the TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main
from bot.config import Config, ConfigError, load_config, read_token


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_is_valid_and_matches_the_defaults():
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    assert load_config(example) == Config()


def test_missing_file_means_defaults():
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[engine]\nmode = \"turbo\"\n", "[engine].mode: Input should be 'offload'"),
        ("[engine]\nvram_budget_gb = \"eight\"\n", "[engine].vram_budget_gb:"),
        ("[engine]\nwidth = 1000\n", "[engine].width: Input should be a multiple of 16"),
        ("[engine]\nmin_steps = 10\ndefault_steps = 5\n", "min_steps <= default_steps <= max_steps"),
        ("[limits]\nper_hour = -1\n", "[limits].per_hour: Input should be greater than or equal to 0"),
        ("[limits]\nadmins = [\"12345\"]\n", "should look like 'telegram:12345'"),
        ("[policy]\nblocked_words = [\"(unclosed\"]\n", "is not a valid regular expression"),
        ("[limts]\nper_hour = 3\n", "limts: unknown key"),
        ("[engine]\nvram_budget = 8\n", "[engine].vram_budget: unknown key"),
        ("[engine\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_rule(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("platform", ["telegram", "discord"])
def test_token_in_toml_is_refused_with_the_right_way(tmp_path, platform):
    path = write(tmp_path, f'[{platform}]\ntoken = "123:secret"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"DRAWBOT_{platform.upper()}_TOKEN" in message and "token_file" in message
    assert "123:secret" not in message


def test_token_from_env_wins_then_file(tmp_path, monkeypatch):
    token_file = tmp_path / "tg.token"
    token_file.write_text("111:from-file\n")
    monkeypatch.delenv("DRAWBOT_TELEGRAM_TOKEN", raising=False)
    assert read_token("telegram", None) is None
    assert read_token("telegram", token_file) == "111:from-file"
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", "222:from-env")
    assert read_token("telegram", token_file) == "222:from-env"


def test_unreadable_or_empty_token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DRAWBOT_DISCORD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token("discord", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token("discord", empty)


def test_cli_reports_config_error_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[engine]\nmode = 3\n")
    assert main(["--config", str(path), "doctor"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "[engine].mode" in err
