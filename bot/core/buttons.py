"""Picture buttons (and /again, /reroll): the same picture again, with its seed or a new one, for its owner only."""

from __future__ import annotations

from bot import replies
from bot.chat import Conversation, User
from bot.commands import DrawCommand
from bot.core.state import CoreState
from bot.core.submitting import Submitter


class Buttons:
    def __init__(self, state: CoreState, submitter: Submitter):
        self.state = state
        self.submitter = submitter

    async def on_button(self, user: User, conv: Conversation, action: str, job_id: str) -> str | None:
        """A button press (or /again, /reroll), its payload already parsed by the adapter that encoded it. Returns
        a short answer for the presser (toast / ephemeral)."""
        record = await self.state.store.get_job(job_id)
        if record is None:
            return replies.PICTURE_GONE
        if record.platform != user.platform or record.user_id != user.id:
            return replies.NOT_YOUR_PICTURE
        if action in ("reroll", "again"):
            seed = None if action == "reroll" else record.seed
            command = DrawCommand(prompt=record.prompt, seed=seed, steps=record.steps, width=record.width,
                                  height=record.height, as_file=bool(record.reply_ref.get("as_file")))
            job = await self.submitter.submit(user, conv, command)
            return replies.QUEUED_TOAST if job else None
        return None
