"""The slash commands: declarations only. Each callback hands its typed options to the handlers (handlers.py).

No `from __future__ import annotations` here: discord.py reads the option types from the callbacks' annotations,
and the step range comes from the config at build time, so the annotations must be real objects.

    /draw prompt:<text> [seed:0..4294967295] [steps:min..max] [size:preset] [png:bool]
    /history  /usage  /cancel  /help
    /drawbot-admin queue | ban user:<user> | unban user:<user>   (hidden from members without Manage Server;
                                                                    the handlers also require an admin id)
"""

from dataclasses import dataclass
from typing import Optional, Protocol

import discord
from discord import app_commands

from bot import replies
from bot.commands import SEED_MAX, SIZE_PRESETS

MAX_STRING_OPTION = 6000  # Discord's max_length for a string option

_SIZE_CHOICES = [
    app_commands.Choice(name=f"{name} {w}:{h}", value=name) for name, (w, h) in SIZE_PRESETS.items()
]


@dataclass(frozen=True)
class CommandSettings:
    """What shapes the command payloads (so a change here means a new sync)."""

    min_steps: int
    max_steps: int
    default_steps: int
    max_prompt_chars: int
    allow_dms: bool


class CommandHandlers(Protocol):
    async def check(self, interaction: discord.Interaction) -> bool: ...

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None: ...

    async def draw(self, interaction: discord.Interaction, *, prompt: str, seed: Optional[int], steps: Optional[int],
                   size: Optional[str], as_file: bool) -> None: ...

    async def history(self, interaction: discord.Interaction) -> None: ...

    async def usage(self, interaction: discord.Interaction) -> None: ...

    async def cancel(self, interaction: discord.Interaction) -> None: ...

    async def help(self, interaction: discord.Interaction) -> None: ...

    async def admin_queue(self, interaction: discord.Interaction) -> None: ...

    async def admin_ban(self, interaction: discord.Interaction, target: discord.User) -> None: ...

    async def admin_unban(self, interaction: discord.Interaction, target: discord.User) -> None: ...


class DrawbotTree(app_commands.CommandTree):
    """A command tree whose global check and error handler are the handlers'."""

    def __init__(self, client: discord.Client, handlers: CommandHandlers, *, allow_dms: bool) -> None:
        contexts = app_commands.AppCommandContext(guild=True, dm_channel=allow_dms, private_channel=allow_dms)
        super().__init__(client, allowed_contexts=contexts,
                         allowed_installs=app_commands.AppInstallationType(guild=True, user=False))
        self.handlers = handlers

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await self.handlers.check(interaction)

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        await self.handlers.on_error(interaction, error)


def build_tree(client: discord.Client, handlers: CommandHandlers, settings: CommandSettings) -> DrawbotTree:
    tree = DrawbotTree(client, handlers, allow_dms=settings.allow_dms)
    Prompt = app_commands.Range[str, 1, min(settings.max_prompt_chars, MAX_STRING_OPTION)]
    Seed = app_commands.Range[int, 0, SEED_MAX]
    Steps = app_commands.Range[int, settings.min_steps, settings.max_steps]

    @tree.command(name="draw", description=replies.MENU["draw"])
    @app_commands.describe(**replies.draw_option_descriptions(
        min_steps=settings.min_steps, max_steps=settings.max_steps, default_steps=settings.default_steps))
    @app_commands.choices(size=_SIZE_CHOICES)
    async def draw(interaction: discord.Interaction, prompt: Prompt, seed: Optional[Seed] = None,
                   steps: Optional[Steps] = None, size: Optional[app_commands.Choice[str]] = None,
                   png: Optional[bool] = None) -> None:
        await handlers.draw(interaction, prompt=prompt, seed=seed, steps=steps,
                            size=None if size is None else size.value, as_file=bool(png))

    @tree.command(name="history", description=replies.MENU["history"])
    async def history(interaction: discord.Interaction) -> None:
        await handlers.history(interaction)

    @tree.command(name="usage", description=replies.MENU["usage"])
    async def usage(interaction: discord.Interaction) -> None:
        await handlers.usage(interaction)

    @tree.command(name="cancel", description=replies.MENU["cancel"])
    async def cancel(interaction: discord.Interaction) -> None:
        await handlers.cancel(interaction)

    @tree.command(name="help", description=replies.MENU["help"])
    async def help(interaction: discord.Interaction) -> None:
        await handlers.help(interaction)

    admin = app_commands.Group(name="drawbot-admin", description=replies.ADMIN_MENU,
                               default_permissions=discord.Permissions(manage_guild=True))

    @admin.command(name="queue", description=replies.ADMIN_MENU_COMMANDS["queue"])
    async def queue(interaction: discord.Interaction) -> None:
        await handlers.admin_queue(interaction)

    @admin.command(name="ban", description=replies.ADMIN_MENU_COMMANDS["ban"])
    @app_commands.describe(user=replies.ADMIN_MENU_USER["ban"])
    async def ban(interaction: discord.Interaction, user: discord.User) -> None:
        await handlers.admin_ban(interaction, user)

    @admin.command(name="unban", description=replies.ADMIN_MENU_COMMANDS["unban"])
    @app_commands.describe(user=replies.ADMIN_MENU_USER["unban"])
    async def unban(interaction: discord.Interaction, user: discord.User) -> None:
        await handlers.admin_unban(interaction, user)

    tree.add_command(admin)
    return tree
