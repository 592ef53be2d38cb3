"""Picture buttons (and /again, /reroll): the same picture again, with its seed or a new one, for its owner only."""

from __future__ import annotations

from bot import replies
from bot.chat import Conversation, User, parse_button
from bot.commands import DrawCommand
from bot.core.state import CoreState
from bot.core.submitting import Submitter


class Buttons:
    def __init__(self, state: CoreState, submitter: Submitter):
        self.state = state
        self.submitter = submitter

    async def on_button(self, user: User, conv: Conversation, data: str) -> str | None:
        """A button press (or /again, /reroll). Returns a short answer for the presser (toast / ephemeral)."""
        parsed = parse_button(data)
        if parsed is None:
            return "That button is no longer valid."
        action, job_id = parsed
        record = await self.state.store.get_job(job_id)
        if record is None:
            return "I can't find that picture any more."
        if record.platform != user.platform or record.user_id != user.id:
            return "Only the person who asked for this picture can use its buttons - send your own /draw!"
        if action in ("reroll", "again"):
            seed = None if action == "reroll" else record.seed
            command = DrawCommand(prompt=record.prompt, seed=seed, steps=record.steps, width=record.width,
                                  height=record.height, as_file=bool(record.reply_ref.get("as_file")))
            job = await self.submitter.submit(user, conv, command)
            return replies.QUEUED_TOAST if job else None
        return None
