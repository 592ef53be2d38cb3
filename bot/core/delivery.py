"""Delivery: send a finished picture with its caption and buttons, retried with backoff, recorded as delivered
exactly once; pictures finished earlier (before a restart, or while the network was down) go the same way."""

from __future__ import annotations

from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from bot import replies
from bot.chat import Button, Conversation, Picture
from bot.core.room import Room
from bot.core.state import CoreState, log
from bot.store import JobRecord
from engine.jobs import Failure


class Delivery:
    def __init__(self, state: CoreState, room: Room, *, attempts: int = 5, backoff: float = 2.0):
        self.state = state
        self.room = room
        self.attempts = attempts
        self.backoff = backoff

    async def deliver(self, record: JobRecord, conv: Conversation, *, png: bytes, seconds: float,
                      test_model: bool, path: str | None) -> bool:
        """Send the finished picture, retrying with backoff; recorded as delivered exactly once."""
        state = self.state
        m = conv.markup
        picture = Picture(
            png=png,
            caption=replies.caption(m, prompt=record.prompt, seed=record.seed, steps=record.steps,
                                    width=record.width, height=record.height, seconds=seconds, test_model=test_model),
            job_id=record.id,
            buttons=[Button(replies.NEW_SEED_LABEL, "reroll", record.id),
                     Button(replies.SAME_SEED_LABEL, "again", record.id)],
            as_file=bool(record.reply_ref.get("as_file")),
            spoiler=state.config.policy.nsfw_spoiler,
            path=path,
            mention_user=record.user_id,
        )
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff, max=60),
                reraise=False,
            ):
                with attempt:
                    try:
                        await conv.send_picture(picture)
                    except Exception as exc:
                        state.metrics.delivery_failed(conv.platform)
                        attempts = await state.store.record_delivery_failure(record.id, f"{type(exc).__name__}: {exc}")
                        log.warning("delivery failed job=%s attempt=%d: %s", record.id, attempts, type(exc).__name__)
                        raise
        except RetryError:
            log.error("giving up delivering job=%s for now; it is retried at the next start", record.id)
            return False
        first = await self.room.save(f"delivery of job {record.id}", lambda: state.store.mark_delivered(record.id))
        log.info("delivered job=%s first=%s", record.id, first)
        return True

    async def deliver_stored(self, record: JobRecord, conv: Conversation) -> None:
        """Deliver a picture that was finished earlier (before a restart, or while the network was down)."""
        png = record.image_path.read_bytes() if record.image_path and record.image_path.is_file() else None
        if png is None:
            await self.room.save(f"failure of job {record.id}",
                                 lambda: self.state.store.mark_failed(record.id, Failure.PICTURE_LOST))
            return
        await self.deliver(record, conv, png=png, seconds=record.duration or 0.0,
                           test_model=self.state.is_test_model,
                           path=str(record.image_path))
