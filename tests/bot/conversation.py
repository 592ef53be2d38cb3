"""A recording Conversation (a stand-in chat, not a stand-in engine) for core tests."""

from __future__ import annotations

import asyncio
import itertools

from bot.chat import Button, PlainMarkup, Picture


class RecordingConversation:
    platform = "console"
    markup = PlainMarkup()
    typed_options = False

    def __init__(self, chat: str = "c1", *, progress_interval: float = 0.0, fail_pictures: int = 0):
        self.chat = chat
        self.progress_interval = progress_interval
        self.sent: list[tuple[str, str, list[Button]]] = []  # (id, text, buttons)
        self.edits: list[tuple[str, str]] = []
        self.pictures: list[Picture] = []
        self.fail_pictures = fail_pictures
        self._ids = itertools.count(1)
        self.changed = asyncio.Event()

    def ref(self) -> dict:
        return {"chat": self.chat}

    async def send_text(self, text, *, buttons=None):
        message_id = str(next(self._ids))
        self.sent.append((message_id, text, list(buttons or [])))
        self.changed.set()
        return message_id

    async def edit_text(self, message_id, text):
        self.edits.append((message_id, text))
        self.changed.set()

    async def send_picture(self, picture):
        if self.fail_pictures:
            self.fail_pictures -= 1
            raise ConnectionError("network down")
        self.pictures.append(picture)
        self.changed.set()
        return str(next(self._ids))

    async def working(self):
        return None

    def texts(self) -> list[str]:
        return [t for _, t, _ in self.sent]


class RecordingPlatform:
    name = "console"

    def __init__(self):
        self.conversations: dict[str, RecordingConversation] = {}

    def conversation(self, ref: dict) -> RecordingConversation:
        chat = ref.get("chat", "c1")
        return self.conversations.setdefault(chat, RecordingConversation(chat))
