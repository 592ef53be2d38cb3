"""What the core's parts share: one `CoreState` (config, store, engine, the jobs this process follows, the stop flags)
and the `Live` record of one followed job. Every part of the core gets this one object; none keeps state of its own
that another part reads."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from bot.chat import Conversation, Platform
from bot.config import Config
from bot.diskspace import DiskWatch
from bot.metrics import Metrics
from bot.store import Store
from engine.jobs import GenerationRequest, JobEvent, JobHandle

# One logger name for the whole core: owners (and docs/deploy.md) grep the journal for `bot.core: done job=`.
log = logging.getLogger("bot.core")

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
class Live:
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
    not_saved: bool = False  # its picture could not be saved (disk full): queued again, followed anew
    task: asyncio.Task | None = None


def blocked_patterns(config: Config) -> list[re.Pattern[str]]:
    return [re.compile(p, re.IGNORECASE) for p in config.policy.blocked_words]


@dataclass
class CoreState:
    """The core's one shared state."""

    config: Config
    store: Store
    engine: EngineLike
    metrics: Metrics
    is_test_model: bool = False
    clock: Callable[[], float] = time.time
    platforms: dict[str, Platform] = field(default_factory=dict)
    live: dict[str, Live] = field(default_factory=dict)
    accepting: bool = True
    stopping: bool = False
    job_seconds: float | None = None  # moving average of finished jobs, for queue ETAs
    feed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    blocked: list[re.Pattern[str]] = field(default_factory=list)
    granted_admins: set[str] = field(default_factory=set)  # proven otherwise than by config (the web admin password)
    disk: DiskWatch = field(init=False)  # full-disk episodes (bot.diskspace, bot.core.room)

    def __post_init__(self) -> None:
        self.disk = DiskWatch(self.store.spare_space, set_aside=self.store.make_reserve)

    def is_admin(self, key: str) -> bool:
        return key in self.config.limits.admins or key in self.granted_admins


async def safe_send(conv: Conversation, text: str) -> str | None:
    try:
        return await conv.send_text(text)
    except Exception as exc:
        log.warning("could not send a message on %s: %s", conv.platform, type(exc).__name__)
        return None


async def quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        pass
