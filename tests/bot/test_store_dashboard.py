"""The store's queries for the owner dashboard, on a real SQLite file."""

from __future__ import annotations

import pytest

from bot.config import LimitSettings
from bot.limits import DAY
from bot.store import NewJob, Store

T0 = 1_800_000_000.0
OPEN = LimitSettings(cooldown_seconds=0, max_active_per_user=10, per_hour=0, per_day=0, queue_cap=100)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup(tmp_path):
    clock = Clock()
    store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images", clock=clock)
    yield store, clock
    await store.close()


async def submit(store: Store, platform: str, user: str, prompt: str) -> str:
    admission = await store.admit(NewJob(platform, user, "c", prompt, 1, 4, 64, 64), OPEN, is_admin=False,
                                  is_banned=False)
    assert admission.job_id
    return admission.job_id


async def test_active_jobs_span_platforms_running_first(setup):
    store, clock = setup
    a = await submit(store, "telegram", "1", "a")
    clock.now += 1
    b = await submit(store, "web", "alice", "b")
    clock.now += 1
    c = await submit(store, "discord", "2", "c")
    await store.mark_running(b)
    await store.mark_cancelled(c)
    assert [r.id for r in await store.active_jobs()] == [b, a]


async def test_recent_jobs_newest_first_with_limit(setup):
    store, clock = setup
    ids = []
    for n in range(5):
        clock.now += 1
        ids.append(await submit(store, "web", f"u{n % 2}", f"p{n}"))
    assert [r.id for r in await store.recent_jobs(3)] == ids[::-1][:3]


async def test_user_overview_counts_day_total_active_and_bans(setup):
    store, clock = setup
    old = await submit(store, "web", "alice", "old")
    await store.mark_cancelled(old)
    clock.now += DAY + 10
    await submit(store, "web", "alice", "new")
    clock.now += 1
    await submit(store, "telegram", "42", "x")
    await store.ban("telegram", "42", by="web:@owner")
    bob, alice = await store.user_overview()
    assert (bob.platform, bob.user_id, bob.total, bob.last_day, bob.active, bob.banned) == ("telegram", "42", 1, 1,
                                                                                            1, True)
    assert (alice.user_id, alice.total, alice.last_day, alice.active, alice.banned) == ("alice", 2, 1, 1, False)
    assert await store.banned_users() == [("telegram", "42", clock.now)]
