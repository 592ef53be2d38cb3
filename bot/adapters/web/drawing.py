"""Page actions as calls on the chat core, followed to their end: the page's handlers turn these updates into what
the browser shows. No rule lives here: the core validates, limits, queues and answers; this only watches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bot.adapters.web.conversation import Feed, Inbox, WebConversation
from bot import replies
from bot.chat import User
from bot.core import ChatCore
from bot.store import JobRecord

SIZES = "default"
"""The size choice that means the configured default (the others are bot.commands.SIZE_PRESETS)."""
FINISHED = ("done", "failed", "cancelled")
QUEUEING_WAIT = 10.0
"""Seconds a Cancel waits for the same page's Draw / New seed presses that are still on their way into the queue."""


@dataclass(frozen=True)
class Update:
    text: str | None
    """The core's latest sentence for this action (queue position, progress, a refusal, "Cancelled."); None once the
    page's Cancel has answered for it: the page's status keeps that answer."""
    job: JobRecord | None = None
    """The job this action queued, once it exists."""
    final: bool = False


class PageAction:
    """One Draw, New seed or Same seed of one page (a Gradio session), from the press to the end of its job."""

    def __init__(self) -> None:
        self.queued = asyncio.Event()
        """Set once the core has answered the press: its job is in the queue (or it was refused)."""
        self.cancel_answered = False
        """The page's Cancel was pressed since: its answer is what the page's status shows. Two writers of one status
        box arrive in no fixed order, so the action's own later lines ("Cancelled.", a last progress step) would
        otherwise replace the answer or be replaced by it, at random."""


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
        self._pages: dict[tuple[str, str], set[PageAction]] = {}
        """The actions each page (user id, Gradio session hash) has under way."""

    @contextmanager
    def _on_page(self, user: User, page: str | None) -> Iterator[PageAction]:
        action = PageAction()
        key = None if page is None else (user.id, page)
        if key is not None:
            self._pages.setdefault(key, set()).add(action)
        try:
            yield action
        finally:
            action.queued.set()  # a press that failed in the core must not hold up a Cancel
            if key is not None:
                actions = self._pages.get(key, set())
                actions.discard(action)
                if not actions:
                    self._pages.pop(key, None)

    async def _newest(self, user: User) -> str | None:
        records = await self.core.store.history(user.platform, user.id, 1)
        return records[0].id if records else None

    async def draw(self, user: User, prompt: str, seed: float | int | str | None, steps: float | None,
                   size: str | None, *, page: str | None = None) -> AsyncIterator[Update]:
        """`page`: the Gradio session it was pressed on, whose Cancel answers for it (None: no page, the API)."""
        with self._on_page(user, page) as pressed:
            feed = Feed()
            conv = WebConversation(user.id, self.inbox, feed)
            before = await self._newest(user)
            steps_value = None if steps is None else int(steps) if float(steps).is_integer() else str(steps)
            await self.core.draw(user, conv, prompt or "", seed_value(seed), steps_value,
                                 None if not size or size == SIZES else size)
            pressed.queued.set()
            async for update in self._follow(user, feed, before, pressed):
                yield update

    async def button(self, user: User, action: str, job_id: str | None, *,
                     page: str | None = None) -> AsyncIterator[Update]:
        """New seed ("reroll") or same seed ("again") of one of the user's pictures (`page`: as for `draw`)."""
        if not job_id:
            yield Update(replies.DRAW_FIRST, final=True)
            return
        with self._on_page(user, page) as pressed:
            feed = Feed()
            conv = WebConversation(user.id, self.inbox, feed)
            before = await self._newest(user)
            answer = await self.core.on_button(user, conv, action, job_id)
            pressed.queued.set()
            if answer and answer != replies.QUEUED_TOAST:
                feed.say("answer", answer)
            async for update in self._follow(user, feed, before, pressed):
                yield update

    async def cancel(self, user: User, *, page: str | None = None) -> str:
        """Cancel the user's pictures; returns the core's answer, which the page shows as its status.

        A Draw or New seed pressed on the same page just before may still be on its way into the queue (the two
        presses are handled at once): it is waited for, so that Cancel stops it rather than finding nothing and letting
        it draw. From then on that page's actions leave their status to this answer."""
        actions = list(self._pages.get((user.id, page), ())) if page is not None else []
        try:
            async with asyncio.timeout(QUEUEING_WAIT):
                for action in actions:
                    await action.queued.wait()
        except TimeoutError:  # still not queued: its own lines go on showing, so its user sees it is still coming
            pass
        for action in actions:
            if action.queued.is_set():
                action.cancel_answered = True
        feed = Feed()
        await self.core.cancel(user, WebConversation(user.id, self.inbox, feed))
        return feed.latest

    async def _follow(self, user: User, feed: Feed, before: str | None,
                      action: PageAction) -> AsyncIterator[Update]:
        def said(text: str) -> str | None:
            return None if action.cancel_answered else text

        job_id = await self._newest(user)
        if job_id == before or job_id is None:  # refused: the core said why
            yield Update(said(feed.latest or replies.DID_NOT_WORK), final=True)
            return
        started = time.monotonic()
        while True:
            job = await self.core.store.get_job(job_id)
            if job is None:  # pruned meanwhile; nothing left to show
                yield Update(said(feed.latest), final=True)
                return
            if feed.picture_of(job_id) is not None or (job.status in FINISHED and job.status != "done") or (
                    job.status == "done" and job.delivered_at is not None):
                yield Update(said(feed.latest), job, final=True)
                return
            yield Update(said(feed.latest or replies.QUEUED), job)
            await feed.wait(self._poll if time.monotonic() - started < 600 else 5 * self._poll)
