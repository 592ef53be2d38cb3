"""The Discord adapter (discord.py 2.7 app commands), a thin translation onto the chat core.

- platform.py: `DiscordPlatform` (client, login, command sync, run/stop, conversations rebuilt after a restart) and
  the endpoints from `[discord].api_base_url` / `gateway_url`.
- commands.py: the slash command declarations; handlers.py: what each command and button does.
- conversation.py: replies to one interaction (webhook while the 15-minute token lives, then the channel).
- buttons.py: restart-proof picture buttons; markup.py: escaping and allowed mentions; sync.py: sync-when-changed.
"""

from bot.adapters.discord.conversation import ConversationRef, DiscordConversation
from bot.adapters.discord.markup import DiscordMarkdown
from bot.adapters.discord.platform import DiscordLoginError, DiscordPlatform

__all__ = ["ConversationRef", "DiscordConversation", "DiscordLoginError", "DiscordMarkdown", "DiscordPlatform"]
