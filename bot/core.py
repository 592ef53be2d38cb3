"""The chat core: every rule lives here once, for every platform.

    message -> parse -> policy (allowlist, blocked words) -> what the engine can never draw (engine.check: a size
    this device cannot afford) -> limits + durable write (store.admit) -> ack with queue position -> the feeder
    hands it to the engine when its turn comes -> throttled progress edits -> picture with seed + buttons -> delivered

The store's queue is the one queue: the feeder (`_feed`) hands the engine only the next job(s) in the store's order,
as many as `engine.capacity` allows and at most FEED_AHEAD waiting in the engine, whenever a job is admitted, starts,
ends or is cancelled. So whatever the store admitted is drawn in order, however small the engine's own queue is;
queue positions shown to users are places in the store's queue; a job not yet handed over is cancelled in the store
alone; at a stop or crash, jobs not yet handed over are simply still queued. Recovery after a restart follows the
stored jobs again and lets the same feeder hand them over. The feeder uses only the engine's public interface
(`check`, `capacity`, `submit`, the job handle), so a remote engine plugs in the same way.

Adapters translate platform events into calls on `ChatCore` and give it a `Conversation` to answer in. The core
imports no chat library and no torch: the engine arrives as an object with `submit()` (engine.worker.Engine, or a
fake in adapter tests).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from bot import replies
from bot.chat import Button, Conversation, Picture, Platform, User, parse_button
from bot.commands import SEED_MAX, DrawCommand, DrawRules, UsageError, parse_draw, split_command, validate_draw
from bot.config import Config
from bot.metrics import Metrics
from bot.store import JobRecord, NewJob, Refused, Store
from engine.jobs import (
    EngineError,
    GenerationRequest,
    GenerationResult,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobHandle,
    JobState,
    RequestRefusal,
)

log = logging.getLogger(__name__)

HISTORY_SHOWN = 10
"""Pictures /history lists, numbered from 1 (the newest); `/again N` takes those numbers."""

FEED_AHEAD = 1
"""Jobs handed to the engine beyond the one it draws: enough that it never waits between jobs, few enough that the
store's queue (fair order, cancel, stop) stays the truth."""


class EngineLike(Protocol):
    def submit(self, request: GenerationRequest, listener: Callable[[JobEvent], None] | None = None, *,
               job_id: str | None = None) -> JobHandle: ...

    @property
    def queue_length(self) -> int: ...

    # Optional (read with getattr, absent in simple fakes): `capacity` (how many more jobs `submit` takes now) and
    # `check(request) -> RequestRefusal | None` (what it can never draw).


@dataclass
class _Live:
    """A job this process is following: its engine handle and where to talk about it."""

    record_id: str
    request: GenerationRequest
    events: asyncio.Queue[JobEvent]
    conv: Conversation
    user_id: str
    ack_id: str | None
    engine_job: JobHandle | None = None  # the engine's handle once the feeder handed the job over; None while only in the store
    started: bool = False
    position: int | None = None  # the place in the store's queue last told to the follower
    shown: str | None = None  # text the ack message shows now (no edit when unchanged)
    user_cancelled: bool = False
    task: asyncio.Task | None = None


