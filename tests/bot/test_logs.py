"""Logging: one line per event, journald style under systemd, tokens scrubbed from every record, prompts never at
INFO (the end-to-end check on a real `drawbot run` is in tests/test_service.py)."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest

from bot.config import Config, DiscordSettings, TelegramSettings
from bot.logs import (
    REDACTED,
    DrawbotHandler,
    RedactSecrets,
    configured_tokens,
    setup_logging,
    syslog_priority,
    writes_to_journal,
)

TOKEN = "123456789:AAFakeTokenForTestsOnly-abcdefghijklmnop"
OTHER = "MTk4NjIyNDgzNDcxOTI1MjQ4.Gx1aBc.fake-discord-token-for-tests-only"


@pytest.fixture
def logged():
    """Install drawbot's logging into a buffer for one test; put the root logger back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buffer = io.StringIO()

    def install(**kw):
        return setup_logging("INFO", stream=buffer, **kw)

    yield install, buffer
    for handler in [h for h in root.handlers if isinstance(h, DrawbotHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    assert [h for h in root.handlers if h not in handlers] == []


def test_terminal_lines_have_time_level_and_logger(logged):
    install, buffer = logged
    install(journal=False)
    logging.getLogger("bot.core").info("done job=%s seconds=%.1f", "abc", 3.25)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO bot\.core: done job=abc seconds=3\.2\n",
                        buffer.getvalue())


def test_journal_lines_carry_the_priority_and_no_time(logged):
    install, buffer = logged
    install(journal=True)
    logging.getLogger("bot.core").warning("delivery failed job=%s", "abc")
    logging.getLogger("bot.runner").info("stopping")
    logging.getLogger("bot.runner").debug("not shown at INFO")
    assert buffer.getvalue().splitlines() == ["<4>bot.core: delivery failed job=abc", "<6>bot.runner: stopping"]


def test_a_traceback_stays_on_its_record_line(logged):
    install, buffer = logged
    install(journal=True)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("bot.core").exception("following job %s failed", "abc")
    [line] = buffer.getvalue().splitlines()
    assert line.startswith("<3>bot.core: following job abc failed ⏎ Traceback (most recent call last):")
    assert "RuntimeError: boom ⏎ second line" in line


def test_tokens_are_scrubbed_from_messages_arguments_and_tracebacks(logged):
    install, buffer = logged
    install(secrets=[TOKEN, OTHER, "", "short"])
    log = logging.getLogger("telegram.ext")
    log.warning("POST https://api.telegram.org/bot%s/getMe failed", TOKEN)
    log.error(f"token {OTHER} rejected")
    try:
        raise ValueError(f"bad url https://api.telegram.org/bot{TOKEN}/sendPhoto")
    except ValueError:
        log.exception("sending failed")
    log.info("a short word stays")  # secrets under MIN_SECRET_LENGTH are not scrubbed: no real token is that short
    text = buffer.getvalue()
    assert TOKEN not in text and OTHER not in text and TOKEN.split(":")[1] not in text
    assert text.count(REDACTED) == 3 and "a short word stays" in text
    assert f"bot{REDACTED}/getMe" in text


def test_http_request_lines_are_kept_below_info(logged):
    # httpx logs every request URL at INFO, and Telegram's URLs hold the token.
    install, buffer = logged
    install(secrets=[TOKEN])
    logging.getLogger("httpx").info("HTTP Request: POST https://api.telegram.org/bot%s/getUpdates", TOKEN)
    assert buffer.getvalue() == ""
    logging.getLogger("httpx").warning("HTTP Request: POST https://api.telegram.org/bot%s/getUpdates", TOKEN)
    assert REDACTED in buffer.getvalue() and TOKEN not in buffer.getvalue()
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.INFO  # only our handler drops them


def test_a_second_setup_replaces_the_first(logged):
    install, buffer = logged
    install()
    install()
    logging.getLogger("bot").info("once")
    assert buffer.getvalue().count("once") == 1


def test_redaction_never_drops_a_record_even_with_broken_arguments():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "needs two %s %s", (TOKEN,), None)
    assert RedactSecrets([TOKEN]).filter(record) is True
    assert TOKEN not in record.getMessage() and "needs two" in record.getMessage()


def test_journal_is_detected_only_for_the_stream_systemd_named(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        assert writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not writes_to_journal(stream, {})
        assert not writes_to_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert writes_to_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # nothing to compare: trust the variable


def test_configured_tokens_come_from_env_and_files_enabled_or_not(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", TOKEN)
    monkeypatch.delenv("DRAWBOT_DISCORD_TOKEN", raising=False)
    token_file = tmp_path / "discord.token"
    token_file.write_text(OTHER + "\n")
    config = Config(telegram=TelegramSettings(enabled=False), discord=DiscordSettings(token_file=token_file))
    assert configured_tokens(config) == [TOKEN, OTHER]
    missing = Config(discord=DiscordSettings(token_file=tmp_path / "nope"))
    assert configured_tokens(missing) == [TOKEN]  # an unreadable file is the doctor's business, not a crash


def test_syslog_priorities():
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]
