"""A user's own things: /help, /history, /usage and /cancel."""

from __future__ import annotations

from bot import replies
from bot.chat import Button, Conversation, User
from bot.core.feeding import Feeder
from bot.core.state import HISTORY_SHOWN, CoreState


class Account:
    def __init__(self, state: CoreState, feeder: Feeder):
        self.state = state
        self.feeder = feeder

    async def help(self, user: User, conv: Conversation) -> None:
        e = self.state.config.engine
        await conv.send_text(replies.help_text(conv.markup, min_steps=e.min_steps, max_steps=e.max_steps,
                                               default_steps=e.default_steps, is_test_model=self.state.is_test_model,
                                               typed_options=conv.typed_options))

    async def history(self, user: User, conv: Conversation, limit: int = HISTORY_SHOWN) -> None:
        m = conv.markup
        records = await self.state.store.history(user.platform, user.id, limit)
        if not records:
            await conv.send_text(m.escape("You have no pictures yet. Try ") + m.code(replies.EXAMPLES[0]))
            return
        now = self.state.clock()
        icons = {"done": "✅", "failed": "⚠️", "cancelled": "✖️", "queued": "⏳", "running": "🎨"}
        lines = [m.bold("Your last pictures:")]
        for n, r in enumerate(records, start=1):
            lines.append(
                m.escape(f"{n}. {icons.get(r.status, '')} “{replies.short(r.prompt, 60)}” · seed ") + m.code(str(r.seed))
                + m.escape(f" · {replies.steps(r.steps)} · {r.width}×{r.height} · {replies.relative_time(r.created_at, now)}")
                + m.escape(f" · again: /again {r.id}")
            )
        buttons = [Button(f"🔁 {n}", "again", r.id) for n, r in enumerate(records[:5], start=1)]
        await conv.send_text("\n".join(lines), buttons=buttons)

    async def usage(self, user: User, conv: Conversation) -> None:
        m = conv.markup
        if self.state.is_admin(user.key):
            await conv.send_text(m.escape("You are an admin: no limits apply to you."))
            return
        u = await self.state.store.usage(user.platform, user.id, self.state.config.limits)
        now = self.state.clock()

        def window(used: int, limit: int, retry_at: float | None, frees_at: float | None, name: str) -> str:
            if not limit:
                return f"{name}: {used} (no limit)"
            text = f"{name}: {used} of {limit}"
            if retry_at:
                text += f" - next picture in {replies.duration(retry_at - now)}"
            elif frees_at and used:
                text += f" (a slot frees in {replies.duration(frees_at - now)})"
            return text

        lines = [
            window(u.used_this_hour, u.per_hour, u.hour_retry_at, u.hour_frees_at, "This hour"),
            window(u.used_today, u.per_day, u.day_retry_at, u.day_frees_at, "Last 24 hours"),
            f"Waiting or drawing now: {u.active} of {u.max_active}",
        ]
        if u.cooldown_ends_at and u.cooldown_ends_at > now:
            lines.append(f"Cooldown: {replies.duration(u.cooldown_ends_at - now)} left")
        await conv.send_text(m.escape("\n".join(lines)))

    async def cancel(self, user: User, conv: Conversation) -> None:
        """Cancel the user's own queued and running jobs (never anyone else's)."""
        m = conv.markup
        mine = [live for live in list(self.state.live.values()) if live.user_id == user.id and
                live.conv.platform == user.platform]
        cancelled = sum(1 for live in mine if self.feeder.cancel_live(live))
        # Jobs in the table that this process is not following (should not happen, but never leave them stuck).
        leftovers = [r for r in await self.state.store.cancel_user_jobs(user.platform, user.id) if r.id not in
                     {live.record_id for live in mine}]
        total = cancelled + len(leftovers)
        await self.feeder.feed_quietly()
        await conv.send_text(m.escape(f"Cancelled {total} picture{'s' if total != 1 else ''}." if total else
                                      "You have nothing waiting or drawing."))
