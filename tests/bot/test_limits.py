"""The pure admission rules: window arithmetic at the exact edges, which limit is reported, and the wording."""

from __future__ import annotations

import pytest

from bot import replies
from bot.chat import PlainMarkup
from bot.config import LimitSettings
from bot.limits import (
    DAY,
    HOUR,
    MIN_WAIT_ESTIMATE,
    Refusal,
    Snapshot,
    cooldown_retry_at,
    decide,
    estimate_wait,
    jobs_in_window,
    window_retry_at,
)

T0 = 1_700_000_000.25  # not a round number, so float edges are exercised


def snapshot(now: float = T0, *, recent=(), last=None, active=0, active_wait=0.0, queue=0, queue_wait=0.0) -> Snapshot:
    return Snapshot(now=now, recent_created=list(recent), last_created=last, user_active=active,
                    user_active_wait=active_wait, queue_total=queue, queue_wait=queue_wait)


def said(decision) -> str:
    """The refusal as the user reads it."""
    return replies.admission_refusal(PlainMarkup(), decision)


OPEN = LimitSettings(cooldown_seconds=0, max_active_per_user=100, per_hour=0, per_day=0, queue_cap=1000)


def test_job_counts_until_exactly_window_end():
    assert jobs_in_window([T0], T0 + HOUR - 0.001, HOUR) == [T0]
    assert jobs_in_window([T0], T0 + HOUR, HOUR) == []


def test_window_retry_is_oldest_plus_window_when_full():
    created = [T0 + 20, T0, T0 + 10]
    now = T0 + 30
    assert window_retry_at(created, now, HOUR, 4) is None
    assert window_retry_at(created, now, HOUR, 3) == T0 + HOUR
    # Limit lowered below what is already used: two must leave, so the second oldest decides.
    assert window_retry_at(created, now, HOUR, 2) == T0 + 10 + HOUR
    assert window_retry_at(created, now, HOUR, 0) is None  # 0 = unlimited
    # At the retry time itself the oldest has left and one more fits.
    assert window_retry_at(created, T0 + HOUR, HOUR, 3) is None


def test_cooldown_ends_exactly_at_last_plus_cooldown():
    assert cooldown_retry_at(T0, T0 + 9.999, 10) == T0 + 10
    assert cooldown_retry_at(T0, T0 + 10, 10) is None
    assert cooldown_retry_at(None, T0, 10) is None
    assert cooldown_retry_at(T0, T0, 0) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "1 second"), (1, "1 second"), (7.01, "8 seconds"), (59, "59 seconds"), (60, "1 minute"),
     (61, "2 minutes"), (3600, "1 hour"), (3660, "1 hour 1 minute"), (5 * 3600 + 3 * 60, "5 hours 3 minutes"),
     (2 * 3600 + 1, "2 hours 1 minute")],
)
def test_describe_wait_rounds_up(seconds, text):
    assert replies.describe_wait(seconds) == text


def test_estimate_wait_uses_running_elapsed_and_floor():
    assert estimate_wait(0, None, 60) == 0
    assert estimate_wait(1, None, 60) == 60
    assert estimate_wait(1, 45, 60) == 15
    assert estimate_wait(3, 45, 60) == 15 + 120
    assert estimate_wait(1, 600, 60) == MIN_WAIT_ESTIMATE  # overran its average: never "0 seconds"


def test_nothing_applies_accepts():
    assert decide(snapshot(recent=[T0 - 10] * 5, last=T0 - 10, active=5, queue=50), OPEN,
                  is_admin=False, is_banned=False) is None


def test_cooldown_refusal_and_edge():
    limits = OPEN.model_copy(update={"cooldown_seconds": 10})
    refused = decide(snapshot(T0 + 3, last=T0), limits, is_admin=False, is_banned=False)
    assert refused.reason is Refusal.COOLDOWN
    assert refused.retry_at == T0 + 10
    assert "7 seconds" in said(refused) and "10 seconds" in said(refused)
    assert decide(snapshot(T0 + 10, last=T0), limits, is_admin=False, is_banned=False) is None


def test_hourly_and_daily_refusals_name_their_limit():
    limits = OPEN.model_copy(update={"per_hour": 2, "per_day": 3})
    hourly = decide(snapshot(T0 + 60, recent=[T0, T0 + 30]), limits, is_admin=False, is_banned=False)
    assert hourly.reason is Refusal.HOURLY and hourly.retry_at == T0 + HOUR
    assert "2 pictures for this hour" in said(hourly) and "59 minutes" in said(hourly)

    daily = decide(snapshot(T0 + 2 * HOUR, recent=[T0, T0 + 30, T0 + HOUR]), limits, is_admin=False, is_banned=False)
    assert daily.reason is Refusal.DAILY and daily.retry_at == T0 + DAY
    assert "3 pictures for today" in said(daily) and "22 hours" in said(daily)


def test_latest_limit_is_reported_when_several_apply():
    # Cooldown ends in 5 s but the hour is used up for ~an hour: telling "5 seconds" would be a lie.
    limits = OPEN.model_copy(update={"cooldown_seconds": 10, "per_hour": 1})
    refused = decide(snapshot(T0 + 5, recent=[T0], last=T0), limits, is_admin=False, is_banned=False)
    assert refused.reason is Refusal.HOURLY
    # And the other way round: long cooldown, hourly frees sooner.
    limits = OPEN.model_copy(update={"cooldown_seconds": 2 * HOUR, "per_hour": 1})
    refused = decide(snapshot(T0 + 5, recent=[T0], last=T0), limits, is_admin=False, is_banned=False)
    assert refused.reason is Refusal.COOLDOWN and refused.retry_at == T0 + 2 * HOUR


def test_active_and_queue_refusals_are_estimates():
    limits = OPEN.model_copy(update={"max_active_per_user": 2, "queue_cap": 10})
    active = decide(snapshot(active=2, active_wait=90, queue=3), limits, is_admin=False, is_banned=False)
    assert active.reason is Refusal.TOO_MANY_ACTIVE
    assert active.retry_is_estimate and active.retry_at == T0 + 90
    assert "2 pictures waiting or drawing" in said(active) and "at most 2" in said(active)

    full = decide(snapshot(queue=10, queue_wait=120), limits, is_admin=False, is_banned=False)
    assert full.reason is Refusal.QUEUE_FULL and full.retry_is_estimate and full.retry_at == T0 + 120
    assert "queue is full" in said(full) and "2 minutes" in said(full)


def test_admin_skips_everything_but_ban_wins():
    strict = LimitSettings(cooldown_seconds=100, max_active_per_user=1, per_hour=1, per_day=1, queue_cap=1)
    busy = snapshot(recent=[T0 - 1], last=T0 - 1, active=1, queue=1)
    assert decide(busy, strict, is_admin=True, is_banned=False) is None
    banned = decide(snapshot(), OPEN, is_admin=True, is_banned=True)
    assert banned.reason is Refusal.BANNED and banned.retry_at is None and "Sorry" in said(banned)
