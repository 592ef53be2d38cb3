"""One pacer per progress message: the core's only flood control for edits.

A message's progress edits (queue position, steps) go out at most once per `interval` (the platform's, from
`Conversation.progress_interval`); an edit that comes sooner waits, and only the newest waiting text is sent when its
turn comes, so the message never ends on a stale line. A platform reports flood control by raising `Flooded` from
`edit_text` with its retry-after: the pacer then sends nothing for that long, widens its interval (calming down again
slowly after edits go through), and sends the newest text when the window ends. Sends (answers, pictures) are not
paced here: the platform's own client retries them (PTB's rate limiter, discord.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bot.chat import Flooded
from bot.core.state import log

MAX_INTERVAL = 60.0
"""Seconds: the widest the interval grows after repeated floods."""
FINAL_TRIES = 3
"""Times the last text of a message is tried when the platform keeps flood-limiting it."""


class EditPacer:
    def __init__(self, edit: Callable[[str], Awaitable[None]], interval: float, *, name: str = "",
                 max_interval: float = MAX_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self._edit = edit
        self.base = self.interval = interval
        self._max_interval = max_interval
        self._clock = clock
        self._name = name  # for the log: the job whose message this is
        self._last_sent = float("-inf")
        self._quiet_until = float("-inf")
        self._held: str | None = None
        self._flusher: asyncio.Task | None = None

    async def show(self, text: str, *, now: bool = False) -> None:
        """Show `text` when its turn comes (`now`: a milestone, as soon as no flood window holds it)."""
        self._held = text
        due = self._due(now)
        if due > self._clock():
            self._flush_at(due)
            return
        await self._send()

    async def finish(self, text: str) -> None:
        """The message's last text (no edit follows): waits out a flood window rather than be lost."""
        self.close()
        self._held = text
        for _ in range(FINAL_TRIES):
            await asyncio.sleep(max(0.0, self._quiet_until - self._clock()))
            if await self._send():
                return

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()

    def _due(self, now: bool) -> float:
        return max(self._quiet_until, self._last_sent + (0.0 if now else self.interval))

    def _flush_at(self, when: float) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(when))

    async def _flush(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - self._clock()))
        while self._held is not None:
            delay = self._due(False) - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            await self._send()

    async def _send(self) -> bool:
        """Edit with the held text. False when the platform flood-limited it (the text is held for later)."""
        text, self._held = self._held, None
        if text is None:
            return True
        self._last_sent = self._clock()
        try:
            await self._edit(text)
        except Flooded as flood:
            self._quiet_until = self._clock() + flood.retry_after
            self.interval = min(max(self.interval * 2, flood.retry_after), self._max_interval)
            if self._held is None:  # nothing newer arrived meanwhile
                self._held = text
            log.info("flood control on progress edits job=%s: quiet for %.0f s, edits every %.1f s now",
                     self._name, flood.retry_after, self.interval)
            self._flush_at(self._quiet_until)
            return False
        except Exception as exc:  # progress is best effort; delivery is what must not fail
            log.warning("progress edit failed job=%s: %s", self._name, type(exc).__name__)
            return True
        self.interval = max(self.base, self.interval * 0.9)  # calm down slowly after a flood
        return True
