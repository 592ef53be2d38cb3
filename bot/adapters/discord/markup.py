"""Discord's Markdown, for the core's replies: user text is shown as typed and can never ping anyone.

Escaping is one layer; every message also carries `AllowedMentions` that cannot ping @everyone, @here or roles
(`NO_PINGS`, or `only_user` where the requester must be told), so a mention that slipped through would stay inert.
"""

from __future__ import annotations

import re

import discord
from discord.utils import escape_markdown, escape_mentions

NO_PINGS = discord.AllowedMentions.none()
"""The default for every message: nobody is notified, whatever the text contains."""


def only_user(user_id: int) -> discord.AllowedMentions:
    """Notify exactly this user (a picture delivered outside its interaction); never @everyone, @here or roles."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(user_id)], replied_user=False)


# Line-start syntax that discord.utils.escape_markdown leaves alone: headings and quotes after indentation, and
# numbered lists ("1. "), which Discord renders since 2023. ("-" and "*" lists it escapes itself.)
_INDENTED_BLOCK = re.compile(r"^([ \t]+)([#>])", re.MULTILINE)
_NUMBERED_LIST = re.compile(r"^([ \t]*\d+)\.(?=\s)", re.MULTILINE)


class DiscordMarkdown:
    """The `bot.chat.Markup` for Discord messages and embeds."""

    def escape(self, text: str) -> str:
        """`text` shown literally: no Markdown, no mentions (a zero-width space breaks `@everyone`, `<@id>`)."""
        escaped = escape_mentions(escape_markdown(text))
        escaped = _INDENTED_BLOCK.sub(r"\1\\\2", escaped)
        return _NUMBERED_LIST.sub(r"\1\\.", escaped)

    def code(self, text: str) -> str:
        """Inline code (tap to copy on mobile). Backticks inside cannot close it early: they become look-alikes."""
        return "`" + text.replace("`", "ˋ") + "`" if text else ""

    def bold(self, text: str) -> str:
        return f"**{self.escape(text)}**" if text else ""
