"""Full-disk episodes: what the bot does while the database or a picture cannot be written for lack of room.

An episode starts at the first `store.DiskFull` (or at start-up with less than SPACE_MARGIN free). The owner gets one
log line for it, not one per message; the core then hands the engine no more jobs (each picture would fail to save)
and refuses new ones in plain words. Writes that could not be made (a job going back to the queue, a cancel, a
delivery record) are kept here, in memory and in order, and replayed when there is room: the store's updates are
conditional on the job's state, so a replayed one that no longer applies changes nothing. `recover()` (the core calls
it every CHECK_INTERVAL seconds during an episode) looks at the free space: once there is room for the largest picture
that failed plus SPACE_MARGIN for the database, it replays the kept writes and ends the episode with one log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bot.store import DiskFull

log = logging.getLogger(__name__)

SPACE_MARGIN = 256 * 1024
"""Bytes the database needs beyond the pictures (its write-ahead log grows by a few pages per change)."""
CHECK_INTERVAL = 5.0
"""Seconds between looks at the free space during an episode: a statvfs call, cheap enough to notice room soon."""

Write = Callable[[], Awaitable[object]]


class DiskWatch:
    """The state of the disk as the bot last met it, and the writes it owes the store."""

    def __init__(self, free_bytes: Callable[[], int], *, margin: int = SPACE_MARGIN,
                 set_aside: Callable[[], object] = lambda: None):
        """`free_bytes`: the room the bot may use (the store's spare space); `set_aside`: called when the episode
        ends, to set the database's reserve aside again."""
        self._free_bytes = free_bytes
        self._set_aside = set_aside
        self.margin = margin
        self.full = False
        self._needed = 0  # the largest picture that could not be saved this episode
        self._kept: list[tuple[str, Write]] = []

    def free(self) -> int | None:
        try:
            return self._free_bytes()
        except OSError:
            return None

    def has_room(self) -> bool:
        free = self.free()
        return free is not None and free >= self._needed + self.margin

    def noticed(self, reason: object, *, needed: int = 0, told: bool = False) -> None:
        """A write failed for lack of room (`needed`: the bytes it wanted). Logs the episode's start once, unless the
        owner was `told` otherwise (the runner's start-up warning)."""
        self._needed = max(self._needed, needed)
        if self.full:
            return
        self.full = True
        if not told:
            log.error("the disk is full (%s): no picture is drawn and no new one accepted until there is room; "
                      "accepted pictures are kept and drawn then", reason)

    def keep(self, what: str, write: Write) -> None:
        """A store write to make once there is room (`what` names it for the log)."""
        self._kept.append((what, write))

    @property
    def kept(self) -> int:
        return len(self._kept)

    async def replay(self) -> bool:
        """Make the kept writes, in order; True when none is left (stops at the first that still finds no room)."""
        while self._kept:
            what, write = self._kept[0]
            try:
                await write()
            except DiskFull:
                return False
            except Exception:  # the job changed meanwhile beyond what the write can apply: nothing left to owe
                log.exception("could not make a kept change (%s); dropped", what)
            self._kept.pop(0)
        return True

    async def recover(self) -> bool:
        """End the episode if there is room again: True when it is over (or there was none)."""
        if not self.full:
            return True
        if not self.has_room() or not await self.replay():
            return False
        self.full, self._needed = False, 0
        await asyncio.to_thread(self._set_aside)
        free = self.free()
        log.warning("the disk has room again (%s free): drawing resumes",
                    "?" if free is None else f"{free / 2**20:.1f} MiB")
        return True
