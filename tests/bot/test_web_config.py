"""The [web] section: passwords never in the TOML, web admins accepted, secrets from the environment or a file."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, LimitSettings, load_config, read_secret


@pytest.mark.parametrize("key, variable", [("password", "DRAWBOT_WEB_PASSWORD"),
                                           ("admin_password", "DRAWBOT_WEB_ADMIN_PASSWORD")])
def test_a_password_in_the_toml_is_refused_with_the_fix(tmp_path, key, variable):
    path = tmp_path / "config.toml"
    path.write_text(f'[web]\nhost = "0.0.0.0"\n{key} = "hunter2"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"[web].{key}" in message and variable in message and f"{key}_file" in message
    assert "hunter2" not in message


def test_web_users_can_be_admins():
    assert LimitSettings(admins=["web:alice"]).admins == ["web:alice"]


def test_secret_from_environment_then_file(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.delenv("DRAWBOT_WEB_PASSWORD", raising=False)
    assert read_secret("DRAWBOT_WEB_PASSWORD", None, "[web].password_file") is None
    assert read_secret("DRAWBOT_WEB_PASSWORD", secret, "[web].password_file") == "from-file"
    monkeypatch.setenv("DRAWBOT_WEB_PASSWORD", "from-env")
    assert read_secret("DRAWBOT_WEB_PASSWORD", secret, "[web].password_file") == "from-env"
    monkeypatch.delenv("DRAWBOT_WEB_PASSWORD")
    with pytest.raises(ConfigError, match=r"\[web\].password_file: cannot read"):
        read_secret("DRAWBOT_WEB_PASSWORD", tmp_path / "missing", "[web].password_file")
