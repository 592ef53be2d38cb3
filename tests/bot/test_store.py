"""The SQLite store: schema and migrations, atomic admission under every limit, the durable queue, delivery, images."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bot import replies
from bot.chat import PlainMarkup
from bot.config import LimitSettings
from bot.limits import DAY, HOUR, Refusal
from bot.store import (
    SCHEMA_VERSION,
    Accepted,
    InvalidJob,
    JobStateError,
    NewJob,
    Store,
    StoreError,
    UnknownJob,
)
from engine.jobs import Failure

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.25
PNG = b"\x89PNG\r\n\x1a\n" + b"not really a picture, but the store only checks the signature"
# No limit gets in the way unless a test sets it.
OPEN = LimitSettings(cooldown_seconds=0, max_active_per_user=1000, per_hour=0, per_day=0, queue_cap=1000)


def said(refused) -> str:
    """A refusal as its user reads it."""
    return replies.admission_refusal(PlainMarkup(), refused)


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "state" / "drawbot.sqlite3"


@pytest.fixture
def images_dir(tmp_path) -> Path:
    return tmp_path / "state" / "images"


@pytest.fixture
async def store(db_path, images_dir, clock):
    opened = await Store.open(db_path, images_dir, clock=clock)
    yield opened
    await opened.close()


def job(user: str = "42", prompt: str = "a red fox in snow", *, platform: str = "telegram", **changes) -> NewJob:
    fields = dict(platform=platform, user_id=user, chat_id="chat-" + user, prompt=prompt, seed=1234, steps=20,
                  width=1024, height=1024)
    fields.update(changes)
    return NewJob(**fields)


def limits(**changes) -> LimitSettings:
    return OPEN.model_copy(update=changes)


async def admit(store: Store, new_job: NewJob | None = None, settings: LimitSettings = OPEN, *, admin: bool = False,
                banned: bool = False):
    return await store.admit(new_job or job(), settings, is_admin=admin, is_banned=banned)


async def accepted_id(store: Store, new_job: NewJob | None = None, settings: LimitSettings = OPEN) -> str:
    admission = await admit(store, new_job, settings)
    assert admission.accepted, admission
    return admission.job_id


def count_rows(db_path: Path, where: str = "1", params: tuple = ()) -> int:
    with sqlite3.connect(db_path) as raw:
        return raw.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0]


# ---- schema ----------------------------------------------------------------------------------------------------


async def test_fresh_database_gets_current_schema_and_wal(store, db_path, images_dir):
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "ban_notices"} <= tables
    assert images_dir.is_dir()


async def test_reopening_keeps_jobs_and_version(db_path, images_dir, clock):
    first = await Store.open(db_path, images_dir, clock=clock)
    job_id = await accepted_id(first)
    await first.close()
    second = await Store.open(db_path, images_dir, clock=clock)
    try:
        assert (await second.get_job(job_id)).prompt == "a red fox in snow"
    finally:
        await second.close()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_newer_database_is_refused_clearly(db_path, images_dir, clock):
    store = await Store.open(db_path, images_dir, clock=clock)
    await store.close()
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError) as caught:
        await Store.open(db_path, images_dir, clock=clock)
    message = str(caught.value)
    assert "newer drawbot" in message and f"version {SCHEMA_VERSION + 1}" in message and str(db_path) in message


async def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path, clock):
    bogus = tmp_path / "notes.sqlite3"
    bogus.write_bytes(b"this is a text file, not SQLite " * 100)
    with pytest.raises(StoreError, match="is not a SQLite database .*move it away") as caught:
        await Store.open(bogus, tmp_path / "images", clock=clock)
    assert "damaged" not in str(caught.value)
    assert bogus.read_bytes() == b"this is a text file, not SQLite " * 100


async def test_another_programs_database_is_refused_clearly(db_path, images_dir, clock):
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE jobs (name TEXT)")  # same table name, user_version still 0
        raw.execute("INSERT INTO jobs VALUES ('keep me')")
    with pytest.raises(StoreError, match="another program's SQLite database \\(tables: jobs\\), not drawbot's"):
        await Store.open(db_path, images_dir, clock=clock)
    with sqlite3.connect(db_path) as raw:  # left exactly as it was
        assert raw.execute("SELECT name FROM jobs").fetchall() == [("keep me",)]
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 0


async def test_another_programs_database_with_a_schema_version_gets_no_tables_of_ours(db_path, images_dir, clock):
    """An app with its own tables and user_version (most apps): refused before drawbot writes anything."""
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE recipes (name TEXT)")
        raw.execute("PRAGMA user_version = 2")
    with pytest.raises(StoreError, match="another program's SQLite database \\(tables: recipes\\)"):
        await Store.open(db_path, images_dir, clock=clock)
    with sqlite3.connect(db_path) as raw:
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"recipes"} and raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def test_a_database_marked_by_another_application_is_refused(db_path, images_dir, clock):
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA application_id = 1234")  # e.g. an empty file of another program, already marked
    with pytest.raises(StoreError, match="application_id 0x4d2"):
        await Store.open(db_path, images_dir, clock=clock)


async def test_our_databases_are_marked_and_an_older_unmarked_one_keeps_working(db_path, images_dir, clock):
    from bot.store import APPLICATION_ID, MIGRATIONS

    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as raw:  # a drawbot database from before the application_id mark
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.execute("INSERT INTO jobs (id, platform, user_id, chat_id, prompt, seed, steps, width, height, status, "
                    "created_at) VALUES ('0123456789abcdef0123456789abcdef', 'console', 'me', 'c', 'old fox', 1, 1, "
                    "64, 64, 'done', 1.0)")
    store = await Store.open(db_path, images_dir, clock=clock)
    try:
        assert (await store.get_job("0123456789abcdef0123456789abcdef")).prompt == "old fox"
    finally:
        await store.close()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_read_only_database_is_called_read_only_not_damaged(db_path, images_dir, clock):
    """A read-only file as a non-root owner meets it (root writes anyway: the mount case is in test_hostile)."""
    store = await Store.open(db_path, images_dir, clock=clock)
    await store.close()
    # SQLite's own read-only open stands in for a read-only mount: the same SQLITE_READONLY on the first write.
    from bot.store import _unreadable

    raw = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            raw.execute("PRAGMA user_version = 9")
    finally:
        raw.close()
    message = _unreadable(db_path, caught.value)
    assert "read-only" in message and "damaged" not in message and str(db_path) in message


async def test_busy_database_is_waited_for_not_failed(store, db_path):
    """Another connection holding the write lock for a moment only delays admission (busy_timeout)."""
    locked = threading.Event()

    def hold_write_lock():
        raw = sqlite3.connect(db_path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        locked.set()
        threading.Event().wait(0.5)
        raw.execute("COMMIT")
        raw.close()

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    await asyncio.to_thread(locked.wait)
    admission = await admit(store)
    await asyncio.to_thread(holder.join)
    assert admission.accepted


# ---- admission -------------------------------------------------------------------------------------------------


async def test_accepted_job_is_stored_as_queued(store, clock):
    admission = await admit(store, job(reply_ref={"message_id": 7, "thread": None}))
    assert isinstance(admission, Accepted) and admission.jobs_ahead == 0
    assert len(admission.job_id) == 32 and int(admission.job_id, 16) >= 0
    record = await store.get_job(admission.job_id)
    assert (record.platform, record.user_id, record.chat_id, record.prompt) == \
        ("telegram", "42", "chat-42", "a red fox in snow")
    assert (record.seed, record.steps, record.width, record.height) == (1234, 20, 1024, 1024)
    assert record.status == "queued" and record.created_at == T0 and record.attempts == 0
    assert record.reply_ref == {"message_id": 7, "thread": None}
    assert record.image_path is None and record.delivered_at is None and record.delivery_attempts == 0
    second = await admit(store, job(user="7"))
    assert second.jobs_ahead == 1 and second.job_id != admission.job_id


async def test_cooldown_edges(store, clock, db_path):
    settings = limits(cooldown_seconds=10)
    await accepted_id(store, settings=settings)
    clock.advance(9.999)
    refused = await admit(store, settings=settings)
    assert refused.reason is Refusal.COOLDOWN and refused.retry_at == T0 + 10 and refused.notify
    assert "1 second" in said(refused)
    clock.now = T0 + 10  # exactly at the end of the cooldown
    assert (await admit(store, settings=settings)).accepted
    assert count_rows(db_path) == 2


async def test_cooldown_is_per_user(store, clock):
    settings = limits(cooldown_seconds=10)
    await accepted_id(store, job(user="1"), settings)
    await accepted_id(store, job(user="2"), settings)
    await accepted_id(store, job(user="1", platform="discord"), settings)  # same id, other platform


async def test_max_active_per_user(store, clock):
    settings = limits(max_active_per_user=2)
    first = await accepted_id(store, settings=settings)
    second = await accepted_id(store, settings=settings)
    await store.mark_running(first)
    refused = await admit(store, settings=settings)
    assert refused.reason is Refusal.TOO_MANY_ACTIVE and refused.retry_is_estimate and refused.retry_at > T0
    assert "at most 2" in said(refused)
    assert (await admit(store, job(user="someone else"), settings)).accepted
    await store.mark_done(first, PNG, duration=30, seconds_per_step=1.5)
    third = await accepted_id(store, settings=settings)
    await store.mark_failed(second, Failure.CRASHED)
    await store.mark_cancelled(third)
    assert (await admit(store, settings=settings)).accepted


async def test_active_wait_estimate_uses_finished_job_durations(store, clock):
    done = await accepted_id(store)
    await store.mark_running(done)
    await store.mark_done(done, PNG, duration=100, seconds_per_step=5)
    settings = limits(max_active_per_user=1)
    ahead = await accepted_id(store, job(user="other"))
    await store.mark_running(ahead)
    await accepted_id(store, settings=settings)  # queued behind `ahead`
    clock.advance(40)
    refused = await admit(store, settings=settings)
    # `ahead` needs ~60 s more (100 average - 40 elapsed), then ours ~100 s.
    assert refused.reason is Refusal.TOO_MANY_ACTIVE
    assert refused.retry_at == pytest.approx(clock.now + 160)


async def test_hourly_quota_edges(store, clock):
    settings = limits(per_hour=3)
    for offset in (0, 1, 2):
        clock.now = T0 + offset
        await store.mark_running(await accepted_id(store, settings=settings))
    clock.now = T0 + 100
    refused = await admit(store, settings=settings)
    assert refused.reason is Refusal.HOURLY and refused.retry_at == T0 + HOUR
    assert "3 pictures for this hour" in said(refused) and "59 minutes" in said(refused)
    clock.now = T0 + HOUR - 0.001
    assert (await admit(store, settings=settings)).reason is Refusal.HOURLY
    clock.now = T0 + HOUR  # the first job leaves the window exactly now
    assert (await admit(store, settings=settings)).accepted
    clock.now = T0 + HOUR + 0.5  # the second (T0 + 1) still counts
    refused = await admit(store, settings=settings)
    assert refused.reason is Refusal.HOURLY and refused.retry_at == T0 + 1 + HOUR


async def test_daily_quota_edges(store, clock):
    settings = limits(per_day=2)
    await accepted_id(store, settings=settings)
    clock.now = T0 + 2 * HOUR
    await accepted_id(store, settings=settings)
    clock.now = T0 + DAY - 0.5
    refused = await admit(store, settings=settings)
    assert refused.reason is Refusal.DAILY and refused.retry_at == T0 + DAY and "for today" in said(refused)
    clock.now = T0 + DAY
    assert (await admit(store, settings=settings)).accepted


async def test_zero_quota_means_unlimited(store, clock):
    for _ in range(40):
        await accepted_id(store, settings=limits(per_hour=0, per_day=0))


async def test_failed_and_cancelled_jobs_give_quota_back_but_keep_cooldown(store, clock):
    settings = limits(per_hour=1, cooldown_seconds=10)
    failed = await accepted_id(store, settings=settings)
    await store.mark_running(failed)
    await store.mark_failed(failed, Failure.CRASHED)
    clock.advance(5)
    assert (await admit(store, settings=settings)).reason is Refusal.COOLDOWN  # cooldown still counts it
    clock.advance(5)
    cancelled = await accepted_id(store, settings=settings)  # the failed one no longer eats the hourly quota
    assert await store.mark_cancelled(cancelled)
    clock.advance(10)
    done = await accepted_id(store, settings=settings)
    await store.mark_done(done, PNG, duration=1, seconds_per_step=None)
    clock.advance(10)
    assert (await admit(store, settings=settings)).reason is Refusal.HOURLY  # a done job does count


async def test_global_queue_cap(store, clock):
    settings = limits(queue_cap=3)
    for user in ("a", "b", "c"):
        await accepted_id(store, job(user=user), settings)
    refused = await admit(store, job(user="d"), settings)
    assert refused.reason is Refusal.QUEUE_FULL and refused.retry_is_estimate
    assert "queue is full" in said(refused) and refused.retry_at > T0
    admin = await admit(store, job(user="boss"), settings, admin=True)
    assert admin.accepted and admin.jobs_ahead == 3


async def test_admins_skip_every_per_user_limit(store, clock):
    strict = LimitSettings(cooldown_seconds=3600, max_active_per_user=1, per_hour=1, per_day=1, queue_cap=1)
    for _ in range(5):
        assert (await admit(store, settings=strict, admin=True)).accepted
    assert (await admit(store, job(user="someone"), strict)).reason is Refusal.QUEUE_FULL


async def test_banned_user_is_refused_politely_once(store, db_path):
    first = await admit(store, banned=True)
    assert first.reason is Refusal.BANNED and first.notify and first.retry_at is None
    assert "Sorry" in said(first)
    again = await admit(store, banned=True, admin=True)  # banned wins over admin
    assert again.reason is Refusal.BANNED and not again.notify
    assert count_rows(db_path) == 0
    # Unbanned, then banned again later: told once more.
    assert (await admit(store)).accepted
    assert (await admit(store, banned=True)).notify


async def test_refusal_leaves_no_row(store, db_path):
    settings = limits(per_hour=1)
    await accepted_id(store, settings=settings)
    for _ in range(3):
        assert not (await admit(store, settings=settings)).accepted
    assert count_rows(db_path) == 1


CONCURRENT_CASES = [
    (limits(per_hour=7), 7, Refusal.HOURLY),
    (limits(per_day=5), 5, Refusal.DAILY),
    (limits(max_active_per_user=4), 4, Refusal.TOO_MANY_ACTIVE),
    (limits(cooldown_seconds=30), 1, Refusal.COOLDOWN),
    (limits(queue_cap=6), 6, Refusal.QUEUE_FULL),
]


@pytest.mark.parametrize(("settings", "allowed", "reason"), CONCURRENT_CASES)
async def test_fifty_concurrent_submissions_one_connection(store, db_path, settings, allowed, reason):
    results = await asyncio.gather(*(admit(store, job(prompt=f"p{i}"), settings) for i in range(50)))
    check_concurrent(results, db_path, allowed, reason)


@pytest.mark.parametrize(("settings", "allowed", "reason"), CONCURRENT_CASES)
async def test_fifty_concurrent_submissions_two_connections(db_path, images_dir, clock, settings, allowed, reason):
    first = await Store.open(db_path, images_dir, clock=clock)
    second = await Store.open(db_path, images_dir, clock=clock)
    try:
        results = await asyncio.gather(
            *(admit((first, second)[i % 2], job(prompt=f"p{i}"), settings) for i in range(50)))
    finally:
        await first.close()
        await second.close()
    check_concurrent(results, db_path, allowed, reason)


def check_concurrent(results, db_path: Path, allowed: int, reason: Refusal) -> None:
    accepted = [r.job_id for r in results if r.accepted]
    assert len(accepted) == allowed
    assert len(set(accepted)) == allowed
    assert [r.reason for r in results if not r.accepted] == [reason] * (50 - allowed)
    with sqlite3.connect(db_path) as raw:
        stored = [row[0] for row in raw.execute("SELECT id FROM jobs")]
        prompts = [row[0] for row in raw.execute("SELECT prompt FROM jobs")]
    assert sorted(stored) == sorted(accepted)
    assert len(set(prompts)) == allowed  # no job stored twice


# ---- verbatim data ---------------------------------------------------------------------------------------------

NASTY_PROMPTS = [
    "'); DROP TABLE jobs;--",
    "Robert'); DELETE FROM jobs WHERE ('1'='1",
    'quotes " \' ` and \\ backslashes %s %(x)s ? :name',
    "nul\x00byte\x00inside",
    "emoji 🦊🎨👩🏽‍🚀 and 漢字 and RTL ‮ text",
    "line one\nline two\r\n\ttabbed",
    "x" * 10_240,
    "🦊" * 5_000,
    "",
]


@pytest.mark.parametrize("prompt", NASTY_PROMPTS, ids=range(len(NASTY_PROMPTS)))
async def test_prompts_round_trip_verbatim(store, db_path, prompt):
    job_id = await accepted_id(store, job(prompt=prompt, user=prompt[:50] or "u", chat_id=prompt[:80]))
    record = await store.get_job(job_id)
    assert record.prompt == prompt and record.chat_id == prompt[:80]
    (newest,) = await store.history("telegram", prompt[:50] or "u", limit=1)
    assert newest.prompt == prompt
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1  # the table survived


async def test_reply_ref_round_trips_odd_strings(store):
    reply_ref = {"token": "a'b\"c\x00d🦊", "ids": [1, 2**53], "nested": {"x": None, "lone": "\ud800"}}
    job_id = await accepted_id(store, job(reply_ref=reply_ref))
    assert (await store.get_job(job_id)).reply_ref == reply_ref
    await store.set_reply_ref(job_id, {"message_id": 99})
    assert (await store.get_job(job_id)).reply_ref == {"message_id": 99}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"prompt": "bad \ud800 surrogate"}, "prompt holds characters"),
        ({"prompt": "y" * 20_001}, "20001 characters"),
        ({"seed": -1}, "seed must be between"),
        ({"seed": 2**64}, "seed must be between"),
        ({"steps": True}, "steps must be a whole number"),
        ({"width": 0}, "width must be between"),
        ({"user_id": 42}, "user_id must be text"),
        ({"user_id": ""}, "must not be empty"),
        ({"reply_ref": {"when": object()}}, "reply_ref must hold only JSON"),
        ({"reply_ref": {"x": float("nan")}}, "reply_ref must hold only JSON"),
        ({"reply_ref": ["not", "a", "dict"]}, "reply_ref must be a dict"),
    ],
)
async def test_unstorable_jobs_are_refused_clearly(store, db_path, changes, words):
    with pytest.raises(InvalidJob, match=words):
        await admit(store, job(**changes))
    assert count_rows(db_path) == 0


async def test_set_reply_ref_errors(store):
    with pytest.raises(UnknownJob):
        await store.set_reply_ref("0" * 32, {})
    job_id = await accepted_id(store)
    with pytest.raises(InvalidJob):
        await store.set_reply_ref(job_id, {"bad": {1, 2}})


# ---- lifecycle -------------------------------------------------------------------------------------------------


async def test_lifecycle_timestamps_and_image(store, clock, images_dir):
    job_id = await accepted_id(store)
    clock.advance(3)
    assert await store.mark_running(job_id)
    assert not await store.mark_running(job_id)  # already running
    clock.advance(25)
    path = await store.mark_done(job_id, PNG, duration=25.0, seconds_per_step=1.25)
    assert path == images_dir / f"{job_id}.png" and path.read_bytes() == PNG
    assert [p.name for p in images_dir.iterdir()] == [f"{job_id}.png"]  # no temporary left behind
    record = await store.get_job(job_id)
    assert record.status == "done" and record.image_path == path
    assert (record.created_at, record.started_at, record.finished_at) == (T0, T0 + 3, T0 + 28)
    assert (record.duration, record.seconds_per_step) == (25.0, 1.25)
    assert not await store.mark_cancelled(job_id)
    assert not await store.mark_running(job_id)
    assert (await store.get_job(job_id)).status == "done"


async def test_mark_done_refuses_finished_jobs_and_bad_data(store, images_dir):
    job_id = await accepted_id(store)
    await store.mark_cancelled(job_id)
    with pytest.raises(JobStateError):
        await store.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
    assert list(images_dir.iterdir()) == []
    with pytest.raises(UnknownJob):
        await store.mark_done("f" * 32, PNG, duration=1, seconds_per_step=None)
    with pytest.raises(UnknownJob):
        await store.mark_done("../../etc/passwd", PNG, duration=1, seconds_per_step=None)
    with pytest.raises(StoreError, match="not PNG"):
        await store.mark_done(job_id, b"GIF89a...", duration=1, seconds_per_step=None)
    assert list(images_dir.iterdir()) == []


async def test_mark_failed_keeps_why(store):
    job_id = await accepted_id(store)
    assert await store.mark_failed(job_id, Failure.OUT_OF_MEMORY)
    record = await store.get_job(job_id)
    assert record.status == "failed" and Failure.parse(record.error) is Failure.OUT_OF_MEMORY


async def test_done_but_undelivered_job_can_be_failed_when_its_picture_is_lost(store, images_dir):
    job_id = await accepted_id(store)
    path = await store.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
    assert await store.mark_failed(job_id, Failure.PICTURE_LOST)
    record = await store.get_job(job_id)
    assert record.status == "failed" and record.image_path is None and not path.exists()
    assert await store.unfinished_jobs() == []
    delivered = await accepted_id(store)
    await store.mark_done(delivered, PNG, duration=1, seconds_per_step=None)
    await store.mark_delivered(delivered)
    assert not await store.mark_failed(delivered, Failure.CRASHED)  # delivered pictures stay done
    assert (await store.get_job(delivered)).status == "done"


async def test_unknown_ids_are_harmless(store):
    for bogus in ("nope", "0" * 32, "'; DROP TABLE jobs;--"):
        assert await store.get_job(bogus) is None
        assert not await store.mark_running(bogus)
        assert not await store.mark_cancelled(bogus)
        assert not await store.mark_delivered(bogus)
        with pytest.raises(UnknownJob):
            await store.record_delivery_failure(bogus, "x")
        with pytest.raises(UnknownJob):
            await store.requeue_after_restart(bogus)


async def test_cancel_user_jobs_cancels_only_their_queued_jobs(store):
    running = await accepted_id(store)
    await store.mark_running(running)
    queued = [await accepted_id(store) for _ in range(2)]
    other = await accepted_id(store, job(user="other"))
    cancelled = await store.cancel_user_jobs("telegram", "42")
    assert [r.id for r in cancelled] == queued and all(r.status == "cancelled" for r in cancelled)
    assert (await store.get_job(running)).status == "running"
    assert (await store.get_job(other)).status == "queued"
    assert await store.cancel_user_jobs("telegram", "42") == []


async def test_history_newest_first_for_that_user_only(store, clock):
    ids = []
    for i in range(12):
        ids.append(await accepted_id(store, job(prompt=f"prompt {i}")))
        clock.advance(1)
    await accepted_id(store, job(user="other"))
    recent = await store.history("telegram", "42")
    assert [r.id for r in recent] == ids[::-1][:10]
    assert [r.id for r in await store.history("telegram", "42", limit=3)] == ids[::-1][:3]
    assert await store.history("discord", "42") == []


async def test_usage_reports_counts_and_reset_times(store, clock):
    settings = limits(per_hour=2, per_day=5, cooldown_seconds=10, max_active_per_user=3)
    first = await accepted_id(store, settings=settings)
    await store.mark_running(first)
    await store.mark_done(first, PNG, duration=5, seconds_per_step=None)
    clock.now = T0 + 600
    await accepted_id(store, settings=settings)
    clock.now = T0 + 605
    usage = await store.usage("telegram", "42", settings)
    assert (usage.used_this_hour, usage.used_today, usage.active) == (2, 2, 1)
    assert (usage.per_hour, usage.per_day, usage.max_active, usage.cooldown_seconds) == (2, 5, 3, 10)
    assert usage.hour_frees_at == T0 + HOUR and usage.day_frees_at == T0 + DAY
    assert usage.hour_retry_at == T0 + HOUR and usage.day_retry_at is None
    assert usage.cooldown_ends_at == T0 + 610
    clock.now = T0 + HOUR
    later = await store.usage("telegram", "42", settings)
    assert (later.used_this_hour, later.used_today) == (1, 2)
    assert later.hour_retry_at is None and later.cooldown_ends_at is None
    nobody = await store.usage("telegram", "nobody", settings)
    assert (nobody.used_this_hour, nobody.hour_frees_at, nobody.active) == (0, None, 0)


# ---- delivery and restart recovery -----------------------------------------------------------------------------


async def test_mark_delivered_exactly_once(store):
    job_id = await accepted_id(store)
    assert not await store.mark_delivered(job_id)  # nothing to deliver yet
    await store.mark_running(job_id)
    await store.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
    results = await asyncio.gather(*(store.mark_delivered(job_id) for _ in range(10)))
    assert results.count(True) == 1
    assert not await store.mark_delivered(job_id)
    failed = await accepted_id(store)
    await store.mark_failed(failed, Failure.CRASHED)
    assert await store.mark_delivered(failed) and not await store.mark_delivered(failed)


async def test_mark_delivered_once_across_connections(db_path, images_dir, clock):
    first = await Store.open(db_path, images_dir, clock=clock)
    second = await Store.open(db_path, images_dir, clock=clock)
    try:
        job_id = await accepted_id(first)
        await first.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
        results = await asyncio.gather(*((first, second)[i % 2].mark_delivered(job_id) for i in range(10)))
    finally:
        await first.close()
        await second.close()
    assert results.count(True) == 1


async def test_delivery_failures_are_counted(store, clock):
    job_id = await accepted_id(store)
    await store.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
    assert await store.record_delivery_failure(job_id, "network down") == 1
    assert await store.record_delivery_failure(job_id, "still down") == 2
    record = await store.get_job(job_id)
    assert record.delivery_attempts == 2 and record.delivery_error == "still down"
    assert [r.id for r in await store.unfinished_jobs()] == [job_id]
    assert [r.id for r in await store.unfinished_jobs(max_delivery_attempts=3)] == [job_id]
    assert await store.unfinished_jobs(max_delivery_attempts=2) == []


async def test_unfinished_jobs_in_submit_order_and_restart_retry(store, clock):
    # Same timestamp for all: the order must come from submission, not the clock.
    names = ["done_undelivered", "running", "queued", "done_delivered", "failed", "cancelled", "queued_late"]
    ids = {name: await accepted_id(store, job(user=name)) for name in names}
    await store.mark_done(ids["done_undelivered"], PNG, duration=1, seconds_per_step=None)
    await store.mark_running(ids["running"])
    await store.mark_done(ids["done_delivered"], PNG, duration=1, seconds_per_step=None)
    await store.mark_delivered(ids["done_delivered"])
    await store.mark_failed(ids["failed"], Failure.CRASHED)
    await store.mark_cancelled(ids["cancelled"])
    unfinished = await store.unfinished_jobs()
    assert [r.id for r in unfinished] == [ids[n] for n in ("done_undelivered", "running", "queued", "queued_late")]

    retried = await store.requeue_after_restart(ids["running"])
    assert retried.status == "queued" and retried.attempts == 1 and retried.started_at is None
    # Retried behind the jobs that were waiting when the process died, ahead of any admitted after the restart.
    late = await accepted_id(store, job(user="after_restart"))
    assert await store.queue() == [ids["queued"], ids["queued_late"], ids["running"], late]
    assert [r.id for r in await store.unfinished_jobs()] == [
        ids["done_undelivered"], ids["queued"], ids["queued_late"], ids["running"], late]

    await store.mark_running(ids["running"])
    clock.advance(50)
    given_up = await store.requeue_after_restart(ids["running"])
    assert given_up.status == "failed" and given_up.attempts == 2
    assert given_up.error == Failure.RESTARTED
    assert given_up.finished_at == T0 + 50
    assert ids["running"] not in [r.id for r in await store.unfinished_jobs()]

    unchanged = await store.requeue_after_restart(ids["queued"])  # not running: left alone
    assert unchanged.status == "queued" and unchanged.attempts == 0


async def test_queue_is_admission_order_of_the_waiting_jobs_only(store):
    first, second, third, fourth = [await accepted_id(store, job(user=str(n))) for n in range(4)]
    assert await store.queue() == [first, second, third, fourth]
    await store.mark_running(first)
    await store.mark_cancelled(third)
    assert await store.queue() == [second, fourth]  # the running one is not waiting; cancelled ones are gone
    await store.return_to_queue(first)  # a graceful stop keeps its place
    assert await store.queue() == [first, second, fourth]


CRASHING_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from bot.config import LimitSettings
    from bot.store import NewJob, Store

    async def main():
        try:
            await crash_after_writing()
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(3)  # an unclosed store's thread would otherwise keep the process alive

    async def crash_after_writing():
        store = await Store.open(Path(sys.argv[1]), Path(sys.argv[2]))
        settings = LimitSettings(cooldown_seconds=0, max_active_per_user=5)
        ids = []
        for i in range(3):
            admission = await store.admit(NewJob("console", "you", "console", f"picture {i}", i, 4, 64, 64),
                                          settings, is_admin=False, is_banned=False)
            ids.append(admission.job_id)
        await store.mark_running(ids[0])
        print(" ".join(ids), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no commit of anything pending: a hard crash

    asyncio.run(main())
    """
)


