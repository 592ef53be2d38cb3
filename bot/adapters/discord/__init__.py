"""The Discord adapter (discord.py 2.7 app commands), a thin translation onto the chat core.

- platform.py: `DiscordPlatform` (client, login, command sync, run/stop, conversations rebuilt after a restart) and
  the test-only `DRAWBOT_FAKE_DISCORD_PORT` switch.
- commands.py: the slash command declarations; handlers.py: what each command and button does.
- conversation.py: replies to one interaction (webhook while the 15-minute token lives, then the channel).
- buttons.py: restart-proof picture buttons; markup.py: escaping and allowed mentions; sync.py: sync-when-changed.
"""

from bot.adapters.discord.conversation import ConversationRef, DiscordConversation
from bot.adapters.discord.markup import DiscordMarkdown
from bot.adapters.discord.platform import FAKE_PORT_ENV, DiscordLoginError, DiscordPlatform, point_at_fake_discord

__all__ = ["ConversationRef", "DiscordConversation", "DiscordLoginError", "DiscordMarkdown", "DiscordPlatform",
           "FAKE_PORT_ENV", "point_at_fake_discord"]
