"""Logging set-up: one line per event on stderr, journald-friendly, with every configured bot token scrubbed.

Under systemd (JOURNAL_STREAM names the stream we write to) a line starts with a `<N>` syslog priority and carries no
timestamp: the journal adds its own time and reads the priority, so `journalctl -u drawbot -p warning` works.
Elsewhere a line starts with the local time and the level. A traceback is folded into its record's line (newlines
shown as " ⏎ "), so one event is one journal entry.

Tokens: the bot never logs one on purpose; `RedactSecrets` is the safety net that replaces any configured token in
every record (message, arguments, traceback) before any handler writes it. Prompts are never logged at INFO or above:
the core logs job ids, user ids and numbers, and this module writes only warnings and errors of the chatty HTTP
libraries (whose request lines hold the Telegram token in the URL).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Literal, TextIO

from bot.config import Config, ConfigError, DiscordSettings, TelegramSettings, read_token

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6
"""Shorter values are not scrubbed: no real token is that short, and scrubbing "abc" would mangle ordinary text."""
NEWLINE_MARK = " ⏎ "

# Libraries that log each HTTP request at INFO, URL included (python-telegram-bot's URLs contain the bot token):
# one journal line per progress edit and per long poll is noise, so only their warnings and errors are written.
QUIET_LOGGERS = ("httpx", "httpcore", "hpack", "websockets", "aiohttp.access")

_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald reads from a `<N>` prefix (2 crit ... 6 info, 7 debug)."""
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


class RedactSecrets(logging.Filter):
    """Replaces every secret it knows with `[redacted]` in each record it sees. Never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        secret = (secret or "").strip()
        if len(secret) >= MIN_SECRET_LENGTH and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)  # a token that contains another is replaced whole

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # wrong arguments for the format: keep what there is rather than lose the record
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class QuietLibraries(logging.Filter):
    """Drops records below WARNING from the chatty HTTP libraries (for this handler only: their loggers keep their
    levels, so nothing else that listens to them changes)."""

    def __init__(self, names: Iterable[str] = QUIET_LOGGERS):
        super().__init__()
        self._prefixes = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == p or record.name.startswith(p + ".") for p in self._prefixes)


class OneLineFormatter(logging.Formatter):
    """`<6>bot.core: message` for the journal, `2025-01-31 12:00:00 INFO bot.core: message` elsewhere."""

    def __init__(self, *, journal: bool):
        fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n")
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", NEWLINE_MARK)
        return f"<{syslog_priority(record.levelno)}>{text}" if self.journal else text


class DrawbotHandler(logging.StreamHandler):
    """The one handler `setup_logging` installs (its own class, so a second set-up replaces it, nothing else).

    Without a stream it writes to whatever `sys.stderr` is at the time of each record, like logging's last-resort
    handler, so a replaced stderr (a test runner's capture) never leaves it writing to a closed file."""

    def __init__(self, stream: TextIO | None = None):
        logging.Handler.__init__(self)
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._stream = value


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected `stream` to the journal: JOURNAL_STREAM holds its `device:inode`.

    A stream without a file descriptor cannot be compared, so JOURNAL_STREAM being set decides alone."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
    except ValueError:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True
    return (stat.st_dev, stat.st_ino) == (device, inode)


def configured_tokens(config: Config) -> list[str]:
    """Every bot token the config points at (env or token_file), enabled or not: all of them get scrubbed."""
    tokens = []
    platforms: tuple[tuple[Literal["telegram", "discord"], TelegramSettings | DiscordSettings], ...] = (
        ("telegram", config.telegram), ("discord", config.discord))
    for platform, settings in platforms:
        try:
            token = read_token(platform, settings.token_file)
        except ConfigError:  # an unreadable token file is reported by `drawbot run` / `drawbot doctor`
            token = None
        if token:
            tokens.append(token)
    return tokens


def setup_logging(level: str | int = "INFO", *, secrets: Iterable[str] = (), stream: TextIO | None = None,
                  journal: bool | None = None) -> RedactSecrets:
    """Send every log record at `level` and above to `stream` (default stderr), one line each, secrets scrubbed.

    Returns the redaction filter, so a secret learnt later can be added. Calling it again replaces the handler."""
    journal = writes_to_journal(sys.stderr if stream is None else stream) if journal is None else journal
    redact = RedactSecrets(secrets)
    handler = DrawbotHandler(stream)
    handler.setFormatter(OneLineFormatter(journal=journal))
    handler.addFilter(QuietLibraries())
    handler.addFilter(redact)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, DrawbotHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings become one-line, scrubbed records too
    return redact