class ChatCore:
    def __init__(
        self,
        config: Config,
        store: Store,
        engine: EngineLike,
        *,
        is_test_model: bool = False,
        count_tokens: Callable[[str], int] | None = None,
        random_seed: Callable[[], int] = lambda: secrets.randbelow(SEED_MAX + 1),
        clock: Callable[[], float] = time.time,
        delivery_attempts: int = 5,
        delivery_backoff: float = 2.0,
        metrics: Metrics | None = None,
        feed_ahead: int = FEED_AHEAD,
    ):
        self.config = config
        self.store = store
        self.engine = engine
        self.is_test_model = is_test_model
        self._count_tokens = count_tokens
        self._random_seed = random_seed
        self._clock = clock
        self._delivery_attempts = delivery_attempts
        self._delivery_backoff = delivery_backoff
        self.metrics = metrics if metrics is not None else Metrics()  # a fresh registry unless the runner shares one
        self._platforms: dict[str, Platform] = {}
        self._live: dict[str, _Live] = {}
        self._accepting = True
        self._stopping = False
        self._job_seconds: float | None = None  # moving average of finished jobs, for queue ETAs
        self._feed_lock = asyncio.Lock()
        self._feed_ahead = feed_ahead
        self._blocked = [re.compile(p, re.IGNORECASE) for p in config.policy.blocked_words]
        self._granted_admins: set[str] = set()  # proven otherwise than by config (the web admin password)

    # -- wiring ---------------------------------------------------------------------------------------------------
    def add_platform(self, platform: Platform) -> None:
        self._platforms[platform.name] = platform

    def reload(self, config: Config) -> None:
        """Apply the parts of a new config that can change live: limits, policy (allowlists, blocked words)."""
        self.config = self.config.model_copy(update={"limits": config.limits, "policy": config.policy})
        self._blocked = [re.compile(p, re.IGNORECASE) for p in config.policy.blocked_words]
        log.info("config reloaded: limits and policy")

    @property
    def rules(self) -> DrawRules:
        e, lim = self.config.engine, self.config.limits
        return DrawRules(min_steps=e.min_steps, max_steps=e.max_steps, default_steps=e.default_steps,
                         width=e.width, height=e.height, max_prompt_chars=lim.max_prompt_chars,
                         max_prompt_tokens=lim.max_prompt_tokens, count_tokens=self._count_tokens)

    # -- text commands (console, Telegram) -----------------------------------------------------------------------
    async def on_text(self, user: User, conv: Conversation, text: str, *, bot_username: str | None = None) -> None:
        """Any message. Commands are answered; other text is ignored in groups and gets a hint in private chats."""
        split = split_command(text)
        if split is None:
            if user.chat_kind == "private" and text.strip():
                await conv.send_text(conv.markup.escape("Send /draw followed by what to draw, e.g. ")
                                     + conv.markup.code(replies.EXAMPLES[0]) + conv.markup.escape(" - /help for more."))
            return
        command, rest, addressed_to = split
        if addressed_to and bot_username and addressed_to.lower() != bot_username.lower():
            return  # `/draw@OtherBot` in a group: not for us
        handler = {
            "draw": lambda: self._draw_text(user, conv, rest),
            "start": lambda: self.help(user, conv),
            "help": lambda: self.help(user, conv),
            "history": lambda: self.history(user, conv),
            "usage": lambda: self.usage(user, conv),
            "cancel": lambda: self.cancel(user, conv),
            "ban": lambda: self._ban_text(user, conv, rest, ban=True),
            "unban": lambda: self._ban_text(user, conv, rest, ban=False),
            "again": lambda: self._button_text(user, conv, "again", rest),
            "reroll": lambda: self._button_text(user, conv, "reroll", rest),
        }.get(command)
        if handler is None:
            if user.chat_kind == "private":
                await conv.send_text(conv.markup.escape(f"I don't know /{command}. Try /help."))
            return
        await handler()

    async def _draw_text(self, user: User, conv: Conversation, rest: str) -> None:
        try:
            command = parse_draw(rest, self.rules)
        except UsageError as exc:
            await conv.send_text(conv.markup.escape(str(exc)))
            return
        await self.submit(user, conv, command)

    async def _button_text(self, user: User, conv: Conversation, action: str, rest: str) -> None:
        """/again, /reroll with a job id or the number /history shows next to the picture."""
        target = rest.strip()
        if target.isdecimal() and len(target) <= 3:
            shown = await self.store.history(user.platform, user.id, HISTORY_SHOWN)
            n = int(target)
            if not 1 <= n <= len(shown):
                await conv.send_text(conv.markup.escape(replies.no_such_history_entry(n, len(shown))))
                return
            target = shown[n - 1].id
        answer = await self.on_button(user, conv, f"{action}:{target}")
        if answer and answer != replies.QUEUED_TOAST:  # accepted: the queue message already said so
            await conv.send_text(conv.markup.escape(answer))

    async def _ban_text(self, user: User, conv: Conversation, rest: str, *, ban: bool) -> None:
        """/ban <user id>, /unban <user id>: admins only; the target is on the admin's own platform."""
        target = rest.strip()
        if not target or len(target.split()) != 1:
            verb = "ban" if ban else "unban"
            await conv.send_text(conv.markup.escape(f"Usage: /{verb} <user id>, e.g. /{verb} 123456789"))
            return
        answer = await (self.ban if ban else self.unban)(user, user.platform, target)
        await conv.send_text(conv.markup.escape(answer))

    # -- typed commands (Discord) ----------------------------------------------------------------------------------
    async def draw(self, user: User, conv: Conversation, prompt: str, seed: int | None = None,
                   steps: int | None = None, size: str | None = None, as_file: bool = False) -> None:
        try:
            command = validate_draw(prompt, seed, steps, self.rules, size=size, as_file=as_file)
        except UsageError as exc:
            await conv.send_text(conv.markup.escape(str(exc)))
            return
        await self.submit(user, conv, command)

    # -- the draw path -----------------------------------------------------------------------------------------------
    def _refusal_by_policy(self, user: User, prompt: str) -> str | None:
        policy = self.config.policy
        if policy.allowed_users and user.key not in policy.allowed_users and not self._is_admin(user):
            return "Sorry, this bot only draws for the people its owner allowed."
        chat_key = f"{user.platform}:{user.chat_id}"
        if policy.allowed_chats and chat_key not in policy.allowed_chats and not self._is_admin(user):
            return "Sorry, this bot does not draw in this chat."
        for pattern in self._blocked:
            match = pattern.search(prompt)
            if match:
                return f"Sorry, that prompt contains something this bot does not draw (“{replies.short(match.group(0), 40)}”)."
        return None

    def _wait_estimate(self, position: int) -> float | None:
        """Seconds until a job at `position` starts: the jobs ahead (the running one counted whole) times the
        average job so far, divided among the jobs drawn at once. None until one job has finished."""
        if self._job_seconds is None or position <= 0:
            return None
        # Jobs drawn at once: 1 for the local engine, every live worker for the cluster's.
        parallel = max(1, int(getattr(self.engine, "parallelism", 1)))
        return self._job_seconds * -(-position // parallel)

    def _is_admin(self, user: User) -> bool:
        return user.key in self.config.limits.admins or user.key in self._granted_admins

    def is_admin(self, user: User) -> bool:
        """Exempt from limits, may ban and cancel anyone's job: named in [limits].admins, or granted by a platform."""
        return self._is_admin(user)

    def grant_admin(self, key: str) -> None:
        """`platform:id` proved it is an owner another way (the web page's admin password); lasts until restart."""
        self._granted_admins.add(key)

    async def is_banned(self, platform: str, user_id: str) -> bool:
        """Banned in the config file, or by an admin from chat (kept in the store across restarts)."""
        return f"{platform}:{user_id}" in self.config.limits.banned or await self.store.is_banned(platform, user_id)

    async def ban(self, admin: User, platform: str, user_id: str) -> str:
        """An admin bans someone from chat. Returns the outcome as a short sentence for the admin."""
        key = f"{platform}:{user_id}"
        if not self._is_admin(admin):
            return "Only the bot's admins can ban."
        if key in self.config.limits.admins:
            return f"{key} is an admin; remove them from [limits].admins in the config first."
        if not await self.store.ban(platform, user_id, by=admin.key):
            return f"{key} is already banned."
        log.info("admin %s banned %s", admin.key, key)
        return f"{key} is banned (until an admin unbans them)."

    async def unban(self, admin: User, platform: str, user_id: str) -> str:
        key = f"{platform}:{user_id}"
        if not self._is_admin(admin):
            return "Only the bot's admins can unban."
        lifted = await self.store.unban(platform, user_id)
        if key in self.config.limits.banned:
            return f"{key} is banned in the config file ([limits].banned); remove them there and reload."
        if not lifted:
            return f"{key} is not banned."
        log.info("admin %s unbanned %s", admin.key, key)
        return f"{key} may draw again."

    async def cancel_job(self, admin: User, job_id: str) -> str:
        """An admin cancels anyone's queued or running job (the owner dashboard). Returns the outcome as a sentence."""
        if not self._is_admin(admin):
            return "Only the bot's admins can cancel other people's pictures."
        live = self._live.get(job_id)
        if live is not None:
            if self._cancel_live(live):
                log.info("admin %s cancelled job=%s", admin.key, job_id)
                return f"Cancelled {job_id}."
        if await self.store.mark_cancelled(job_id):  # in the table but not followed here: never leave it stuck
            log.info("admin %s cancelled job=%s", admin.key, job_id)
            return f"Cancelled {job_id}."
        return f"{job_id} is not waiting or drawing."

    async def submit(self, user: User, conv: Conversation, command: DrawCommand) -> str | None:
        """Admit, persist, acknowledge and queue one picture. Returns the job id, or None when refused."""
        m = conv.markup
        if not self._accepting:
            self.metrics.refused("restarting")
            await conv.send_text(m.escape("The bot is restarting; please try again in a minute."))
            return None
        refusal = self._refusal_by_policy(user, command.prompt)
        if refusal:
            self.metrics.refused("policy")
            log.info("refused platform=%s user=%s reason=policy", user.platform, user.id)
            await conv.send_text(m.escape(refusal))
            return None
        seed = self._random_seed() if command.seed is None else command.seed
        request = GenerationRequest(command.prompt, seed, command.steps, command.width, command.height)
        cannot = self._engine_refusal(request)
        if cannot is not None:  # known now: refused before anyone hears "accepted"
            self.metrics.refused(cannot.reason)
            log.info("refused platform=%s user=%s reason=%s", user.platform, user.id, cannot.reason)
            await conv.send_text(replies.engine_refusal(m, cannot, prompt=command.prompt))
            return None
        admission = await self.store.admit(
            NewJob(platform=user.platform, user_id=user.id, chat_id=user.chat_id, prompt=command.prompt, seed=seed,
                   steps=command.steps, width=command.width, height=command.height,
                   reply_ref={"conv": conv.ref(), "as_file": command.as_file, "user_name": user.name}),
            self.config.limits,
            is_admin=self._is_admin(user),
            is_banned=await self.is_banned(user.platform, user.id),
        )
        if isinstance(admission, Refused):
            log.info("refused platform=%s user=%s reason=%s", user.platform, user.id, admission.reason)
            self.metrics.refused(admission.reason)
            if admission.notify:
                await conv.send_text(m.escape(admission.message))
            return None
        job_id = admission.job_id
        self.metrics.accepted(user.platform)
        log.info("accepted job=%s platform=%s user=%s steps=%d size=%dx%d", job_id, user.platform, user.id,
                 command.steps, command.width, command.height)
        live = self._start(job_id, request, conv, user.id)
        queue = await self.store.queue()
        live.position = queue.index(job_id) + 1 if job_id in queue else 0
        live.shown = replies.queued(m, live.position, self._wait_estimate(live.position))
        live.ack_id = await self._safe_send(conv, live.shown)
        await self.store.set_reply_ref(job_id, {"conv": conv.ref(), "ack_id": live.ack_id,
                                                "as_file": command.as_file, "user_name": user.name})
        await self._feed()
        return job_id

    def _engine_refusal(self, request: GenerationRequest) -> RequestRefusal | None:
        check = getattr(self.engine, "check", None)
        return check(request) if check is not None else None

    def _start(self, job_id: str, request: GenerationRequest, conv: Conversation, user_id: str) -> _Live:
        """Follow a stored, queued job. The feeder hands it to the engine when its turn in the store's queue comes;
        events (store positions, then the engine's) queue up until the follower runs."""
        live = _Live(job_id, request, asyncio.Queue(), conv, user_id, ack_id=None)
        self._live[job_id] = live
        live.task = asyncio.create_task(self._follow(live), name=f"follow-{job_id}")
        return live

    async def _feed(self) -> None:
        """Hand the engine the next queued jobs in the store's order, as many as it has room for (see FEED_AHEAD),
        then tell every waiting job its place in the store's queue."""
        async with self._feed_lock:
            if self._stopping:
                return
            try:
                queue = await self.store.queue()
            except Exception:
                log.exception("cannot read the queue; feeding the engine later")
                return
            waiting_in_engine = sum(1 for live in self._live.values()
                                    if live.engine_job is not None and not live.started)
            capacity = getattr(self.engine, "capacity", None)
            ahead = self._feed_ahead - waiting_in_engine
            room = ahead if capacity is None else min(capacity, ahead)
            for job_id in queue:
                if room <= 0:
                    break
                live = self._live.get(job_id)
                if live is None or live.engine_job is not None or live.user_cancelled:
                    continue  # not followed by this process (its platform is not running), or already handed over
                listener = _engine_events(live.events)
                try:
                    live.engine_job = self.engine.submit(live.request, listener, job_id=job_id)
                except EngineError as exc:
                    # What the engine can never draw was refused at admission; this is a job accepted earlier (before
                    # a restart, under another config or device): fail it and tell its user.
                    live.events.put_nowait(JobEvent(job_id, "failed", error=str(exc)))
                    continue
                room -= 1
            self._announce_positions(queue)

    def _announce_positions(self, queue: list[str]) -> None:
        """Each followed job not started yet hears its place in the store's queue when it changed."""
        for index, job_id in enumerate(queue, start=1):
            live = self._live.get(job_id)
            if live is not None and not live.started and live.position != index:
                live.position = index
                live.events.put_nowait(JobEvent(job_id, "queued", position=index))

    def _cancel_live(self, live: _Live) -> bool:
        """Cancel a followed job: in the engine once handed over, else only in the store (its follower does that)."""
        live.user_cancelled = True
        if live.engine_job is not None:
            return bool(live.engine_job.cancel())
        live.events.put_nowait(JobEvent(live.record_id, "cancelled"))
        return True

    async def _feed_quietly(self) -> None:
        try:
            await self._feed()
        except Exception:
            log.exception("feeding the engine failed; trying again at the next change")

    async def _follow(self, live: _Live) -> None:
        """Turn engine events into store updates and (throttled) chat edits, then deliver."""
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
                event = await events.get()
                if event.kind == "queued":
                    await edit(replies.queued(m, event.position, self._wait_estimate(event.position)))
                elif event.kind == "started":
                    live.started = True
                    await self.store.mark_running(live.record_id)
                    await self._feed_quietly()  # a place in the engine's queue is free; the others move up
                    await edit(replies.queued(m, 0, None), force=True)
                    await self._quietly(conv.working())
                elif event.kind == "progress" and event.step:
                    await edit(replies.progress(m, event.step, event.total, event.eta))
                    if event.step % 5 == 0:
                        await self._quietly(conv.working())  # Telegram shows a chat action for ~5 s
                elif event.kind in ("done", "failed", "cancelled", "kept"):
                    break
            if live.engine_job is None:  # it never reached the engine
                if event.kind == "kept":  # a graceful stop: still queued in the store for the next start
                    return
                if event.kind == "cancelled":
                    self.metrics.finished("cancelled")
                    log.info("cancelled job=%s platform=%s user=%s", live.record_id, conv.platform, live.user_id)
                    await self.store.mark_cancelled(live.record_id)
                    await edit(replies.cancelled(m), force=True)
                    return
                error = event.error or "generation failed"
                self.metrics.finished("failed")
                log.warning("failed job=%s platform=%s user=%s: %s", live.record_id, conv.platform, live.user_id,
                            error)
                await self.store.mark_failed(live.record_id, error)
                await edit(replies.failed(m, error), force=True)
                if live.ack_id is None:
                    await self._safe_send(conv, replies.failed(m, error))
                return
            try:
                result: GenerationResult = await live.engine_job.wait()
            except JobCancelled:
                if self._stopping and not live.user_cancelled:
                    # Stopped on purpose by a graceful shutdown: back in the queue without using up its one
                    # crash retry. It is picked up, in order, at the next start.
                    await self.store.return_to_queue(live.record_id)
                    log.info("kept job=%s for the next start", live.record_id)
                    return
                self.metrics.finished("cancelled")
                log.info("cancelled job=%s platform=%s user=%s", live.record_id, conv.platform, live.user_id)
                await self.store.mark_cancelled(live.record_id)
                await edit(replies.cancelled(m), force=True)
                return
            except JobFailed as exc:
                self.metrics.finished("failed")
                log.warning("failed job=%s platform=%s user=%s: %s", live.record_id, conv.platform, live.user_id,
                            exc)
                await self.store.mark_failed(live.record_id, str(exc))
                await edit(replies.failed(m, str(exc)), force=True)
                if live.ack_id is None:
                    await self._safe_send(conv, replies.failed(m, str(exc)))
                return
            self._job_seconds = result.seconds if self._job_seconds is None else (
                0.7 * self._job_seconds + 0.3 * result.seconds)
            path = await self.store.mark_done(live.record_id, result.png, duration=result.seconds,
                                              seconds_per_step=result.seconds_per_step)
            self.metrics.finished("done", result)
            log.info("done job=%s platform=%s user=%s seconds=%.1f s_per_step=%.3f peak_vram=%s", live.record_id,
                     conv.platform, live.user_id, result.seconds, result.seconds_per_step,
                     "-" if result.peak_vram_bytes is None else f"{result.peak_vram_bytes / 2**30:.2f}GiB")
            record = await self.store.get_job(live.record_id)
            assert record is not None  # just marked done; jobs are never deleted
            await self.deliver(record, conv, png=result.png, seconds=result.seconds, notice=result.notice,
                               path=str(path))
            await edit(m.escape("Done."), force=True)
        except Exception:
            log.exception("following job %s failed", live.record_id)
        finally:
            if flusher is not None:
                flusher.cancel()
            self._live.pop(live.record_id, None)
            await self._feed_quietly()

    async def deliver(self, record: JobRecord, conv: Conversation, *, png: bytes, seconds: float,
                      notice: str | None, path: str | None) -> bool:
        """Send the finished picture, retrying with backoff; recorded as delivered exactly once."""
        m = conv.markup
        picture = Picture(
            png=png,
            caption=replies.caption(m, prompt=record.prompt, seed=record.seed, steps=record.steps,
                                    width=record.width, height=record.height, seconds=seconds, notice=notice),
            job_id=record.id,
            buttons=[Button("🎲 New seed", "reroll", record.id), Button("🔁 Same seed", "again", record.id)],
            as_file=bool(record.reply_ref.get("as_file")),
            spoiler=self.config.policy.nsfw_spoiler,
            path=path,
            mention_user=record.user_id,
        )
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._delivery_attempts),
                wait=wait_exponential(multiplier=self._delivery_backoff, max=60),
                reraise=False,
            ):
                with attempt:
                    try:
                        await conv.send_picture(picture)
                    except Exception as exc:
                        self.metrics.delivery_failed(conv.platform)
                        attempts = await self.store.record_delivery_failure(record.id, f"{type(exc).__name__}: {exc}")
                        log.warning("delivery failed job=%s attempt=%d: %s", record.id, attempts, type(exc).__name__)
                        raise
        except RetryError:
            log.error("giving up delivering job=%s for now; it is retried at the next start", record.id)
            return False
        first = await self.store.mark_delivered(record.id)
        log.info("delivered job=%s first=%s", record.id, first)
        return True

    # -- buttons -----------------------------------------------------------------------------------------------------
    async def on_button(self, user: User, conv: Conversation, data: str) -> str | None:
        """A button press (or /again, /reroll). Returns a short answer for the presser (toast / ephemeral)."""
        parsed = parse_button(data)
        if parsed is None:
            return "That button is no longer valid."
        action, job_id = parsed
        record = await self.store.get_job(job_id)
        if record is None:
            return "I can't find that picture any more."
        if record.platform != user.platform or record.user_id != user.id:
            return "Only the person who asked for this picture can use its buttons - send your own /draw!"
        if action in ("reroll", "again"):
            seed = None if action == "reroll" else record.seed
            command = DrawCommand(prompt=record.prompt, seed=seed, steps=record.steps, width=record.width,
                                  height=record.height, as_file=bool(record.reply_ref.get("as_file")))
            job = await self.submit(user, conv, command)
            return replies.QUEUED_TOAST if job else None
        return None

    # -- other commands ----------------------------------------------------------------------------------------------
    async def help(self, user: User, conv: Conversation) -> None:
        e = self.config.engine
        await conv.send_text(replies.help_text(conv.markup, min_steps=e.min_steps, max_steps=e.max_steps,
                                               default_steps=e.default_steps, is_test_model=self.is_test_model,
                                               typed_options=conv.typed_options))

    async def history(self, user: User, conv: Conversation, limit: int = HISTORY_SHOWN) -> None:
        m = conv.markup
        records = await self.store.history(user.platform, user.id, limit)
        if not records:
            await conv.send_text(m.escape("You have no pictures yet. Try ") + m.code(replies.EXAMPLES[0]))
            return
        now = self._clock()
        icons = {"done": "✅", "failed": "⚠️", "cancelled": "✖️", "queued": "⏳", "running": "🎨"}
        lines = [m.bold("Your last pictures:")]
        for n, r in enumerate(records, start=1):
            lines.append(
                m.escape(f"{n}. {icons.get(r.status, '')} “{replies.short(r.prompt, 60)}” · seed ") + m.code(str(r.seed))
                + m.escape(f" · {replies.steps(r.steps)} · {r.width}×{r.height} · {replies.relative_time(r.created_at, now)}")
                + m.escape(f" · again: /again {r.id}")
            )
        buttons = [Button(f"🔁 {n}", "again", r.id) for n, r in enumerate(records[:5], start=1)]
        await conv.send_text("\n".join(lines), buttons=buttons)

    async def usage(self, user: User, conv: Conversation) -> None:
        m = conv.markup
        if self._is_admin(user):
            await conv.send_text(m.escape("You are an admin: no limits apply to you."))
            return
        u = await self.store.usage(user.platform, user.id, self.config.limits)
        now = self._clock()

        def window(used: int, limit: int, retry_at: float | None, frees_at: float | None, name: str) -> str:
            if not limit:
                return f"{name}: {used} (no limit)"
            text = f"{name}: {used} of {limit}"
            if retry_at:
                text += f" - next picture in {replies.duration(retry_at - now)}"
            elif frees_at and used:
                text += f" (a slot frees in {replies.duration(frees_at - now)})"
            return text

        lines = [
            window(u.used_this_hour, u.per_hour, u.hour_retry_at, u.hour_frees_at, "This hour"),
            window(u.used_today, u.per_day, u.day_retry_at, u.day_frees_at, "Last 24 hours"),
            f"Waiting or drawing now: {u.active} of {u.max_active}",
        ]
        if u.cooldown_ends_at and u.cooldown_ends_at > now:
            lines.append(f"Cooldown: {replies.duration(u.cooldown_ends_at - now)} left")
        await conv.send_text(m.escape("\n".join(lines)))

    async def cancel(self, user: User, conv: Conversation) -> None:
        """Cancel the user's own queued and running jobs (never anyone else's)."""
        m = conv.markup
        mine = [live for live in list(self._live.values()) if live.user_id == user.id and
                live.conv.platform == user.platform]
        cancelled = sum(1 for live in mine if self._cancel_live(live))
        # Jobs in the table that this process is not following (should not happen, but never leave them stuck).
        leftovers = [r for r in await self.store.cancel_user_jobs(user.platform, user.id) if r.id not in
                     {live.record_id for live in mine}]
        total = cancelled + len(leftovers)
        await self._feed_quietly()
        await conv.send_text(m.escape(f"Cancelled {total} picture{'s' if total != 1 else ''}." if total else
                                      "You have nothing waiting or drawing."))

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def _conversation_of(self, record: JobRecord) -> Conversation | None:
        platform = self._platforms.get(record.platform)
        if platform is None:
            log.warning("job %s belongs to %s, which is not running now; left for later", record.id, record.platform)
            return None
        try:
            return platform.conversation((record.reply_ref or {}).get("conv", {}))
        except Exception:
            log.exception("cannot rebuild the conversation of job %s", record.id)
            return None

    async def _deliver_stored(self, record: JobRecord, conv: Conversation) -> None:
        """Deliver a picture that was finished earlier (before a restart, or while the network was down)."""
        png = record.image_path.read_bytes() if record.image_path and record.image_path.is_file() else None
        if png is None:
            await self.store.mark_failed(record.id, "the picture file was lost")
            return
        await self.deliver(record, conv, png=png, seconds=record.duration or 0.0,
                           notice=replies.TEST_MODEL_NOTICE if self.is_test_model else None,
                           path=str(record.image_path))

    async def recover(self) -> int:
        """After a (re)start: queue again what was accepted but not finished, deliver what was finished but not
        delivered, in the original order. Returns how many jobs were picked up."""
        picked = 0
        for record in await self.store.unfinished_jobs():
            conv = self._conversation_of(record)
            if conv is None:
                continue
            picked += 1
            if record.status == "done":
                await self._deliver_stored(record, conv)
                continue
            if record.status == "running":
                record = await self.store.requeue_after_restart(record.id)
                if record.status == "failed":
                    await self._safe_send(conv, replies.failed(conv.markup, record.error or "the bot restarted"))
                    continue
            live = self._start(record.id, GenerationRequest(record.prompt, record.seed, record.steps, record.width,
                                                            record.height), conv, record.user_id)
            live.ack_id = await self._safe_send(conv, replies.restarted_still_coming(conv.markup, record.prompt))
        await self._feed()  # the same feeder as ever: in the store's order (a crash retry behind the others)
        return picked

    async def housekeeping(self) -> None:
        """Run now and then: retry deliveries that gave up (the network was down for a while) and delete pictures
        past the retention limits (never undelivered ones)."""
        for record in await self.store.unfinished_jobs():
            if record.status == "done" and record.id not in self._live:
                conv = self._conversation_of(record)
                if conv is not None:
                    await self._deliver_stored(record, conv)
        storage = self.config.storage
        pruned = await self.store.prune_images(keep_days=storage.keep_images_days, keep_count=storage.keep_images_count)
        if pruned:
            log.info("deleted %d old picture(s) (retention: %d days, %d pictures)", pruned, storage.keep_images_days,
                     storage.keep_images_count)

    async def drain(self) -> None:
        """Wait until every job this process follows is finished and delivered (console end of input)."""
        while self._live:
            await asyncio.gather(*(live.task for live in list(self._live.values()) if live.task),
                                 return_exceptions=True)

    async def stop_accepting(self) -> None:
        """Graceful stop: refuse new work and tell users with waiting jobs that theirs is kept."""
        self._accepting = False
        async with self._feed_lock:
            self._stopping = True  # the feeder hands the engine nothing more
        for live in list(self._live.values()):
            if live.engine_job is None or live.engine_job.state is JobState.QUEUED:
                await self._safe_send(live.conv, replies.restarting(live.conv.markup))
            if live.engine_job is None:
                live.events.put_nowait(JobEvent(live.record_id, "kept"))  # stays queued in the store

    async def _safe_send(self, conv: Conversation, text: str) -> str | None:
        try:
            return await conv.send_text(text)
        except Exception as exc:
            log.warning("could not send a message on %s: %s", conv.platform, type(exc).__name__)
            return None

    @staticmethod
    async def _quietly(awaitable) -> None:
        try:
            await awaitable
        except Exception:
            pass


def _engine_events(events: asyncio.Queue[JobEvent]) -> Callable[[JobEvent], None]:
    """The engine's events for a follower, less its own queue positions: users hear their place in the store's
    queue (`ChatCore._announce_positions`), which counts every waiting job, not the few handed to the engine."""

    def listener(event: JobEvent) -> None:
        if event.kind != "queued":
            events.put_nowait(event)

    return listener
