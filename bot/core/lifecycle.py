"""The core across restarts: recovery of what was accepted before, housekeeping (delivery retries, retention), and
the graceful stop (refuse new work, keep what waits, let the running picture finish)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection

from bot import replies
from bot.chat import Conversation
from bot.core.delivery import Delivery
from bot.core.feeding import Feeder
from bot.core.following import Follower
from bot.core.room import Room
from bot.core.state import CoreState, log, safe_send
from bot.store import DiskFull, JobRecord
from engine.jobs import Failure, GenerationRequest, JobEvent, JobState


class Lifecycle:
    def __init__(self, state: CoreState, feeder: Feeder, follower: Follower, delivery: Delivery, room: Room):
        self.state = state
        self.room = room
        self.feeder = feeder
        self.follower = follower
        self.delivery = delivery

    def conversation_of(self, record: JobRecord) -> Conversation | None:
        platform = self.state.platforms.get(record.platform)
        if platform is None:
            log.warning("job %s belongs to %s, which is not running now; left for later", record.id, record.platform)
            return None
        try:
            return platform.conversation((record.reply_ref or {}).get("conv", {}))
        except Exception:
            log.exception("cannot rebuild the conversation of job %s", record.id)
            return None

    async def recover(self) -> int:
        """After a (re)start: queue again what was accepted but not finished, deliver what was finished but not
        delivered, in the original order. Returns how many jobs were picked up."""
        store = self.state.store
        picked = 0
        for record in await store.unfinished_jobs():
            conv = self.conversation_of(record)
            if conv is None:
                continue
            picked += 1
            # A full disk (the crash retry cannot be written): picked up when there is room (bot.core.room).
            await self.room.save(f"pick-up of job {record.id}", functools.partial(self._pick_up, record, conv))
        await self.feeder.feed()  # the same feeder as ever: in the store's order (a crash retry behind the others)
        return picked

    async def _pick_up(self, record: JobRecord, conv: Conversation) -> None:
        """One job found unfinished at start-up: deliver it, draw it again, or fail it (its second crash)."""
        if record.status == "done":
            await self.delivery.deliver_stored(record, conv)
            return
        if record.status == "running":
            record = await self.state.store.requeue_after_restart(record.id)
            if record.status == "failed":
                await safe_send(conv, replies.failed(conv.markup, record.error or Failure.RESTARTED))
                return
        live = self.follower.start(record.id, GenerationRequest(record.prompt, record.seed, record.steps,
                                                                record.width, record.height),
                                   conv, record.user_id)
        live.ack_id = await safe_send(conv, replies.restarted_still_coming(conv.markup, record.prompt))

    async def housekeeping(self) -> None:
        """Run now and then: retry deliveries that gave up (the network was down for a while) and delete pictures
        past the retention limits (never undelivered ones)."""
        state = self.state
        for record in await state.store.unfinished_jobs():
            if record.status == "done" and record.id not in state.live:
                conv = self.conversation_of(record)
                if conv is not None:
                    await self.delivery.deliver_stored(record, conv)
        storage = state.config.storage
        try:
            pruned = await state.store.prune_images(keep_days=storage.keep_images_days,
                                                    keep_count=storage.keep_images_count)
        except DiskFull as exc:
            self.room.noticed(exc)
            return
        if pruned:
            log.info("deleted %d old picture(s) (retention: %d days, %d pictures)", pruned, storage.keep_images_days,
                     storage.keep_images_count)

    async def drain(self) -> None:
        """Wait until every job this process follows is finished and delivered (console end of input)."""
        while self.state.live:
            await asyncio.gather(*(live.task for live in list(self.state.live.values()) if live.task),
                                 return_exceptions=True)

    async def stop_accepting(self, *, told: Collection[str] = ()) -> None:
        """Graceful stop: refuse new work and tell users with waiting jobs that theirs is kept (except on the
        platforms in `told`, whose people already heard what the stop means: the console's Ctrl-C line)."""
        state = self.state
        state.accepting = False
        async with state.feed_lock:
            state.stopping = True  # the feeder hands the engine nothing more
        for live in list(state.live.values()):
            waiting = live.engine_job is None or live.engine_job.state is JobState.QUEUED
            if waiting and live.conv.platform not in told:
                await safe_send(live.conv, replies.restarting(live.conv.markup))
            if live.engine_job is None:
                live.events.put_nowait(JobEvent(live.record_id, "kept"))  # stays queued in the store
