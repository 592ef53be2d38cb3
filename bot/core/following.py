"""Following a job: from the store's queue through the engine's events to a delivered picture.

Each followed job has one task (`Follower.follow`) that turns its events (store positions from the feeder, then the
engine's) into store updates and (throttled) edits of the acknowledgement, then hands the result to delivery.
"""

from __future__ import annotations

import asyncio
import time

from bot import replies
from bot.chat import Conversation
from bot.core.delivery import Delivery
from bot.core.feeding import Feeder
from bot.core.state import CoreState, Live, log, quietly, safe_send
from engine.jobs import GenerationRequest, GenerationResult, JobCancelled, JobEvent, JobFailed


class Follower:
    def __init__(self, state: CoreState, feeder: Feeder, delivery: Delivery):
        self.state = state
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
        """Turn engine events into store updates and (throttled) chat edits, then deliver."""
        state, feeder = self.state, self.feeder
        conv, m, events = live.conv, live.conv.markup, live.events
        last_edit = 0.0
        held: list[str] = []  # the newest text a throttled edit skipped; shown when the interval has passed
        flusher: asyncio.Task | None = None

        async def flush_later(delay: float) -> None:
            await asyncio.sleep(delay)
            if held:
                await edit(held.pop(), force=True)

        async def edit(text: str, *, force: bool = False) -> None:
            nonlocal last_edit, flusher
            now = time.monotonic()
            if live.ack_id is None or text == live.shown:
                return
            if not force and now - last_edit < conv.progress_interval:
                held[:] = [text]
                if flusher is None or flusher.done():
                    flusher = asyncio.create_task(flush_later(conv.progress_interval - (now - last_edit)))
                return
            held.clear()
            last_edit, live.shown = now, text
            try:
                await conv.edit_text(live.ack_id, text)
            except Exception as exc:  # progress is best effort; delivery is what must not fail
                log.warning("progress edit failed job=%s: %s", live.record_id, type(exc).__name__)

        try:
            while True:
                event: JobEvent = await events.get()
                if event.kind == "queued":
                    await edit(replies.queued(m, event.position, feeder.wait_estimate(event.position)))
                elif event.kind == "started":
                    live.started = True
                    await state.store.mark_running(live.record_id)
                    await feeder.feed_quietly()  # a place in the engine's queue is free; the others move up
                    await edit(replies.queued(m, 0, None), force=True)
                    await quietly(conv.working())
                elif event.kind == "progress" and event.step:
                    await edit(replies.progress(m, event.step, event.total, event.eta))
                    if event.step % 5 == 0:
                        await quietly(conv.working())  # Telegram shows a chat action for ~5 s
                elif event.kind in ("done", "failed", "cancelled", "kept"):
                    break
            if live.engine_job is None:  # it never reached the engine
                if event.kind == "kept":  # a graceful stop: still queued in the store for the next start
                    return
                if event.kind == "cancelled":
                    state.metrics.finished("cancelled")
                    log.info("cancelled job=%s platform=%s user=%s", live.record_id, conv.platform, live.user_id)
                    await state.store.mark_cancelled(live.record_id)
                    await edit(replies.cancelled(m), force=True)
                    return
                error = event.error or "generation failed"
                state.metrics.finished("failed")
                log.warning("failed job=%s platform=%s user=%s: %s", live.record_id, conv.platform, live.user_id,
                            error)
                await state.store.mark_failed(live.record_id, error)
                await edit(replies.failed(m, error), force=True)
                if live.ack_id is None:
                    await safe_send(conv, replies.failed(m, error))
                return
            try:
                result: GenerationResult = await live.engine_job.wait()
            except JobCancelled:
                if state.stopping and not live.user_cancelled:
                    # Stopped on purpose by a graceful shutdown: back in the queue without using up its one
                    # crash retry. It is picked up, in order, at the next start.
                    await state.store.return_to_queue(live.record_id)
                    log.info("kept job=%s for the next start", live.record_id)
                    return
                state.metrics.finished("cancelled")
                log.info("cancelled job=%s platform=%s user=%s", live.record_id, conv.platform, live.user_id)
                await state.store.mark_cancelled(live.record_id)
                await edit(replies.cancelled(m), force=True)
                return
            except JobFailed as exc:
                state.metrics.finished("failed")
                log.warning("failed job=%s platform=%s user=%s: %s", live.record_id, conv.platform, live.user_id,
                            exc)
                await state.store.mark_failed(live.record_id, str(exc))
                await edit(replies.failed(m, str(exc)), force=True)
                if live.ack_id is None:
                    await safe_send(conv, replies.failed(m, str(exc)))
                return
            state.job_seconds = result.seconds if state.job_seconds is None else (
                0.7 * state.job_seconds + 0.3 * result.seconds)
            path = await state.store.mark_done(live.record_id, result.png, duration=result.seconds,
                                               seconds_per_step=result.seconds_per_step)
            state.metrics.finished("done", result)
            log.info("done job=%s platform=%s user=%s seconds=%.1f s_per_step=%.3f peak_vram=%s", live.record_id,
                     conv.platform, live.user_id, result.seconds, result.seconds_per_step,
                     "-" if result.peak_vram_bytes is None else f"{result.peak_vram_bytes / 2**30:.2f}GiB")
            record = await state.store.get_job(live.record_id)
            assert record is not None  # just marked done; jobs are never deleted
            await self.delivery.deliver(record, conv, png=result.png, seconds=result.seconds, notice=result.notice,
                                        path=str(path))
            await edit(m.escape("Done."), force=True)
        except Exception:
            log.exception("following job %s failed", live.record_id)
        finally:
            if flusher is not None:
                flusher.cancel()
            state.live.pop(live.record_id, None)
            await feeder.feed_quietly()
