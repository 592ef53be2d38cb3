"""One Discord conversation: the replies to one interaction, and the channel it happened in.

Everything goes through the interaction's webhook while its token lives: the first follow-up after the
`defer(thinking=True)` replaces the "thinking…" message (so the original response shows the queue position), later
edits change it by id, the picture comes as another follow-up. An interaction token dies after 15 minutes; once it
is dead (HTTP 401 / code 50027) or the conversation is older than `TOKEN_SAFE_SECONDS`, messages go to the channel
instead (`channel.send`), the picture mentioning only its requester.

`ref()` holds all of that as JSON, so `DiscordPlatform.conversation(ref)` rebuilds it after a restart.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import discord

from bot import replies
from bot.adapters.discord.buttons import job_view
from bot.adapters.discord.markup import NO_PINGS, DiscordMarkdown, only_user
from bot.chat import Button, Picture

log = logging.getLogger(__name__)

TOKEN_SAFE_SECONDS = 14 * 60.0
"""An interaction token lives 15 minutes; past this age the channel is used without trying the token first."""
MAX_CONTENT = 2000
MAX_EMBED_DESCRIPTION = 4096
_DEAD_TOKEN_CODES = (50027, 10015)  # Invalid Webhook Token, Unknown Webhook


class DiscordLink(Protocol):
    """What a conversation needs from the running client (the platform implements it)."""

    async def interaction_webhook(self, application_id: int, token: str) -> discord.Webhook: ...

    async def messageable(self, channel_id: int, guild_id: int | None) -> discord.PartialMessageable: ...


@dataclass(frozen=True)
class ConversationRef:
    """Where and for whom to answer; JSON-able so a job accepted before a restart still reaches its requester."""

    application_id: int
    token: str
    """The interaction token (a 15-minute webhook credential, not the bot token)."""
    channel_id: int
    guild_id: int | None
    requester_id: int
    created_at: float
    """Epoch seconds when the interaction was created (its snowflake time)."""
    ephemeral: bool = False
    """Only the requester sees the replies; they are never moved to the channel."""

    def to_dict(self) -> dict[str, Any]:
        # Snowflakes as strings: JSON readers elsewhere may not keep 64-bit integers exact.
        return {"v": 1, "application_id": str(self.application_id), "token": self.token,
                "channel_id": str(self.channel_id),
                "guild_id": None if self.guild_id is None else str(self.guild_id),
                "requester_id": str(self.requester_id), "created_at": self.created_at, "ephemeral": self.ephemeral}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversationRef:
        """Raises ValueError naming what is missing or malformed."""
        try:
            guild = data.get("guild_id")
            return cls(application_id=int(data["application_id"]), token=str(data["token"]),
                       channel_id=int(data["channel_id"]), guild_id=None if guild is None else int(guild),
                       requester_id=int(data["requester_id"]), created_at=float(data["created_at"]),
                       ephemeral=bool(data.get("ephemeral", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a Discord conversation reference ({type(exc).__name__}: {exc})") from None


def token_is_dead(exc: discord.HTTPException) -> bool:
    return exc.status == 401 or exc.code in _DEAD_TOKEN_CODES


class TokenExpired(Exception):
    """A private (ephemeral) reply could not be sent: its interaction token is dead, and the channel is public."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DiscordConversation:
    """The core's `Conversation` for one interaction (see the module docstring)."""

    platform = "discord"
    markup = DiscordMarkdown()
    typed_options = True  # /draw prompt: seed: steps: ... (the help text says so)

    def __init__(self, link: DiscordLink, ref: ConversationRef, *, progress_interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._link = link
        self._ref = ref
        self.progress_interval = progress_interval
        self._clock = clock
        self._token_dead = False
        self._frozen: set[str] = set()  # messages that can no longer be edited (e.g. ephemeral after expiry)
        self.sent = 0
        """Messages sent so far (the button handler answers privately only when nothing was sent)."""

    def ref(self) -> dict[str, Any]:
        return self._ref.to_dict()

    def token_usable(self) -> bool:
        return not self._token_dead and self._clock() - self._ref.created_at < TOKEN_SAFE_SECONDS

    def _lose_token(self, exc: discord.HTTPException) -> None:
        if not self._token_dead:
            log.info("interaction token expired (HTTP %s, code %s); answering in the channel", exc.status, exc.code)
        self._token_dead = True

    async def _webhook(self) -> discord.Webhook:
        return await self._link.interaction_webhook(self._ref.application_id, self._ref.token)

    async def _channel(self) -> discord.PartialMessageable:
        if self._ref.ephemeral:
            raise TokenExpired("this private reply can no longer be sent (its interaction expired)")
        return await self._link.messageable(self._ref.channel_id, self._ref.guild_id)

    # -- the Conversation protocol ------------------------------------------------------------------------------
    async def send_text(self, text: str, *, buttons: list[Button] | None = None) -> str | None:
        content = _clip(text, MAX_CONTENT)
        view = job_view(buttons or [])
        extra: dict[str, Any] = {} if view is None else {"view": view}
        return await self._send(
            lambda webhook: webhook.send(content, wait=True, ephemeral=self._ref.ephemeral,
                                         allowed_mentions=NO_PINGS, **extra),
            lambda channel: channel.send(content, allowed_mentions=NO_PINGS, **extra))

    async def edit_text(self, message_id: str, text: str) -> None:
        kind, _, raw = message_id.partition(":")
        if message_id in self._frozen or not raw.isdigit():
            return
        content = _clip(text, MAX_CONTENT)
        if kind == "w" and self.token_usable():
            try:
                await (await self._webhook()).edit_message(int(raw), content=content, allowed_mentions=NO_PINGS)
                return
            except discord.HTTPException as exc:
                if not token_is_dead(exc):
                    if exc.code == 10008:  # Unknown Message: someone deleted it; stop trying
                        self._frozen.add(message_id)
                        return
                    raise
                self._lose_token(exc)
        if self._ref.ephemeral:
            self._frozen.add(message_id)
            return
        # The bot authored the message (interaction responses included), so the channel endpoint can still edit it.
        try:
            channel = await self._channel()
            await channel.get_partial_message(int(raw)).edit(content=content, allowed_mentions=NO_PINGS)
        except (discord.NotFound, discord.Forbidden) as exc:
            log.debug("message %s can no longer be edited: %s", message_id, exc)
            self._frozen.add(message_id)

    async def send_picture(self, picture: Picture) -> str | None:
        buttons = [*picture.buttons, Button(replies.DELETE_LABEL, "delete", picture.job_id)]
        requester = _user_id(picture.mention_user) or self._ref.requester_id
        return await self._send(
            lambda webhook: webhook.send(wait=True, allowed_mentions=NO_PINGS,
                                         **self._picture_message(picture, buttons)),
            lambda channel: channel.send(replies.here_is_your_picture(f"<@{requester}>"), allowed_mentions=only_user(requester),
                                         **self._picture_message(picture, buttons)))

    async def working(self) -> None:
        return None  # Discord already shows "thinking…" until the first reply

    # -- helpers ------------------------------------------------------------------------------------------------
    async def _send(self, by_webhook: Callable[[discord.Webhook], Awaitable[discord.Message]],
                    by_channel: Callable[[discord.PartialMessageable], Awaitable[discord.Message]]) -> str:
        """Through the interaction's webhook while its token lives (15 minutes), else in the channel. Returns the
        message id tagged with the route ("w:" / "c:"), which edit_text needs."""
        if self.token_usable():
            try:
                message = await by_webhook(await self._webhook())
                self.sent += 1
                return f"w:{message.id}"
            except discord.HTTPException as exc:
                if not token_is_dead(exc):
                    raise
                self._lose_token(exc)
        message = await by_channel(await self._channel())
        self.sent += 1
        return f"c:{message.id}"

    @staticmethod
    def _picture_message(picture: Picture, buttons: list[Button]) -> dict[str, Any]:
        """A fresh File each time (discord.py closes it after a request, and a failed send is retried)."""
        file = discord.File(io.BytesIO(picture.png), filename=f"drawbot-{picture.job_id[:12]}.png",
                            spoiler=picture.spoiler)
        embed = discord.Embed(description=_clip(picture.caption, MAX_EMBED_DESCRIPTION), colour=0x5865F2)
        if not picture.spoiler and not picture.as_file:
            # Inside the embed the picture shows large; a spoiler must stay a plain attachment to be blurred.
            embed.set_image(url=f"attachment://{file.filename}")
        message: dict[str, Any] = {"embed": embed, "file": file}
        view = job_view(buttons)
        if view is not None:
            message["view"] = view
        return message


def _user_id(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
