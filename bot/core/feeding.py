"""The feeder: the store's queue is the one queue, and the engine gets only the next job(s) in its order.

`Feeder.feed` hands the engine as many queued jobs as `engine.capacity` allows and at most `feed_ahead` waiting in
the engine, whenever a job is admitted, starts, ends or is cancelled, then tells every waiting job its place in the
store's queue. It uses only the engine's public interface (`check`, `capacity`, `submit`, the job handle), so a
remote engine plugs in the same way.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from bot.core.state import FEED_AHEAD, CoreState, Live, log
from engine.jobs import EngineError, GenerationRequest, JobEvent, RequestRefusal


class Feeder:
    def __init__(self, state: CoreState, *, feed_ahead: int = FEED_AHEAD):
        self.state = state
        self.feed_ahead = feed_ahead

    async def feed(self) -> None:
        """Hand the engine the next queued jobs in the store's order, as many as it has room for (see FEED_AHEAD),
        then tell every waiting job its place in the store's queue."""
        state = self.state
        async with state.feed_lock:
            if state.stopping or state.disk.full:  # a full disk: pictures could not be saved (bot.core.room)
                return
            try:
                queue = await state.store.queue()
            except Exception:
                log.exception("cannot read the queue; feeding the engine later")
                return
            waiting_in_engine = sum(1 for live in state.live.values()
                                    if live.engine_job is not None and not live.started)
            capacity = getattr(state.engine, "capacity", None)
            ahead = self.feed_ahead - waiting_in_engine
            room = ahead if capacity is None else min(capacity, ahead)
            for job_id in queue:
                if room <= 0:
                    break
                live = state.live.get(job_id)
                if live is None or live.engine_job is not None or live.user_cancelled:
                    continue  # not followed by this process (its platform is not running), or already handed over
                listener = engine_events(live.events)
                try:
                    live.engine_job = state.engine.submit(live.request, listener, job_id=job_id)
                except EngineError as exc:
                    # What the engine can never draw was refused at admission; this is a job accepted earlier (before
                    # a restart, under another config or device): fail it and tell its user.
                    live.events.put_nowait(JobEvent(job_id, "failed", error=exc.failure))
                    continue
                room -= 1
            self.announce_positions(queue)

    def announce_positions(self, queue: list[str]) -> None:
        """Each followed job not started yet hears its place in the store's queue when it changed."""
        for index, job_id in enumerate(queue, start=1):
            live = self.state.live.get(job_id)
            if live is not None and not live.started and live.position != index:
                live.position = index
                live.events.put_nowait(JobEvent(job_id, "queued", position=index))

    async def feed_quietly(self) -> None:
        try:
            await self.feed()
        except Exception:
            log.exception("feeding the engine failed; trying again at the next change")

    def cancel_live(self, live: Live) -> bool:
        """Cancel a followed job: in the engine once handed over, else only in the store (its follower does that)."""
        live.user_cancelled = True
        if live.engine_job is not None:
            return bool(live.engine_job.cancel())
        live.events.put_nowait(JobEvent(live.record_id, "cancelled"))
        return True

    def engine_refusal(self, request: GenerationRequest) -> RequestRefusal | None:
        check = getattr(self.state.engine, "check", None)
        return check(request) if check is not None else None

    def wait_estimate(self, position: int) -> float | None:
        """Seconds until a job at `position` starts: the jobs ahead (the running one counted whole) times the
        average job so far, divided among the jobs drawn at once. None until one job has finished."""
        job_seconds = self.state.job_seconds
        if job_seconds is None or position <= 0:
            return None
        # Jobs drawn at once: 1 for the local engine, every live worker for the cluster's.
        parallel = max(1, int(getattr(self.state.engine, "parallelism", 1)))
        return job_seconds * -(-position // parallel)


def engine_events(events: asyncio.Queue[JobEvent]) -> Callable[[JobEvent], None]:
    """The engine's events for a follower, less its own queue positions: users hear their place in the store's
    queue (`Feeder.announce_positions`), which counts every waiting job, not the few handed to the engine."""

    def listener(event: JobEvent) -> None:
        if event.kind != "queued":
            events.put_nowait(event)

    return listener
