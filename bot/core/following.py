"""Following a job: from the store's queue through the engine's events to a delivered picture.

Each followed job has one task (`Follower.follow`, a short flat loop) that turns its events (store positions from the
feeder, then the engine's) into store updates and edits of the acknowledgement, paced by the message's one
`EditPacer`, then hands the result to delivery and ends the message on its last text.
"""

from __future__ import annotations

import asyncio
from functools import partial

from bot import replies
from bot.chat import Conversation
from bot.core.delivery import Delivery
from bot.core.feeding import Feeder
from bot.core.pacing import EditPacer
from bot.core.room import Room
from bot.core.state import CoreState, Live, log, quietly, safe_send
from bot.store import DiskFull
from engine.jobs import Failure, GenerationRequest, GenerationResult, JobCancelled, JobEvent, JobFailed

ENDS = ("done", "failed", "cancelled", "kept")
"""Events after which a job has nothing more to show (kept: a graceful stop left it queued in the store)."""


class Follower:
    def __init__(self, state: CoreState, feeder: Feeder, delivery: Delivery, room: Room):
        self.state = state
        self.room = room
        self.feeder = feeder
        self.delivery = delivery

    def start(self, job_id: str, request: GenerationRequest, conv: Conversation, user_id: str) -> Live:
        """Follow a stored, queued job. The feeder hands it to the engine when its turn in the store's queue comes;
        events (store positions, then the engine's) queue up until the follower runs."""
        live = Live(job_id, request, asyncio.Queue(), conv, user_id, ack_id=None)
        self.state.live[job_id] = live
        live.task = asyncio.create_task(self.follow(live), name=f"follow-{job_id}")
        return live

    async def follow(self, live: Live) -> None:
        """Turn the job's events into store updates and paced edits of its acknowledgement, then deliver."""
        pacer = EditPacer(partial(self._edit, live), live.conv.progress_interval, name=live.record_id)
        try:
            while (event := await live.events.get()).kind not in ENDS:
                await self._on_event(live, pacer, event)
            ended = self._ended_in_store if live.engine_job is None else self._ended_in_engine
            last = await ended(live, event)
            if last is not None and live.ack_id is not None:
                await pacer.finish(last)
        except Exception:
            log.exception("following job %s failed", live.record_id)
        finally:
            pacer.close()
            self.state.live.pop(live.record_id, None)
            if live.not_saved:
                self.start(live.record_id, live.request, live.conv, live.user_id).ack_id = live.ack_id
            await self.feeder.feed_quietly()

    async def _on_event(self, live: Live, pacer: EditPacer, event: JobEvent) -> None:
        """A place in the store's queue, the start, or a step: the acknowledgement shows it."""
        m = live.conv.markup
        if event.kind == "queued":
            await self._show(live, pacer, replies.queued(m, event.position, self.feeder.wait_estimate(event.position)))
        elif event.kind == "started":
            live.started = True
            job_id = live.record_id
            await self.room.save(f"start of job {job_id}", lambda: self.state.store.mark_running(job_id))
            await self.feeder.feed_quietly()  # a place in the engine's queue is free; the others move up
            await self._show(live, pacer, replies.queued(m, 0, None), now=True)
            await quietly(live.conv.working())
        elif event.kind == "progress" and event.step:
            await self._show(live, pacer, replies.progress(m, event.step, event.total, event.eta))
            if event.step % 5 == 0:
                await quietly(live.conv.working())  # Telegram shows a chat action for ~5 s

    @staticmethod
    async def _show(live: Live, pacer: EditPacer, text: str, *, now: bool = False) -> None:
        if live.ack_id is None or text == live.shown:
            return
        live.shown = text
        await pacer.show(text, now=now)

    @staticmethod
    async def _edit(live: Live, text: str) -> None:
        assert live.ack_id is not None  # only shown once acknowledged
        await live.conv.edit_text(live.ack_id, text)

    async def _ended_in_store(self, live: Live, event: JobEvent) -> str | None:
        """A job that never reached the engine: kept for the next start, cancelled, or failed. Returns the
        acknowledgement's last text."""
        if event.kind == "kept":  # a graceful stop: still queued in the store for the next start
            return None
        if event.kind == "cancelled":
            return await self._cancelled(live)
        return await self._failed(live, event.error or Failure.CRASHED)

    async def _ended_in_engine(self, live: Live, event: JobEvent) -> str | None:
        """The engine's outcome: delivered, cancelled (or kept at a graceful stop), or failed."""
        state = self.state
        assert live.engine_job is not None
        try:
            result: GenerationResult = await live.engine_job.wait()
        except JobCancelled:
            if state.stopping and not live.user_cancelled:
                # Stopped on purpose by a graceful shutdown: back in the queue without using up its one
                # crash retry. It is picked up, in order, at the next start.
                job_id = live.record_id
                await self.room.save(f"requeue of job {job_id}", lambda: state.store.return_to_queue(job_id))
                log.info("kept job=%s for the next start", live.record_id)
                return None
            return await self._cancelled(live)
        except JobFailed as exc:
            return await self._failed(live, exc.failure, exc.detail)
        return await self._done(live, result)

    async def _cancelled(self, live: Live) -> str:
        self.state.metrics.finished("cancelled")
        log.info("cancelled job=%s platform=%s user=%s", live.record_id, live.conv.platform, live.user_id)
        job_id = live.record_id
        await self.room.save(f"cancel of job {job_id}", lambda: self.state.store.mark_cancelled(job_id))
        return replies.cancelled(live.conv.markup)

    async def _failed(self, live: Live, failure: Failure, detail: str = "") -> str:
        self.state.metrics.finished("failed")
        log.warning("failed job=%s platform=%s user=%s: %s%s", live.record_id, live.conv.platform, live.user_id,
                    failure, f" ({detail})" if detail else "")
        job_id = live.record_id
        await self.room.save(f"failure of job {job_id}", lambda: self.state.store.mark_failed(job_id, failure))
        text = replies.failed(live.conv.markup, failure)
        if live.ack_id is None:
            await safe_send(live.conv, text)
        return text

    async def _done(self, live: Live, result: GenerationResult) -> str | None:
        """Save and deliver the picture; returns the acknowledgement's last text."""
        state, job_id = self.state, live.record_id
        state.job_seconds = result.seconds if state.job_seconds is None else (
            0.7 * state.job_seconds + 0.3 * result.seconds)
        try:
            path = await state.store.mark_done(job_id, result.png, duration=result.seconds,
                                               seconds_per_step=result.seconds_per_step)
        except DiskFull as exc:
            # Not saved: back in the queue (kept in memory if even that cannot be written), drawn again when there
            # is room; its user hears why.
            self.room.noticed(exc, needed=len(result.png))
            await self.room.save(f"requeue of job {job_id}", lambda: state.store.return_to_queue(job_id))
            log.info("not saved job=%s (disk full): queued again", job_id)
            live.not_saved = True
            text = replies.disk_full_not_saved(live.conv.markup)
            if live.ack_id is None:  # never acknowledged (a job recovered at start): told in a message of its own
                live.ack_id = await safe_send(live.conv, text)
                return None
            return text
        state.metrics.finished("done", result)
        log.info("done job=%s platform=%s user=%s seconds=%.1f s_per_step=%.3f peak_vram=%s", live.record_id,
                 live.conv.platform, live.user_id, result.seconds, result.seconds_per_step,
                 "-" if result.peak_vram_bytes is None else f"{result.peak_vram_bytes / 2**30:.2f}GiB")
        record = await state.store.get_job(live.record_id)
        assert record is not None  # just marked done; jobs are never deleted
        await self.delivery.deliver(record, live.conv, png=result.png, seconds=result.seconds, test_model=result.test_model,
                                    path=str(path))
        return replies.done(live.conv.markup)
