"""The local console chat: type commands on stdin, read replies on stdout. What `make run` opens without tokens.

Same commands and rules as Telegram and Discord (it is just another adapter on the core). The console cannot edit a
message, so progress comes as new lines; pictures are saved by the store and their path is printed. At the end of
input it waits for the pictures still drawing, then returns: `printf '/draw a red fox 7 4\n' | drawbot run` works.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import Protocol, TextIO

from bot import replies
from bot.chat import Button, PlainMarkup, Picture, User
from bot.core import ChatCore


def _buttons(buttons: list[Button]) -> str:
    return replies.console_buttons([(b.label, b.action, b.job_id) for b in buttons])


class ConsoleConversation:
    platform = "console"
    markup = PlainMarkup()
    progress_interval = 1.0
    typed_options = False

    def __init__(self, out: TextIO):
        self._out = out
        self._ids = itertools.count(1)

    def ref(self) -> dict:
        return {"chat": "console"}

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    async def send_text(self, text: str, *, buttons: list[Button] | None = None) -> str | None:
        self._print(text)
        if buttons:
            self._print(_buttons(buttons))
        return str(next(self._ids))

    async def edit_text(self, message_id: str, text: str) -> None:
        self._print(f"  {text}")

    async def send_picture(self, picture: Picture) -> str | None:
        self._print(replies.console_picture_saved(picture.path))
        self._print(picture.caption)
        self._print(_buttons(picture.buttons))
        return str(next(self._ids))

    async def working(self) -> None:
        return None


class LineSource(Protocol):
    """Where console lines come from: a text stream, or the runner's interruptible reader."""

    def readline(self) -> str: ...

    def isatty(self) -> bool: ...


class ConsolePlatform:
    name = "console"

    def __init__(self, core: ChatCore, *, user: str = "you", stdin: LineSource | None = None,
                 stdout: TextIO | None = None):
        self.core = core
        self.user = User(platform="console", id=user, name=user, chat_id="console", chat_kind="private")
        self._stdin = stdin or sys.stdin
        self._conv = ConsoleConversation(stdout or sys.stdout)

    def say(self, text: str) -> None:
        """A line from the bot itself (not an answer to a command), e.g. what Ctrl-C does."""
        self._conv._print(text)

    def conversation(self, ref: dict) -> ConsoleConversation:
        return self._conv

    async def stop(self) -> None:
        return None  # nothing to disconnect

    async def run(self) -> None:
        """Answer each input line until end of input, then wait for pictures still being drawn."""
        loop = asyncio.get_running_loop()
        interactive = self._stdin.isatty()
        if interactive:
            self._conv._print(replies.CONSOLE_GREETING)
        while True:
            line = await loop.run_in_executor(None, self._stdin.readline)
            if not line:
                break
            line = line.rstrip("\r\n")
            if line.strip():
                try:
                    await self.core.on_text(self.user, self._conv, line)
                except Exception as exc:  # never lose the console to one bad line
                    self._conv._print(replies.console_line_failed(type(exc).__name__))
        await self.core.drain()
