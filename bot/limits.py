"""Per-user admission rules as pure functions over a snapshot of the job ledger (no I/O, no clock of their own).

The store reads a `Snapshot` inside the same SQLite write transaction that inserts the job, so checking and
recording are one atomic step; this module only does the arithmetic: a refusal is data (which limit, its number,
the wait), worded for the user by `bot.replies.admission_refusal`.

Why not the `limits` package: it keeps its counters in memory/Redis/Memcached/MongoDB/etcd (no SQLite), so the
check could not share a transaction with the job insert, and it has no notion of cooldowns or "jobs still running";
the ledger here is the jobs table itself, so limits survive restarts and cancelled/failed jobs can give slots back.

Rules (all windows are rolling, measured back from now):
- a job counts toward the hourly/daily quota while it is queued, running or done; a job that failed (out of memory,
  bot restarted twice) or was cancelled gives its slot back, so the bot's own trouble never eats a user's quota;
- the cooldown runs from the newest accepted job of any status, so submit-then-cancel loops are still slowed;
- a job created at `t` stops counting at exactly `t + window` (it counts while `now < t + window`);
- admins skip every per-user limit and the global queue cap (the engine's own `max_queue` still bounds memory);
- a banned user is refused before anything else, admin or not, and told so only once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from bot.config import LimitSettings

HOUR = 3600.0
DAY = 86400.0

DEFAULT_JOB_SECONDS = 60.0
"""Guess for how long one picture takes, used only until the store has finished jobs to average."""

MIN_WAIT_ESTIMATE = 5.0
"""Never promise a free slot sooner than this: a running job's end is only an estimate."""


class Refusal(StrEnum):
    BANNED = "banned"
    QUEUE_FULL = "queue_full"
    TOO_MANY_ACTIVE = "too_many_active"
    COOLDOWN = "cooldown"
    HOURLY = "hourly"
    DAILY = "daily"


@dataclass(frozen=True)
class Snapshot:
    """What the rules need to know, read from the ledger at one instant."""

    now: float
    recent_created: Sequence[float]
    """created_at of the user's jobs that count toward quotas (queued/running/done) from the last day or so, any order."""
    last_created: float | None
    """created_at of the user's newest accepted job of any status (cooldown)."""
    user_active: int
    """The user's jobs queued or running."""
    user_active_wait: float
    """Estimated seconds until one of the user's active jobs finishes."""
    queue_total: int
    """Jobs queued or running for everyone."""
    queue_wait: float
    """Estimated seconds until any active job finishes."""


@dataclass(frozen=True)
class Decision:
    reason: Refusal
    retry_at: float | None
    retry_is_estimate: bool = False
    wait: float = 0.0
    """Seconds from the decision until `retry_at` (0 for a banned user)."""
    limit: float = 0
    """The limit in force: pictures (per hour, per day, at once, the queue cap) or seconds (the cooldown)."""
    active: int = 0
    """The user's pictures waiting or drawing (too_many_active)."""


def jobs_in_window(created: Sequence[float], now: float, window: float) -> list[float]:
    """The timestamps still inside the rolling window ending at `now`, oldest first."""
    return sorted(t for t in created if now < t + window)


def window_retry_at(created: Sequence[float], now: float, window: float, limit: int) -> float | None:
    """When the rolling quota `limit` per `window` lets one more job in; None if it does now (or limit is 0)."""
    if limit <= 0:
        return None
    inside = jobs_in_window(created, now, window)
    if len(inside) < limit:
        return None
    # One more job fits once len - limit + 1 of them have left the window; the oldest leave first.
    return inside[len(inside) - limit] + window


def cooldown_retry_at(last_created: float | None, now: float, cooldown: float) -> float | None:
    """When the cooldown after the newest job ends; None if it already has."""
    if last_created is None or cooldown <= 0:
        return None
    ends = last_created + cooldown
    return ends if now < ends else None


def estimate_wait(jobs_until_slot: int, running_elapsed: float | None, average_job_seconds: float) -> float:
    """Rough seconds until `jobs_until_slot` more jobs have finished, given how long the running one has run."""
    if jobs_until_slot <= 0:
        return 0.0
    first = average_job_seconds
    if running_elapsed is not None:
        first = max(average_job_seconds - running_elapsed, MIN_WAIT_ESTIMATE)
    return max(first + (jobs_until_slot - 1) * average_job_seconds, MIN_WAIT_ESTIMATE)


def decide(snapshot: Snapshot, limits: LimitSettings, *, is_admin: bool, is_banned: bool) -> Decision | None:
    """None if the job may be accepted; otherwise the limit that keeps the user waiting longest.

    When several limits apply, the one that ends last is reported, so "try again at" is a time when the job
    really would be accepted (as far as the ledger can tell; queue-based times are estimates).
    """
    if is_banned:
        return Decision(Refusal.BANNED, None)
    if is_admin:
        return None
    now = snapshot.now
    found: list[Decision] = []

    retry = cooldown_retry_at(snapshot.last_created, now, limits.cooldown_seconds)
    if retry is not None:
        found.append(Decision(Refusal.COOLDOWN, retry, wait=retry - now, limit=limits.cooldown_seconds))
    retry = window_retry_at(snapshot.recent_created, now, HOUR, limits.per_hour)
    if retry is not None:
        found.append(Decision(Refusal.HOURLY, retry, wait=retry - now, limit=limits.per_hour))
    retry = window_retry_at(snapshot.recent_created, now, DAY, limits.per_day)
    if retry is not None:
        found.append(Decision(Refusal.DAILY, retry, wait=retry - now, limit=limits.per_day))
    if snapshot.user_active >= limits.max_active_per_user:
        wait = max(snapshot.user_active_wait, MIN_WAIT_ESTIMATE)
        found.append(Decision(Refusal.TOO_MANY_ACTIVE, now + wait, True, wait=wait, limit=limits.max_active_per_user,
                              active=snapshot.user_active))
    if snapshot.queue_total >= limits.queue_cap:
        wait = max(snapshot.queue_wait, MIN_WAIT_ESTIMATE)
        found.append(Decision(Refusal.QUEUE_FULL, now + wait, True, wait=wait, limit=limits.queue_cap))
    if not found:
        return None
    # Latest retry wins; on a tie, the exact (non-estimated) reason is the more useful one to show.
    return max(found, key=lambda d: (d.retry_at or 0.0, not d.retry_is_estimate))