async def test_jobs_survive_sigkill(tmp_path, db_path, images_dir):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_CHILD)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db_path), str(images_dir), cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()
    ids = out.decode().split()
    assert len(ids) == 3

    store = await Store.open(db_path, images_dir)
    try:
        unfinished = await store.unfinished_jobs()
        assert [(r.id, r.status, r.prompt) for r in unfinished] == [
            (ids[0], "running", "picture 0"), (ids[1], "queued", "picture 1"), (ids[2], "queued", "picture 2")]
        assert (await store.requeue_after_restart(ids[0])).status == "queued"
        assert [r.status for r in await store.unfinished_jobs()] == ["queued"] * 3
    finally:
        await store.close()


# ---- image retention -------------------------------------------------------------------------------------------


async def finished_jobs(store: Store, clock: FakeClock, count: int, *, deliver: bool = True) -> list[str]:
    ids = []
    for _ in range(count):
        job_id = await accepted_id(store)
        await store.mark_done(job_id, PNG, duration=1, seconds_per_step=None)
        if deliver:
            await store.mark_delivered(job_id)
        ids.append(job_id)
        clock.advance(60)
    return ids


async def test_prune_keeps_newest_by_count(store, clock, images_dir):
    ids = await finished_jobs(store, clock, 5)
    assert await store.prune_images(keep_days=0, keep_count=2) == 3
    assert sorted(p.name for p in images_dir.iterdir()) == sorted(f"{i}.png" for i in ids[-2:])
    for old in ids[:3]:
        record = await store.get_job(old)
        assert record is not None and record.image_path is None and record.status == "done"
    assert (await store.get_job(ids[-1])).image_path == images_dir / f"{ids[-1]}.png"
    assert await store.prune_images(keep_days=0, keep_count=2) == 0


