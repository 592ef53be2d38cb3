"""The chat core: every rule lives here once, for every platform.

    message -> parse -> policy (allowlist, blocked words) -> what the engine can never draw (engine.check: a size
    this device cannot afford) -> limits + durable write (store.admit) -> ack with queue position -> the feeder
    hands it to the engine when its turn comes -> throttled progress edits -> picture with seed + buttons -> delivered

The store's queue is the one queue: the feeder hands the engine only the next job(s) in the store's order, as many as
`engine.capacity` allows and at most FEED_AHEAD waiting in the engine, whenever a job is admitted, starts, ends or is
cancelled. So whatever the store admitted is drawn in order, however small the engine's own queue is; queue positions
shown to users are places in the store's queue; a job not yet handed over is cancelled in the store alone; at a stop
or crash, jobs not yet handed over are simply still queued. Recovery after a restart follows the stored jobs again
and lets the same feeder hand them over. The feeder uses only the engine's public interface (`check`, `capacity`,
`submit`, the job handle), so a remote engine plugs in the same way.

Adapters translate platform events into calls on `ChatCore` and give it a `Conversation` to answer in. The core
imports no chat library and no torch: the engine arrives as an object with `submit()` (engine.worker.Engine, or a
fake in adapter tests).

One part per concern, sharing one `CoreState` (state.py), wired together here:

    dispatch.py    text commands parsed, typed commands validated, handed to the parts below
    submitting.py  the draw path up to the acknowledgement (policy, engine check, admission)
    feeding.py     the store's queue to the engine, queue positions, cancelling a followed job
    following.py   one task per job: engine events -> store updates and progress edits -> delivery
    delivery.py    the picture sent with retries, recorded once
    buttons.py     reroll / same seed
    account.py     /help, /history, /usage, /cancel
    admin.py       admins, bans, cancelling anyone's job
    lifecycle.py   recovery after a restart, housekeeping, the graceful stop
    room.py        a full disk: writes kept until there is room, the episode watched
"""

from __future__ import annotations

import secrets
import time
from typing import Callable

from bot.chat import Platform
from bot.commands import SEED_MAX, DrawRules
from bot.config import Config
from bot.core.account import Account
from bot.core.admin import Admin
from bot.core.buttons import Buttons
from bot.core.delivery import Delivery
from bot.core.dispatch import Dispatch
from bot.core.feeding import Feeder
from bot.core.following import Follower
from bot.core.lifecycle import Lifecycle
from bot.core.room import Room
from bot.core.state import FEED_AHEAD, HISTORY_SHOWN, CoreState, EngineLike, blocked_patterns, log
from bot.core.submitting import Submitter
from bot.diskspace import CHECK_INTERVAL, DiskWatch
from bot.metrics import Metrics
from bot.store import Store

__all__ = ["FEED_AHEAD", "HISTORY_SHOWN", "ChatCore", "CoreState", "EngineLike"]


class ChatCore:
    """The core as adapters and the runner see it: its parts wired onto one state, their public calls here."""

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
        disk_check_interval: float = CHECK_INTERVAL,
    ):
        # A fresh metrics registry unless the runner shares one.
        self.state = state = CoreState(config, store, engine, metrics if metrics is not None else Metrics(),
                                       is_test_model=is_test_model, clock=clock, blocked=blocked_patterns(config))
        feeder = Feeder(state, feed_ahead=feed_ahead)
        self.room = room = Room(state, feeder, check_interval=disk_check_interval)
        delivery = Delivery(state, room, attempts=delivery_attempts, backoff=delivery_backoff)
        follower = Follower(state, feeder, delivery, room)
        admin = Admin(state, feeder)
        submitter = Submitter(state, admin, feeder, follower, room, random_seed=random_seed)
        buttons = Buttons(state, submitter)
        account = Account(state, feeder, room)
        self._dispatch = Dispatch(state, submitter, buttons, account, admin, room, count_tokens=count_tokens)
        lifecycle = Lifecycle(state, feeder, follower, delivery, room)

        # Commands and buttons.
        self.on_text = self._dispatch.on_text
        self.draw = self._dispatch.draw
        self.submit = submitter.submit
        self.on_button = buttons.on_button
        self.help = account.help
        self.history = account.history
        self.usage = account.usage
        self.cancel = account.cancel
        # Admins and bans.
        self.is_admin = admin.is_admin
        self.grant_admin = admin.grant_admin
        self.is_banned = admin.is_banned
        self.ban = admin.ban
        self.unban = admin.unban
        self.cancel_job = admin.cancel_job
        # Delivery and the life cycle.
        self.deliver = delivery.deliver
        self.recover = lifecycle.recover
        self.housekeeping = lifecycle.housekeeping
        self.drain = lifecycle.drain
        self.stop_accepting = lifecycle.stop_accepting
        # A full disk (bot.core.room).
        self.disk_full = room.noticed
        self.save_kept = room.save_kept

    # -- what adapters read -----------------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.state.config

    @property
    def store(self) -> Store:
        return self.state.store

    @property
    def engine(self) -> EngineLike:
        return self.state.engine

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    @property
    def disk(self) -> DiskWatch:
        return self.state.disk

    @property
    def is_test_model(self) -> bool:
        return self.state.is_test_model

    @property
    def rules(self) -> DrawRules:
        return self._dispatch.rules

    # -- wiring -----------------------------------------------------------------------------------------------------
    def add_platform(self, platform: Platform) -> None:
        self.state.platforms[platform.name] = platform

    def reload(self, config: Config) -> None:
        """Apply the parts of a new config that can change live: limits, policy (allowlists, blocked words)."""
        state = self.state
        state.config = state.config.model_copy(update={"limits": config.limits, "policy": config.policy})
        state.blocked = blocked_patterns(config)
        log.info("config reloaded: limits and policy")
