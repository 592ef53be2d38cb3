"""Page actions as calls on the chat core, followed to their end: the page's handlers turn these updates into what
the browser shows. No rule lives here: the core validates, limits, queues and answers; this only watches."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bot.adapters.web.conversation import Feed, Inbox, WebConversation
from bot import replies
from bot.chat import User
from bot.core import ChatCore
from bot.store import JobRecord

SIZES = "default"
"""The size choice that means the configured default (the others are bot.commands.SIZE_PRESETS)."""
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Update:
    text: str
    """The core's latest sentence for this action (queue position, progress, a refusal, "Cancelled.")."""
    job: JobRecord | None = None
    """The job this action queued, once it exists."""
    final: bool = False


def web_user(user_id: str) -> User:
    name = user_id.lstrip("@") if not user_id.startswith("b-") else ""
    return User(platform="web", id=user_id, name=name, chat_id=f"web:{user_id}", chat_kind="private")


def seed_value(seed: float | int | str | None) -> int | str | None:
    """The page's seed field for the core: -1 or empty = random; anything else as typed (the core says what is
    wrong with a bad one, in the same words as in chat)."""
    if seed is None or seed == "" or seed == -1:
        return None
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    return seed if isinstance(seed, int) else str(seed)


class WebDrawing:
    def __init__(self, core: ChatCore, inbox: Inbox, *, poll: float = 1.0):
        self.core = core
        self.inbox = inbox
        self._poll = poll

    async def _newest(self, user: User) -> str | None:
        records = await self.core.store.history(user.platform, user.id, 1)
        return records[0].id if records else None

    async def draw(self, user: User, prompt: str, seed: float | int | str | None, steps: float | None,
                   size: str | None) -> AsyncIterator[Update]:
        feed = Feed()
        conv = WebConversation(user.id, self.inbox, feed)
        before = await self._newest(user)
        steps_value = None if steps is None else int(steps) if float(steps).is_integer() else str(steps)
        await self.core.draw(user, conv, prompt or "", seed_value(seed), steps_value,
                             None if not size or size == SIZES else size)
        async for update in self._follow(user, feed, before):
            yield update

    async def button(self, user: User, action: str, job_id: str | None) -> AsyncIterator[Update]:
        """New seed ("reroll") or same seed ("again") of one of the user's pictures."""
        if not job_id:
            yield Update(replies.DRAW_FIRST, final=True)
            return
        feed = Feed()
        conv = WebConversation(user.id, self.inbox, feed)
        before = await self._newest(user)
        answer = await self.core.on_button(user, conv, action, job_id)
        if answer and answer != replies.QUEUED_TOAST:
            feed.say("answer", answer)
        async for update in self._follow(user, feed, before):
            yield update

    async def cancel(self, user: User) -> str:
        feed = Feed()
        await self.core.cancel(user, WebConversation(user.id, self.inbox, feed))
        return feed.latest

    async def _follow(self, user: User, feed: Feed, before: str | None) -> AsyncIterator[Update]:
        job_id = await self._newest(user)
        if job_id == before or job_id is None:  # refused: the core said why
            yield Update(feed.latest or replies.DID_NOT_WORK, final=True)
            return
        started = time.monotonic()
        while True:
            job = await self.core.store.get_job(job_id)
            if job is None:  # pruned meanwhile; nothing left to show
                yield Update(feed.latest, final=True)
                return
            if feed.picture_of(job_id) is not None or (job.status in FINISHED and job.status != "done") or (
                    job.status == "done" and job.delivered_at is not None):
                yield Update(feed.latest, job, final=True)
                return
            yield Update(feed.latest or replies.QUEUED, job)
            await feed.wait(self._poll if time.monotonic() - started < 600 else 5 * self._poll)