async def test_prune_by_days_with_exact_edge(store, clock, images_dir):
    old = await finished_jobs(store, clock, 1)  # finished at T0
    clock.now = T0 + DAY
    new = await finished_jobs(store, clock, 1)  # finished at T0 + 1 day
    clock.now = T0 + 2 * DAY - 1
    assert await store.prune_images(keep_days=2, keep_count=0) == 0
    clock.now = T0 + 2 * DAY  # exactly two days after the old one
    assert await store.prune_images(keep_days=2, keep_count=0) == 1
    assert [p.name for p in images_dir.iterdir()] == [f"{new[0]}.png"]
    assert (await store.get_job(old[0])).image_path is None


async def test_prune_never_deletes_undelivered_pictures(store, clock, images_dir):
    waiting = await finished_jobs(store, clock, 2, deliver=False)
    await finished_jobs(store, clock, 2)
    clock.advance(100 * DAY)
    assert await store.prune_images(keep_days=1, keep_count=1) == 2
    assert sorted(p.name for p in images_dir.iterdir()) == sorted(f"{i}.png" for i in waiting)


async def test_prune_zero_means_keep_everything(store, clock, images_dir):
    await finished_jobs(store, clock, 3)
    clock.advance(1000 * DAY)
    assert await store.prune_images(keep_days=0, keep_count=0) == 0
    assert len(list(images_dir.iterdir())) == 3


