"""Commands as they arrive: text commands (console, Telegram: `/draw a fox --seed 7`) are parsed here and typed ones
(Discord's, the web page's fields) validated, both by the same rules, then handed to the part of the core that does
them."""

from __future__ import annotations

from typing import Callable

from bot import replies
from bot.chat import Conversation, User
from bot.commands import DrawRules, UsageError, parse_draw, split_command, validate_draw
from bot.core.account import Account
from bot.core.admin import Admin
from bot.core.buttons import Buttons
from bot.core.room import Room
from bot.core.state import HISTORY_SHOWN, CoreState
from bot.core.submitting import Submitter
from bot.store import DiskFull


class Dispatch:
    def __init__(self, state: CoreState, submitter: Submitter, buttons: Buttons, account: Account, admin: Admin,
                 room: Room, *, count_tokens: Callable[[str], int] | None = None):
        self.state = state
        self.room = room
        self.submitter = submitter
        self.buttons = buttons
        self.account = account
        self.admin = admin
        self.count_tokens = count_tokens

    @property
    def rules(self) -> DrawRules:
        e, lim = self.state.config.engine, self.state.config.limits
        return DrawRules(min_steps=e.min_steps, max_steps=e.max_steps, default_steps=e.default_steps,
                         width=e.width, height=e.height, max_prompt_chars=lim.max_prompt_chars,
                         max_prompt_tokens=lim.max_prompt_tokens, count_tokens=self.count_tokens)

    # -- text commands (console, Telegram) -----------------------------------------------------------------------
    async def on_text(self, user: User, conv: Conversation, text: str, *, bot_username: str | None = None) -> None:
        """Any message. Commands are answered; other text is ignored in groups and gets a hint in private chats."""
        split = split_command(text)
        if split is None:
            if user.chat_kind == "private" and text.strip():
                await conv.send_text(replies.draw_hint(conv.markup))
            return
        command, rest, addressed_to = split
        if addressed_to and bot_username and addressed_to.lower() != bot_username.lower():
            return  # `/draw@OtherBot` in a group: not for us
        account = self.account
        handler = {
            "draw": lambda: self._draw_text(user, conv, rest),
            "start": lambda: account.help(user, conv),
            "help": lambda: account.help(user, conv),
            "history": lambda: account.history(user, conv),
            "usage": lambda: account.usage(user, conv),
            "cancel": lambda: account.cancel(user, conv),
            "ban": lambda: self._ban_text(user, conv, rest, ban=True),
            "unban": lambda: self._ban_text(user, conv, rest, ban=False),
            "again": lambda: self._button_text(user, conv, "again", rest),
            "reroll": lambda: self._button_text(user, conv, "reroll", rest),
        }.get(command)
        if handler is None:
            if user.chat_kind == "private":
                await conv.send_text(replies.unknown_command(conv.markup, command))
            return
        try:
            await handler()
        except DiskFull as exc:  # a command that needed to write (/ban, ...): reads still work
            self.room.noticed(exc)
            await conv.send_text(replies.disk_full_busy(conv.markup))

    async def _draw_text(self, user: User, conv: Conversation, rest: str) -> None:
        try:
            command = parse_draw(rest, self.rules)
        except UsageError as exc:
            await conv.send_text(replies.usage_problem(conv.markup, exc.problem))
            return
        await self.submitter.submit(user, conv, command)

    async def _button_text(self, user: User, conv: Conversation, action: str, rest: str) -> None:
        """/again, /reroll with a job id or the number /history shows next to the picture."""
        target = rest.strip()
        if target.isdecimal() and len(target) <= 3:
            shown = await self.state.store.history(user.platform, user.id, HISTORY_SHOWN)
            n = int(target)
            if not 1 <= n <= len(shown):
                await conv.send_text(conv.markup.escape(replies.no_such_history_entry(n, len(shown))))
                return
            target = shown[n - 1].id
        if not target.isalnum():  # typed, not a button: say what to type
            await conv.send_text(replies.again_usage(conv.markup, action))
            return
        answer = await self.buttons.on_button(user, conv, action, target)
        if answer and answer != replies.QUEUED_TOAST:  # accepted: the queue message already said so
            await conv.send_text(conv.markup.escape(answer))

    async def _ban_text(self, user: User, conv: Conversation, rest: str, *, ban: bool) -> None:
        """/ban <user id>, /unban <user id>: admins only; the target is on the admin's own platform."""
        target = rest.strip()
        if not target or len(target.split()) != 1:
            await conv.send_text(replies.ban_usage(conv.markup, "ban" if ban else "unban"))
            return
        outcome = await (self.admin.ban if ban else self.admin.unban)(user, user.platform, target)
        await conv.send_text(replies.ban_outcome(conv.markup, outcome))

    # -- typed commands (Discord, the web page) --------------------------------------------------------------------
    async def draw(self, user: User, conv: Conversation, prompt: str, seed: int | str | None = None,
                   steps: int | str | None = None, size: str | None = None, as_file: bool = False) -> None:
        """`seed` and `steps` as typed options, or as the user typed them (the web page's fields): a bad one gets
        the same explanation as in a chat."""
        try:
            command = validate_draw(prompt, seed, steps, self.rules, size=size, as_file=as_file)
        except UsageError as exc:
            await conv.send_text(replies.usage_problem(conv.markup, exc.problem))
            return
        await self.submitter.submit(user, conv, command)
