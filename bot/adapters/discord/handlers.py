"""What each slash command and button does on Discord: acknowledge at once, then hand over to the chat core.

Discord drops an interaction that is not acknowledged within 3 seconds, so every handler defers first
(`defer(thinking=True)` for commands, a silent `defer()` for buttons) and only then touches the store or the engine.
Personal answers (/history, /usage, /cancel, /help, admin tools, refusals) are ephemeral: only the user sees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import discord
from discord import app_commands

from bot import replies
from bot.replies import ADMINS_ONLY, NOT_IN_DMS, NOT_IN_THIS_CHANNEL, NOT_IN_THIS_SERVER, SOMETHING_WENT_WRONG
from bot.adapters.discord.conversation import ConversationRef, DiscordConversation, DiscordLink
from bot.adapters.discord.markup import NO_PINGS, DiscordMarkdown
from bot.chat import User
from bot.config import DiscordSettings
from bot.core import ChatCore

log = logging.getLogger(__name__)

PLATFORM = "discord"
_ACTIVE = ("queued", "running")


class DiscordHandlers:
    """The callbacks behind the command tree and the picture buttons (a thin translation onto `ChatCore`)."""

    def __init__(self, core: ChatCore, settings: DiscordSettings, link: DiscordLink, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.settings = settings
        self.link = link
        self.markup = DiscordMarkdown()
        self._clock = clock

    # -- who, where, and where to answer ----------------------------------------------------------------------
    @staticmethod
    def user_of(interaction: discord.Interaction) -> User:
        guild_id = interaction.guild_id
        return User(PLATFORM, str(interaction.user.id), interaction.user.display_name,
                    chat_id=str(guild_id if guild_id is not None else interaction.channel_id),
                    chat_kind="group" if guild_id is not None else "private")

    def refusal_for_place(self, interaction: discord.Interaction) -> str | None:
        """Why the bot does not answer here (config: allow_dms, allowed_guilds, allowed_channels), or None."""
        if interaction.guild_id is None:
            return None if self.settings.allow_dms else NOT_IN_DMS
        if self.settings.allowed_guilds and interaction.guild_id not in self.settings.allowed_guilds:
            return NOT_IN_THIS_SERVER
        if self.settings.allowed_channels and interaction.channel_id not in self.settings.allowed_channels:
            return NOT_IN_THIS_CHANNEL
        return None

    def conversation(self, interaction: discord.Interaction, *, ephemeral: bool) -> DiscordConversation:
        ref = ConversationRef(
            application_id=interaction.application_id, token=interaction.token,
            channel_id=interaction.channel_id or 0, guild_id=interaction.guild_id,
            requester_id=interaction.user.id, created_at=interaction.created_at.timestamp(), ephemeral=ephemeral)
        return DiscordConversation(self.link, ref, progress_interval=self.settings.progress_interval,
                                   clock=self._clock)

    def is_admin(self, interaction: discord.Interaction) -> bool:
        return f"{PLATFORM}:{interaction.user.id}" in self.core.config.limits.admins

    async def _defer(self, interaction: discord.Interaction, *, ephemeral: bool) -> bool:
        try:
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        except discord.HTTPException as exc:  # usually 10062: the 3-second window passed (a stalled event loop)
            log.warning("could not acknowledge an interaction: HTTP %s code %s", exc.status, exc.code)
            return False
        return True

    async def _tell(self, interaction: discord.Interaction, text: str) -> None:
        """A short private answer, whether or not the interaction was acknowledged already."""
        content = self.markup.escape(text)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(content, ephemeral=True, allowed_mentions=NO_PINGS)
            else:
                await interaction.response.send_message(content, ephemeral=True, allowed_mentions=NO_PINGS)
        except discord.HTTPException as exc:
            log.warning("could not answer an interaction: HTTP %s code %s", exc.status, exc.code)

    # -- tree hooks ---------------------------------------------------------------------------------------------
    async def check(self, interaction: discord.Interaction) -> bool:
        refusal = self.refusal_for_place(interaction)
        if refusal:
            await self._tell(interaction, refusal)
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        name = interaction.command.qualified_name if interaction.command else "?"
        original = getattr(error, "original", error)
        log.error("/%s failed: %s", name, type(original).__name__, exc_info=original)
        await self._tell(interaction, SOMETHING_WENT_WRONG)

    # -- commands -----------------------------------------------------------------------------------------------
    async def draw(self, interaction: discord.Interaction, *, prompt: str, seed: int | None, steps: int | None,
                   size: str | None, as_file: bool) -> None:
        if not await self._defer(interaction, ephemeral=False):
            return
        await self.core.draw(self.user_of(interaction), self.conversation(interaction, ephemeral=False), prompt,
                             seed=seed, steps=steps, size=size, as_file=as_file)

    async def history(self, interaction: discord.Interaction) -> None:
        if await self._defer(interaction, ephemeral=True):
            await self.core.history(self.user_of(interaction), self.conversation(interaction, ephemeral=True))

    async def usage(self, interaction: discord.Interaction) -> None:
        if await self._defer(interaction, ephemeral=True):
            await self.core.usage(self.user_of(interaction), self.conversation(interaction, ephemeral=True))

    async def cancel(self, interaction: discord.Interaction) -> None:
        if await self._defer(interaction, ephemeral=True):
            await self.core.cancel(self.user_of(interaction), self.conversation(interaction, ephemeral=True))

    async def help(self, interaction: discord.Interaction) -> None:
        if await self._defer(interaction, ephemeral=True):
            await self.core.help(self.user_of(interaction), self.conversation(interaction, ephemeral=True))

    # -- buttons ------------------------------------------------------------------------------------------------
    async def on_job_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None:
        """Reroll / same seed / delete. The owner check is the core's; its refusal goes back privately."""
        refusal = self.refusal_for_place(interaction)
        if refusal:
            await self._tell(interaction, refusal)
            return
        try:
            await interaction.response.defer()  # silent: the answer is a new message, or a private note
        except discord.HTTPException as exc:
            log.warning("could not acknowledge a button press: HTTP %s code %s", exc.status, exc.code)
            return
        conv = self.conversation(interaction, ephemeral=False)
        try:
            answer = await self.core.on_button(self.user_of(interaction), conv, action, job_id)
            if action == "delete" and answer is None:
                await self._delete_pressed_message(interaction)
                return
        except Exception:  # discord.py would only log it; the presser deserves an answer
            log.exception("the %s button failed", action)
            await self._tell(interaction, SOMETHING_WENT_WRONG)
            return
        if answer and not conv.sent:  # "Queued!" is said by the queue message itself
            await self._tell(interaction, answer)

    async def _delete_pressed_message(self, interaction: discord.Interaction) -> None:
        try:
            # After a deferred update, the "original response" is the message whose button was pressed.
            await interaction.delete_original_response()
        except discord.NotFound:
            pass  # already gone
        except discord.HTTPException as exc:
            if interaction.message is None:
                raise
            log.info("deleting through the interaction failed (HTTP %s); trying the channel", exc.status)
            await interaction.message.delete()

    # -- admin tools --------------------------------------------------------------------------------------------
    async def _admin_conversation(self, interaction: discord.Interaction) -> DiscordConversation | None:
        if not await self._defer(interaction, ephemeral=True):
            return None
        conv = self.conversation(interaction, ephemeral=True)
        if not self.is_admin(interaction):
            await conv.send_text(self.markup.escape(ADMINS_ONLY))
            return None
        return conv

    async def admin_queue(self, interaction: discord.Interaction) -> None:
        conv = await self._admin_conversation(interaction)
        if conv is None:
            return
        jobs = [r for r in await self.core.store.unfinished_jobs() if r.status in _ACTIVE]

        def who(platform: str, user_id: str) -> str:  # a mention renders as a name; NO_PINGS keeps it silent
            return f"<@{user_id}>" if platform == PLATFORM and user_id.isdigit() else self.markup.escape(
                f"{platform}:{user_id}")

        await conv.send_text(replies.admin_queue(self.markup, jobs, self._clock(), who=who))

    async def admin_ban(self, interaction: discord.Interaction, target: discord.User) -> None:
        conv = await self._admin_conversation(interaction)
        if conv is None:
            return
        outcome = await self.core.ban(self.user_of(interaction), PLATFORM, str(target.id))
        await conv.send_text(replies.ban_outcome(self.markup, outcome, who=f"<@{target.id}>"))  # shown, never pinged

    async def admin_unban(self, interaction: discord.Interaction, target: discord.User) -> None:
        conv = await self._admin_conversation(interaction)
        if conv is None:
            return
        outcome = await self.core.unban(self.user_of(interaction), PLATFORM, str(target.id))
        await conv.send_text(replies.ban_outcome(self.markup, outcome, who=f"<@{target.id}>"))