async def test_prune_removes_stale_temporaries_only(store, images_dir):
    stale = images_dir / ".abc.1234.tmp"
    fresh = images_dir / ".def.5678.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (0, 0))
    await store.prune_images(keep_days=0, keep_count=0)
    assert not stale.exists() and fresh.exists()


async def test_return_to_queue_does_not_count_a_restart_attempt(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images")
    try:
        admission = await store.admit(
            NewJob(platform="console", user_id="u", chat_id="c", prompt="p", seed=1, steps=2, width=64, height=64),
            LimitSettings(cooldown_seconds=0), is_admin=False, is_banned=False)
        job_id = admission.job_id
        assert await store.return_to_queue(job_id) is False  # only a running job can go back
        await store.mark_running(job_id)
        assert await store.return_to_queue(job_id) is True
        record = await store.get_job(job_id)
        assert (record.status, record.attempts, record.started_at) == ("queued", 0, None)
    finally:
        await store.close()


async def test_bans_survive_a_reopen(tmp_path):
    path, images = tmp_path / "db.sqlite3", tmp_path / "images"
    async with await Store.open(path, images) as store:
        assert await store.ban("telegram", "42", by="telegram:1") is True
        assert await store.ban("telegram", "42", by="telegram:1") is False
        assert await store.is_banned("telegram", "42") and not await store.is_banned("discord", "42")
    async with await Store.open(path, images) as store:
        assert await store.is_banned("telegram", "42")
        assert await store.unban("telegram", "42") is True
        assert await store.unban("telegram", "42") is False
        assert not await store.is_banned("telegram", "42")


async def test_a_version_1_database_is_migrated_in_place(tmp_path):
    from bot.store import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.execute("INSERT INTO jobs (id, platform, user_id, chat_id, prompt, seed, steps, width, height, status, "
                    "created_at) VALUES ('0123456789abcdef0123456789abcdef', 'console', 'u', 'c', 'old', 1, 2, 64, 64, "
                    "'queued', 1.0)")
    async with await Store.open(path, tmp_path / "images") as store:
        assert [r.prompt for r in await store.unfinished_jobs()] == ["old"]
        assert await store.ban("console", "u", by="console:admin")
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


def test_a_database_sqlite_cannot_open_is_one_store_error_and_its_thread_ends_first(tmp_path):
    """A database path SQLite cannot open (a link to a folder that is gone): StoreError, and aiosqlite's worker
    thread has ended before it is raised. It used to outlive the failed open and report to the event loop `drawbot
    run` had closed by then: a traceback after the owner's one line (one start in three)."""
    link = tmp_path / "drawbot.sqlite3"
    link.symlink_to(tmp_path / "moved-away" / "drawbot.sqlite3")
    reported: list[threading.ExceptHookArgs] = []
    before, threading.excepthook = threading.excepthook, reported.append
    try:
        for _ in range(20):
            with pytest.raises(StoreError, match="cannot open the database"):
                asyncio.run(Store.open(link, tmp_path / "images"))
    finally:
        threading.excepthook = before
    assert not reported, [str(args.exc_value) for args in reported]
