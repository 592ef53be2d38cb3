"""The web platform's pieces that need no browser: signed sessions, who may listen where, when the page is on."""

from __future__ import annotations

import io

import pytest

from bot.adapters.web.access import WebAccess, is_loopback
from bot.adapters.web.drawing import seed_value
from bot.adapters.web.sessions import MAX_AGE, Sessions, load_key
from bot.config import Config, ConfigError, WebSettings
from bot.runner import choose_web


def test_a_session_survives_a_restart_and_a_forged_or_old_one_does_not(tmp_path):
    now = [1_800_000_000.0]
    first = Sessions(load_key(tmp_path), clock=lambda: now[0])
    cookie, visitor = first.new_browser()
    assert visitor.user_id.startswith("b-") and not visitor.is_admin
    again = Sessions(load_key(tmp_path), clock=lambda: now[0])  # a restart: the key is read back from the state dir
    assert again.read(cookie) == visitor
    assert (tmp_path / "web-session.key").stat().st_mode & 0o077 == 0
    payload, _, signature = cookie.rpartition("|")
    assert again.read(payload.replace(visitor.user_id, "@owner") + "|" + signature) is None  # forged
    assert Sessions(b"another key" * 3).read(cookie) is None
    assert again.read("garbage") is None and again.read(None) is None
    now[0] += MAX_AGE + 1
    assert again.read(cookie) is None


def test_only_an_admin_login_gets_the_admin_form(tmp_path):
    sessions = Sessions(load_key(tmp_path))
    assert sessions.read(sessions.issue("@owner")[0]).is_admin
    assert not sessions.read(sessions.issue("alice")[0]).is_admin
    assert sessions.read(sessions.issue("bad name!")[0]) is None


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("mypc.lan", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_off_loopback_needs_a_password(monkeypatch, tmp_path):
    monkeypatch.delenv("DRAWBOT_WEB_PASSWORD", raising=False)
    monkeypatch.delenv("DRAWBOT_WEB_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="DRAWBOT_WEB_PASSWORD"):
        WebAccess.from_settings(WebSettings(host="0.0.0.0"))
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    access = WebAccess.from_settings(WebSettings(host="0.0.0.0", password_file=secret))
    assert access.page_password == "s3cret" and "s3cret" not in repr(access)
    assert WebAccess.from_settings(WebSettings()).page_password is None


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_page_is_on_next_to_an_interactive_console_and_when_asked():
    assert choose_web(Config(), True, Tty()) == (WebAccess("127.0.0.1", 6006), True)  # `make run`: ends with it
    assert choose_web(Config(), True, io.StringIO()) == (None, False)  # piped input, tests, scripts
    assert choose_web(Config(), False, Tty()) == (None, False)
    on = Config(web=WebSettings(enabled=True, port=7000))
    assert choose_web(on, False, io.StringIO()) == (WebAccess("127.0.0.1", 7000), False)
    assert choose_web(Config(web=WebSettings(enabled=False)), True, Tty()) == (None, False)


@pytest.mark.parametrize("typed, core_gets", [(-1, None), (None, None), ("", None), (7.0, 7), (7, 7), (1.5, "1.5"),
                                              (2**40, 2**40)])
def test_the_seed_field_reaches_the_core_as_typed(typed, core_gets):
    assert seed_value(typed) == core_gets


async def test_a_busy_port_costs_one_line_and_the_bot_runs_on(tmp_path):
    import socket

    from bot.adapters.web.server import WebPlatform

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said: list[str] = []
        platform = WebPlatform(None, WebAccess("127.0.0.1", port), tmp_path, companion=True,  # type: ignore[arg-type]
                               say=said.append)
        await platform.run()  # returns instead of raising: the runner keeps the other platforms going
    assert len(said) == 1 and f"cannot listen on 127.0.0.1:{port}" in said[0] and "\n" not in said[0]
