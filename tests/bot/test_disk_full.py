"""A full disk (issue 11 item 4), on a real 2 MB tmpfs filled to the last byte: the store's one error type, the
database's reserve, and the core keeping the job and its user told. Mounting needs root: skipped otherwise (CI is
root). The owner's view, `drawbot run` in a subprocess, is in tests/test_hostile.py."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from bot.chat import User
from bot.config import Config, LimitSettings
from bot.core import ChatCore
from bot.store import RESERVE_BYTES, DiskFull, NewJob, Store
from engine.worker import Engine
from tests.bot.conversation import RecordingConversation, RecordingPlatform
from tests.test_hostile import fill, mount, mounts  # noqa: F401  (mounts: the fixture)

ALICE = User("console", "alice", "Alice", chat_id="c1")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 50_000
OPEN = LimitSettings(cooldown_seconds=0, max_active_per_user=5, per_hour=0, per_day=0, queue_cap=50)


@pytest.fixture
def small_disk(tmp_path, mounts):  # noqa: F811
    folder = tmp_path / "small"
    folder.mkdir()
    mount(mounts, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder))
    return folder


async def queued_job(store: Store) -> str:
    admission = await store.admit(NewJob("console", "alice", "c1", "a heron", 1, 2, 64, 64), OPEN, is_admin=False,
                                  is_banned=False)
    return admission.job_id


async def test_a_picture_that_does_not_fit_is_disk_full_leaves_no_half_file_and_the_job_as_it_was(small_disk):
    store = await Store.open(small_disk / "db.sqlite3", small_disk / "images")
    try:
        assert (small_disk / "db.sqlite3.reserve").stat().st_size == RESERVE_BYTES
        job_id = await queued_job(store)
        assert await store.mark_running(job_id)
        fill(small_disk)
        with pytest.raises(DiskFull, match="cannot save the picture"):
            await store.mark_done(job_id, PNG, duration=1.0, seconds_per_step=0.5)
        assert not list((small_disk / "images").iterdir())  # no half-written picture left behind
        assert (await store.get_job(job_id)).status == "running"
        assert store.spare_space() < 0 + RESERVE_BYTES
    finally:
        await store.close()


async def test_a_database_write_on_a_full_disk_is_disk_full_and_fits_in_the_reserve(small_disk):
    store = await Store.open(small_disk / "db.sqlite3", small_disk / "images")
    try:
        job_ids = [await queued_job(store) for _ in range(3)]
        filler = fill(small_disk)
        with pytest.raises(DiskFull, match="database or disk is full"):
            for job_id in job_ids:  # the write-ahead log grows until SQLite finds no room
                await store.mark_running(job_id)
                await store.mark_cancelled(job_id)
                for _ in range(50):
                    await store.ban("console", f"spammer{_}", by="test")
                    await store.unban("console", f"spammer{_}")
        assert store.release_reserve()
        await store.mark_cancelled(job_ids[-1])  # the room set aside is enough for the changes a full disk needs
        assert (await store.get_job(job_ids[-1])).status == "cancelled"
        assert not store.make_reserve()  # no room to set it aside again yet
        filler.unlink()
        assert store.make_reserve() and store.spare_space() > 0
    finally:
        await store.close()


async def test_a_database_opens_and_reads_on_a_disk_too_full_for_its_index_file(small_disk):
    db = small_disk / "db.sqlite3"
    store = await Store.open(db, small_disk / "images")
    job_id = await queued_job(store)
    await store.close()
    (small_disk / "db.sqlite3.reserve").unlink()
    fill(small_disk)
    store = await Store.open(db, small_disk / "images")  # used to fail: "damaged (disk I/O error)"
    try:
        assert store.exclusive
        assert [job.id for job in await store.unfinished_jobs()] == [job_id]
        with pytest.raises(DiskFull):
            await store.mark_running(job_id)
    finally:
        await store.close()


@pytest.fixture
async def core_on_a_small_disk(small_disk, tiny_settings, tiny_pipeline):
    store = await Store.open(small_disk / "db.sqlite3", small_disk / "images")
    engine = Engine(lambda: tiny_pipeline)
    await engine.start()
    config = Config(engine=tiny_settings.model_copy(update={"max_steps": 200}), limits=OPEN)
    core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01, disk_check_interval=0.1)
    core.add_platform(RecordingPlatform())
    yield core, store, small_disk
    await core.stop_accepting()
    await engine.close(timeout=30)
    await core.drain()
    await store.close()


async def draw_and_fill_while_drawing(core: ChatCore, store: Store, disk: Path, conv: RecordingConversation) -> str:
    await core.on_text(ALICE, conv, "/draw a heron 5 40")
    [job] = await store.history("console", "alice")
    deadline = time.monotonic() + 60
    while (await store.get_job(job.id)).status != "running":
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.01)
    filler = fill(disk)
    deadline = time.monotonic() + 120
    while not any("could not be saved" in text for text in conv.texts() + [t for _, t in conv.edits]):
        assert time.monotonic() < deadline, conv.texts()
        await asyncio.sleep(0.05)
    return str(filler)


async def test_a_picture_that_cannot_be_saved_is_told_kept_queued_and_drawn_when_there_is_room(
        core_on_a_small_disk, caplog):
    core, store, disk = core_on_a_small_disk
    conv = RecordingConversation()
    caplog.set_level(logging.INFO)
    filler = await draw_and_fill_while_drawing(core, store, disk, conv)
    [job] = await store.history("console", "alice")
    assert job.status == "queued" and job.attempts == 0  # not left running, holding the slot

    for _ in range(3):  # every later message gets a plain answer; the owner one log line in all
        await core.on_text(ALICE, conv, "/draw a fox")
    await core.on_text(ALICE, conv, "/usage")
    assert conv.texts()[-2].startswith("Sorry, the bot's disk is full, so it cannot take new pictures")
    assert "Waiting or drawing now: 1 of 5" in conv.texts()[-1]
    assert len(await store.history("console", "alice")) == 1
    assert len([r for r in caplog.records if "the disk is full" in r.getMessage()]) == 1

    Path(filler).unlink()
    await asyncio.wait_for(core.drain(), 120)  # drawn again once there is room, and delivered
    [job] = await store.history("console", "alice")
    assert job.status == "done" and job.delivered_at is not None and job.image_path.is_file()
    assert len(conv.pictures) == 1
    assert len([r for r in caplog.records if "the disk has room again" in r.getMessage()]) == 1
    assert (disk / "db.sqlite3.reserve").stat().st_size == RESERVE_BYTES  # set aside again for the next time


async def test_cancel_and_usage_agree_about_a_job_kept_by_a_full_disk(core_on_a_small_disk):
    core, store, disk = core_on_a_small_disk
    conv = RecordingConversation()
    await draw_and_fill_while_drawing(core, store, disk, conv)
    await core.on_text(ALICE, conv, "/cancel")
    assert conv.texts()[-1] == "Cancelled 1 picture."
    await asyncio.wait_for(core.drain(), 10)
    await core.on_text(ALICE, conv, "/usage")
    assert "Waiting or drawing now: 0 of 5" in conv.texts()[-1]
    [job] = await store.history("console", "alice")
    assert job.status == "cancelled"
