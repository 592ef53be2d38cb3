"""The Discord platform: a discord.py client, its slash commands and buttons, wired to the chat core.

    platform = DiscordPlatform(core, config.discord, token)
    core.add_platform(platform)
    await platform.run()        # logs in, syncs commands if they changed, stays connected until stopped
    await platform.stop()

The client asks only for the GUILDS intent (slash commands and buttons need no message content) and sends nothing
that can ping @everyone, @here or roles: `AllowedMentions.none()` is its default, and each message sets it again.

Conversations rebuilt after a restart (`conversation(ref)`) may be used before `run()`: the core recovers jobs
first. They only need the REST API, so the first use logs in (no gateway needed) and `run()` then just connects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import discord
import yarl

from bot.adapters.discord.buttons import JobButton
from bot.adapters.discord.commands import CommandSettings, DrawbotTree, build_tree
from bot.adapters.discord.conversation import ConversationRef, DiscordConversation
from bot.adapters.discord.handlers import DiscordHandlers
from bot.adapters.discord.markup import NO_PINGS
from bot.adapters.discord.sync import STATE_FILE, SyncState, sync_if_changed
from bot.chat import TokenRefused
from bot.config import DiscordSettings
from bot.core import ChatCore

log = logging.getLogger(__name__)

class DiscordLoginError(TokenRefused):
    """Discord refused the bot token (worded for the owner; the token itself is never shown)."""


def use_endpoints(settings: DiscordSettings) -> None:
    """Point discord.py at `[discord].api_base_url` and `gateway_url` (Discord's own by default).

    discord.py keeps both in class attributes, so this holds for the whole process (one bot, one Discord).
    """
    discord.http.Route.BASE = settings.api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)
    defaults = DiscordSettings()
    if (settings.api_base_url, settings.gateway_url) != (defaults.api_base_url, defaults.gateway_url):
        log.info("Discord endpoints from the config: %s and %s", settings.api_base_url, settings.gateway_url)


class DrawbotClient(discord.Client):
    """The discord.py client: registers the picture buttons and syncs the commands when it logs in."""

    def __init__(self, job_buttons: DiscordHandlers, on_login: Callable[[], Any], **options: Any) -> None:
        # GUILDS only: slash commands and buttons arrive as interactions, so no message content, members or
        # presences are needed (and none of the privileged intents Discord makes bots apply for).
        super().__init__(intents=discord.Intents(guilds=True), allowed_mentions=NO_PINGS, **options)
        self.job_buttons = job_buttons  # found by JobButton.callback through interaction.client
        self._on_login = on_login

    async def setup_hook(self) -> None:
        self.add_dynamic_items(JobButton)
        await self._on_login()

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (id %s), in %d server(s)", self.user, self.user and self.user.id,
                 len(self.guilds))


class DiscordPlatform:
    """The core's `Platform` for Discord (see the module docstring)."""

    name = "discord"

    def __init__(self, core: ChatCore, settings: DiscordSettings, token: str, *, state_dir: Path | None = None,
                 clock: Callable[[], float] = time.time, **client_options: Any) -> None:
        """`client_options` go to `discord.Client` (tests pass a short `guild_ready_timeout`)."""
        self.core = core
        self.settings = settings
        self._token = token
        self._clock = clock
        use_endpoints(settings)
        self.handlers = DiscordHandlers(core, settings, self, clock=clock)
        self.client = DrawbotClient(self.handlers, self.sync_commands, **client_options)
        engine, limits = core.config.engine, core.config.limits
        self.tree: DrawbotTree = build_tree(self.client, self.handlers, CommandSettings(
            min_steps=engine.min_steps, max_steps=engine.max_steps, default_steps=engine.default_steps,
            max_prompt_chars=limits.max_prompt_chars, allow_dms=settings.allow_dms))
        self.sync_state = SyncState(Path(state_dir or core.config.storage.state_dir) / STATE_FILE)
        self._login_lock = asyncio.Lock()
        self._logged_in = False

    # -- Platform ---------------------------------------------------------------------------------------------
    def conversation(self, ref: dict) -> DiscordConversation:
        return DiscordConversation(self, ConversationRef.from_dict(ref),
                                   progress_interval=self.settings.progress_interval, clock=self._clock)

    # -- DiscordLink (what conversations use) -----------------------------------------------------------------
    async def interaction_webhook(self, application_id: int, token: str) -> discord.Webhook:
        await self.login()
        # The same application webhook `Interaction.followup` builds (type 3 allows ephemeral follow-ups).
        return discord.Webhook.from_state({"id": application_id, "type": 3, "token": token},
                                          state=self.client._connection)  # DEP-WARN: discord.py 2.7

    async def messageable(self, channel_id: int, guild_id: int | None) -> discord.PartialMessageable:
        await self.login()
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def login(self) -> None:
        """Log in to the REST API once (also runs the client's setup: buttons, command sync)."""
        async with self._login_lock:
            if self._logged_in:
                return
            try:
                await self.client.login(self._token)
            except discord.LoginFailure:
                raise DiscordLoginError("Discord refused the bot token: check DRAWBOT_DISCORD_TOKEN or "
                                        "[discord].token_file") from None
            self._logged_in = True

    async def sync_commands(self) -> bool:
        """Register the slash commands if they changed since the last sync (see sync.py)."""
        application_id = self.client.application_id
        if application_id is None:
            log.error("Discord did not say which application this bot is; slash commands not synced")
            return False
        return await sync_if_changed(self.tree, self.sync_state, application_id=application_id,
                                     guild_id=self.settings.dev_guild)

    async def run(self) -> None:
        """Connect and serve until `stop()` (discord.py reconnects by itself after network trouble)."""
        await self.login()
        await self.client.connect(reconnect=True)

    async def stop(self) -> None:
        await self.client.close()
