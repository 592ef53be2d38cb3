"""The cluster end to end: the real core and SQLite store, RemoteEngine, a real redis-server and `drawbot worker`
subprocesses on the tiny model. Only the chat is a recording stand-in."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest

from bot.chat import User
from bot.cluster import protocol
from bot.cluster.connection import client
from bot.cluster.remote import RemoteEngine, read_live_workers
from bot.config import load_config
from bot.core import ChatCore
from bot.store import Store
from tests.bot.conversation import RecordingConversation, RecordingPlatform
from tests.cluster.conftest import cluster_config

USERS = [User("console", f"user{n}", f"User {n}", chat_id=f"c{n}") for n in range(4)]


async def open_bot(config, url):
    store = await Store.open(config.storage.database_path, config.storage.images_dir)
    engine = RemoteEngine(client(url), config.cluster, protocol.expected_identity(config.engine.model), url=url)
    await engine.start()
    core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01)
    platform = RecordingPlatform()
    core.add_platform(platform)
    return store, engine, core, platform


async def close_bot(store, engine, core):
    await core.stop_accepting()
    await engine.close()
    await core.drain()
    await store.close()


async def wait_for_workers(url, namespace, count, timeout=60.0):
    redis = client(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(await read_live_workers(redis, protocol.Keys(namespace))) >= count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{count} workers did not come up")
    finally:
        await redis.aclose()


async def until(condition, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError("timed out")


async def test_one_worker_draws_a_job_for_the_bot(tmp_path, models_dir, redis_server, workers):
    path = cluster_config(tmp_path / "config.toml", models_dir)
    config = load_config(path)
    workers.start("w1", path)
    await wait_for_workers(redis_server.url, "drawbot", 1)
    store, engine, core, platform = await open_bot(config, redis_server.url)
    conv = RecordingConversation("c0")
    job_id = await core.on_text(USERS[0], conv, "/draw a fox --steps 2")
    await core.drain()
    assert len(conv.pictures) == 1, conv.texts()
    [record] = await store.history("console", "user0")
    assert record.status == "done" and record.delivered_at
    await close_bot(store, engine, core)
    assert "drawing job" in workers.log("w1")


def first_takes(workers, names) -> list[str]:
    """Job ids in the order workers first took them (tokens are handed out in one atomic counter)."""
    import re

    takes = []
    for name in names:
        for match in re.finditer(r"drawing job (\w+) \(token (\d+),", workers.log(name)):
            takes.append((int(match.group(2)), match.group(1)))
    order: list[str] = []
    for _, job_id in sorted(takes):
        if job_id not in order:
            order.append(job_id)
    return order


async def drawing(url, exclude=()) -> tuple[str, str] | None:
    redis = client(url)
    try:
        for cap in await read_live_workers(redis, protocol.Keys("drawbot")):
            if cap.state == "drawing" and cap.name not in exclude:
                return cap.name, cap.job
        return None
    finally:
        await redis.aclose()


async def test_burst_kill_freeze_redis_restart_bot_restart_every_job_once_in_order(tmp_path, models_dir,
                                                                                   redis_server, workers):
    """Three workers, twelve jobs from four users. Mid-burst: one worker is killed with SIGKILL while drawing, another
    is frozen (SIGSTOP, as if its network were gone) past its lease and thawed later, Redis is restarted, and the bot
    is restarted. Every accepted job is delivered exactly once, and workers took them in the order the core gave them."""
    from bot.commands import parse_draw

    path = cluster_config(tmp_path / "config.toml", models_dir, lease=2.0, heartbeat=0.3, step_sleep=0.7)
    config = load_config(path)
    names = ["w1", "w2", "w3"]
    for name in names:
        workers.start(name, path)
    await wait_for_workers(redis_server.url, "drawbot", 3, timeout=180)

    store, engine, core, platform = await open_bot(config, redis_server.url)
    convs = {user.id: RecordingConversation(user.chat_id) for user in USERS}
    submitted = []
    for n in range(3):
        for user in USERS:
            job_id = await core.submit(user, convs[user.id], parse_draw(f"job {n} of {user.id} --steps 2", core.rules))
            assert job_id
            submitted.append(job_id)

    async def someone_drawing(exclude=()):
        found = await drawing(redis_server.url, exclude)
        return found is not None and found[1] in submitted

    await until(someone_drawing)
    killed, killed_job = await drawing(redis_server.url)
    workers.kill(killed)
    await until(lambda: someone_drawing(exclude=(killed,)))
    frozen, frozen_job = await drawing(redis_server.url, exclude=(killed,))
    workers.procs[frozen].send_signal(signal.SIGSTOP)

    redis_server.restart(down_for=0.5)  # persistence: append-only file, so nothing accepted is lost

    await close_bot(store, engine, core)  # the bot restarts while the workers draw
    store, engine, core, platform = await open_bot(config, redis_server.url)
    await core.recover()

    async def taken_over():  # past the lease, the next free worker takes the frozen one's job
        return any(f"took over job {frozen_job}" in workers.log(n) for n in names if n != frozen)

    await until(taken_over, timeout=90, every=0.2)
    workers.procs[frozen].send_signal(signal.SIGCONT)  # it comes back late: its result must not be delivered

    async def all_delivered():
        records = [r for user in USERS for r in await store.history("console", user.id, 50)]
        return len(records) == len(submitted) and all(r.delivered_at for r in records)

    await until(all_delivered, timeout=120, every=0.2)
    await asyncio.sleep(1.5)  # room for a late duplicate to show up, were there one
    conversations = [*convs.values(), *platform.conversations.values()]
    delivered = [p.job_id for conv in conversations for p in conv.pictures]
    assert sorted(delivered) == sorted(submitted), "every job delivered exactly once"
    records = {r.id: r for user in USERS for r in await store.history("console", user.id, 50)}
    assert all(r.status == "done" for r in records.values())
    assert killed_job in delivered and frozen_job in delivered
    await close_bot(store, engine, core)
    workers.stop_all()
    assert first_takes(workers, names) == submitted
    frozen_log = workers.log(frozen)
    assert "lost the lease" in frozen_log or "its result is dropped" in frozen_log, frozen_log[-2000:]
    others = "".join(workers.log(n) for n in names if n != killed)
    assert "took over job" in others
