"""The web page's `Conversation`: what the core says lands in per-draw state that the page's handler streams out.

Each Draw (or new-seed / same-seed / cancel) on the page talks to the core through its own `WebConversation`, whose
`Feed` records the messages, their edits (queue position, step progress) and the picture; the handler waits on the
feed and shows the newest text. A conversation rebuilt after a restart (`WebPlatform.conversation(ref)`) has no page
following it: its notices go to the user's `Inbox`, shown on the page's next refresh, and the picture is already in
the store, so it appears under "My pictures".
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque

from bot import replies
from bot.chat import Button, PlainMarkup, Picture


class Feed:
    """What the core said in one conversation, newest last; `changed` wakes the page's handler."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.latest: str = ""
        self.pictures: list[Picture] = []
        self.changed = asyncio.Event()

    def say(self, message_id: str, text: str) -> None:
        self.messages[message_id] = text
        self.latest = text
        self.changed.set()

    def show(self, picture: Picture) -> None:
        self.pictures.append(picture)
        self.changed.set()

    def picture_of(self, job_id: str) -> Picture | None:
        return next((p for p in self.pictures if p.job_id == job_id), None)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.changed.clear()


class Inbox:
    """Notices for users no page is following right now (jobs picked up after a restart), a few per user."""

    def __init__(self, keep: int = 5) -> None:
        self._notices: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=keep))

    def add(self, user_id: str, text: str) -> None:
        self._notices[user_id].append(text)

    def read(self, user_id: str) -> list[str]:
        return list(self._notices.get(user_id, ()))


class WebConversation:
    platform = "web"
    markup = PlainMarkup()  # the page shows text as text (Gradio Textbox), never as HTML
    progress_interval = 0.5
    typed_options = True  # prompt, seed and steps are separate fields, like Discord's typed options

    def __init__(self, user_id: str, inbox: Inbox, feed: Feed | None = None):
        self.user_id = user_id
        self._inbox = inbox
        self.feed = feed
        self._ids = itertools.count(1)

    def ref(self) -> dict:
        return {"user": self.user_id}

    async def send_text(self, text: str, *, buttons: list[Button] | None = None) -> str | None:
        message_id = str(next(self._ids))
        if self.feed is not None:
            self.feed.say(message_id, text)
        else:
            self._inbox.add(self.user_id, text)
        return message_id

    async def edit_text(self, message_id: str, text: str) -> None:
        if self.feed is not None:
            self.feed.say(message_id, text)

    async def send_picture(self, picture: Picture) -> str | None:
        # The picture itself stays in the store; the page shows it from there, to its owner only.
        if self.feed is not None:
            self.feed.show(picture)
        else:
            self._inbox.add(self.user_id, replies.web_picture_ready(picture.caption))
        return str(next(self._ids))

    async def working(self) -> None:
        return None
