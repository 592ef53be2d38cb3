"""A user's own things: /help, /history, /usage and /cancel."""

from __future__ import annotations

from bot import replies
from bot.chat import Button, Conversation, User
from bot.core.feeding import Feeder
from bot.core.room import Room
from bot.core.state import HISTORY_SHOWN, CoreState
from bot.store import DiskFull


class Account:
    def __init__(self, state: CoreState, feeder: Feeder, room: Room):
        self.state = state
        self.feeder = feeder
        self.room = room

    async def help(self, user: User, conv: Conversation) -> None:
        e = self.state.config.engine
        await conv.send_text(replies.help_text(conv.markup, min_steps=e.min_steps, max_steps=e.max_steps,
                                               default_steps=e.default_steps, is_test_model=self.state.is_test_model,
                                               typed_options=conv.typed_options))

    async def history(self, user: User, conv: Conversation, limit: int = HISTORY_SHOWN) -> None:
        records = await self.state.store.history(user.platform, user.id, limit)
        buttons = [Button(replies.again_label(n), "again", r.id) for n, r in enumerate(records[:5], start=1)]
        await conv.send_text(replies.history(conv.markup, records, self.state.clock()), buttons=buttons or None)

    async def usage(self, user: User, conv: Conversation) -> None:
        if self.state.is_admin(user.key):
            await conv.send_text(replies.usage_of_admin(conv.markup))
            return
        u = await self.state.store.usage(user.platform, user.id, self.state.config.limits)
        await conv.send_text(replies.usage(conv.markup, u, self.state.clock()))

    async def cancel(self, user: User, conv: Conversation) -> None:
        """Cancel the user's own queued and running jobs (never anyone else's)."""
        mine = [live for live in list(self.state.live.values()) if live.user_id == user.id and
                live.conv.platform == user.platform]
        cancelled = sum(1 for live in mine if self.feeder.cancel_live(live))
        # Jobs in the table that this process is not following (should not happen, but never leave them stuck).
        try:
            in_store = await self.state.store.cancel_user_jobs(user.platform, user.id)
        except DiskFull as exc:  # the followed ones are cancelled by their followers (kept until there is room)
            self.room.noticed(exc)
            if not cancelled:
                await conv.send_text(replies.disk_full_busy(conv.markup))
                return
            in_store = []
        leftovers = [r for r in in_store if r.id not in {live.record_id for live in mine}]
        total = cancelled + len(leftovers)
        await self.feeder.feed_quietly()
        await conv.send_text(replies.cancelled_count(conv.markup, total))
