"""What the core needs from a chat platform, and what it hands back. Adapters implement these; the core never sees
a platform object.

A `Conversation` is one chat the bot talks in (a Telegram chat, a Discord interaction/channel, the console). It can be
rebuilt from `ref()` after a restart, so a job accepted before a crash is still delivered to the right place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class TokenRefused(Exception):
    """The chat platform refused the bot token: a set-up problem for the owner (`drawbot run` exits 2 with this
    one-line message, which never holds the token)."""


class Flooded(Exception):
    """`Conversation.edit_text` was refused by the platform's flood control; try again after `retry_after` seconds.
    The core's pacer (bot/core/pacing.py) waits that long and widens its interval; adapters only report it."""

    def __init__(self, retry_after: float):
        super().__init__(f"flood control: retry after {retry_after:g} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    platform: str
    id: str
    name: str = ""
    chat_id: str = ""
    chat_kind: str = "private"  # "private" | "group" | "channel"

    @property
    def key(self) -> str:
        """`platform:id`, the form config uses for admins, bans and allowlists."""
        return f"{self.platform}:{self.id}"


@dataclass(frozen=True)
class Button:
    label: str
    action: str  # "reroll" | "again" | "delete" | "png"
    job_id: str

    @property
    def data(self) -> str:
        """Callback payload: short, ASCII, within Telegram's 64-byte limit, parsed back by `parse_button`."""
        return f"{self.action}:{self.job_id}"


def parse_button(data: str) -> tuple[str, str] | None:
    action, sep, job_id = data.partition(":")
    if not sep or not job_id.isalnum() or action not in ("reroll", "again", "delete", "png"):
        return None
    return action, job_id


@dataclass(frozen=True)
class Picture:
    png: bytes
    caption: str  # already in the conversation's markup
    job_id: str
    buttons: list[Button] = field(default_factory=list)
    as_file: bool = False  # also/instead send the lossless PNG as a file
    spoiler: bool = False
    path: str | None = None  # where the store keeps it (the console shows this)
    mention_user: str | None = None  # platform user id to address when delivered outside the original reply


class Markup(Protocol):
    """How a platform shows text. The core writes every reply through this, so user text is always escaped."""

    def escape(self, text: str) -> str: ...

    def code(self, text: str) -> str: ...

    def bold(self, text: str) -> str: ...


class PlainMarkup:
    def escape(self, text: str) -> str:
        return text

    def code(self, text: str) -> str:
        return text

    def bold(self, text: str) -> str:
        return text


class Conversation(Protocol):
    # Read-only members: an adapter may provide each as a class attribute, an instance attribute or a property.
    @property
    def platform(self) -> str: ...

    @property
    def markup(self) -> Markup: ...

    @property
    def progress_interval(self) -> float:
        """Seconds between progress edits of one message (the platform's flood limits); the core's pacer keeps it."""

    @property
    def typed_options(self) -> bool:
        """True where /draw has typed options (Discord slash commands) rather than text flags."""

    def ref(self) -> dict: ...

    async def send_text(self, text: str, *, buttons: list[Button] | None = None) -> str | None:
        """Send a message; returns its id (for later edits) or None."""

    async def edit_text(self, message_id: str, text: str) -> None:
        """Change a message. Raises `Flooded` when the platform asks to wait; other errors are logged by the core
        (progress is best effort)."""

    async def send_picture(self, picture: Picture) -> str | None: ...

    async def working(self) -> None:
        """Show that a picture is being made (Telegram's upload_photo action); may do nothing."""


class Platform(Protocol):
    @property
    def name(self) -> str: ...

    def conversation(self, ref: dict) -> Conversation:
        """Rebuild a conversation from `Conversation.ref()` (after a restart)."""


class ServedPlatform(Platform, Protocol):
    """A platform as the runner drives it: `run()` until the platform ends or is cancelled, then `stop()`."""

    async def run(self) -> None: ...

    async def stop(self) -> None:
        """Disconnect; called once at shutdown, after the engine stopped and the last pictures were delivered."""
