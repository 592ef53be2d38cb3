"""A full disk, for the core's other parts: every store write that must not be lost goes through `Room.save`, which
keeps it (in memory, in order) when the disk has no room, and the episode is watched until there is room again
(bot.diskspace: one log line each way). While it lasts the feeder hands the engine nothing and new pictures are
refused in plain words; reads (/history, /usage) work as ever."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from bot import replies
from bot.chat import Conversation, User
from bot.core.feeding import Feeder
from bot.core.state import CoreState, log
from bot.diskspace import CHECK_INTERVAL
from bot.store import DiskFull


class Room:
    def __init__(self, state: CoreState, feeder: Feeder, *, check_interval: float = CHECK_INTERVAL):
        self.state = state
        self.feeder = feeder
        self.check_interval = check_interval
        self._watcher: asyncio.Task | None = None

    @property
    def full(self) -> bool:
        return self.state.disk.full

    def noticed(self, reason: object, *, needed: int = 0, told: bool = False) -> None:
        """A write failed for lack of room (or there is none at start): an episode, watched until there is room."""
        self.state.disk.noticed(reason, needed=needed, told=told)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="disk-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                if await self.state.disk.recover():
                    break
            except Exception:
                log.exception("checking the disk failed; trying again")
        await self.feeder.feed_quietly()  # the jobs kept meanwhile are drawn now, in the store's order

    async def save(self, what: str, write: Callable[[], Awaitable[Any]]) -> Any:
        """Make a store write and return its result. On a full disk: give it the database's reserve (store.
        RESERVE_BYTES) and try once more, else keep it for when there is room and return None."""
        try:
            return await write()
        except DiskFull as exc:
            self.noticed(exc)
        if self.state.store.release_reserve():
            try:
                return await write()
            except DiskFull:
                pass
        self.state.disk.keep(what, write)
        return None

    async def refuse(self, user: User, conv: Conversation) -> None:
        """A new picture while the disk is full: it could not be saved either, so it is not taken."""
        self.state.metrics.refused("disk_full")
        log.info("refused platform=%s user=%s reason=disk_full", user.platform, user.id)
        await conv.send_text(replies.disk_full_refused(conv.markup))

    async def save_kept(self) -> int:
        """At the stop: make the writes a full disk held back, if there is room now. Returns how many are still not
        saved (those jobs are found as they were last saved at the next start: a running one counts a crash retry)."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.state.disk.replay()
        return self.state.disk.kept
