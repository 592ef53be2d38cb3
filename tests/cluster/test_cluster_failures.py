"""Redis unreachable, the bot drawing too (`local_worker`), `drawbot worker --device`, and queue positions and ETAs that
count every live worker. Real redis-server, the real core and SQLite store, `drawbot worker` processes or in-process
ClusterWorkers on the tiny model. Every wait has a deadline, so a failure cannot hang CI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bot.chat import PlainMarkup, User
from bot.cluster import protocol
from bot.cluster.connection import client
from bot.cluster.remote import RemoteEngine, read_live_workers
from bot.config import load_config
from bot.core import ChatCore
from bot.store import Store
from tests.bot.conversation import RecordingConversation
from tests.cluster.conftest import PASSWORD_PREFIX, REPO, RedisServer, Workers, cluster_config

pytestmark = pytest.mark.timeout(120)

USERS = [User("console", f"user{n}", f"User {n}", chat_id=f"c{n}") for n in range(4)]


async def until(condition, timeout=60.0, every=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def needs_redis():
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")


async def test_redis_down_at_start_and_killed_mid_run_is_one_line_retried_and_every_job_arrives_once(
        tmp_path, models_dir, caplog):
    """The worker and the bot start while Redis is down: each says so in one line and keeps retrying; a job accepted
    meanwhile is drawn once Redis is up. Then Redis is killed (SIGKILL) while both run and a job is accepted during
    the outage: once Redis is back it is delivered, once. Neither process crashes."""
    needs_redis()
    server = RedisServer(tmp_path / "redis")  # not started yet
    # [engine].device names a GPU this machine lacks: `--device cpu` must reach the worker's engine settings.
    path = cluster_config(tmp_path / "config.toml", models_dir, lease=3.0, heartbeat=0.3, step_sleep=0.05,
                          device="cuda:1")
    config = load_config(path)
    pool = Workers(tmp_path, server.url)
    caplog.set_level(logging.INFO, logger="bot.cluster")
    store = await Store.open(config.storage.database_path, config.storage.images_dir)
    engine = RemoteEngine(client(server.url), config.cluster, protocol.expected_identity("tiny"), url=server.url)
    try:
        worker = pool.start("w1", path, "--device", "cpu")
        await asyncio.wait_for(engine.start(), 30)  # returns although Redis is down
        core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01)
        first = RecordingConversation("c0")
        first_id = await core.submit(USERS[0], first, _draw(core, "a fox"))
        assert first_id, first.texts()  # accepted into the store while Redis is down

        async def worker_says_unreachable():
            assert worker.poll() is None, pool.log("w1")
            return "is unreachable" in pool.log("w1")

        await until(worker_says_unreachable, 90, what="the worker's unreachable line")
        await asyncio.sleep(1.0)  # a few retries: still one line, no crash
        assert pool.log("w1").count("is unreachable") == 1, pool.log("w1")
        bot_lines = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
        assert bot_lines and bot_lines[0].startswith(f"cluster: Redis at redis://***@127.0.0.1:{server.port}/0 is "
                                                     "unreachable"), bot_lines
        assert len(bot_lines) <= 2, bot_lines  # starting + publishing the job, not one per retry
        assert server.password not in caplog.text and server.password not in pool.log("w1")
        assert PASSWORD_PREFIX not in caplog.text + pool.log("w1")

        server.start()

        async def delivered(conv, count=1):
            return len(conv.pictures) >= count

        await until(lambda: delivered(first), 60, what="the first picture")
        redis = client(server.url)
        [cap] = await read_live_workers(redis, protocol.Keys("drawbot"))
        await redis.aclose()
        assert cap.name == "w1" and cap.device == "cpu"  # --device cpu reached the engine (cuda:1 would not load)

        server.kill()  # a crash while both run
        second = RecordingConversation("c1")
        second_id = await core.submit(USERS[1], second, _draw(core, "a cat"))
        assert second_id, second.texts()
        await asyncio.sleep(1.5)
        assert worker.poll() is None, pool.log("w1")
        server.start()
        await until(lambda: delivered(second), 60, what="the picture accepted while Redis was down")
        await asyncio.sleep(1.0)  # room for a duplicate, were there one
        assert [p.job_id for p in first.pictures] == [first_id]
        assert [p.job_id for p in second.pictures] == [second_id]
        for job_id in (first_id, second_id):
            record = await store.get_job(job_id)
            assert record is not None and record.status == "done" and record.delivered_at
        log = pool.log("w1")
        assert log.count("is unreachable") == 2 and "is back after" in log, log  # one line per outage
        assert "Traceback" not in log and worker.poll() is None, log
        assert "is back after" in caplog.text
        await core.stop_accepting()
    finally:
        await engine.close()
        await store.close()
        pool.stop_all()
        server.stop()
    assert worker.returncode == 0, pool.log("w1")


def _draw(core, prompt):
    from bot.commands import parse_draw

    return parse_draw(f"{prompt} --steps 2", core.rules)


def test_a_bad_worker_device_is_one_line_and_exit_2(tmp_path, models_dir):
    """`drawbot worker --device gpu1`: one line saying what is accepted, exit 2, before anything loads. (A good
    `--device cpu` reaching the engine is checked in the Redis test above, with [engine].device = cuda:1.)"""
    path = cluster_config(tmp_path / "config.toml", models_dir, device="cuda:1")
    env = {**os.environ, "DRAWBOT_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(path), "worker", "--device", "gpu1"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip() == "drawbot worker: --device must be cpu, cuda or cuda:N (got 'gpu1')", bad.stderr


def test_drawbot_run_with_local_worker_draws_on_this_machine(tmp_path, models_dir, redis_server):
    """`drawbot run` with [cluster] local_worker = true and no other worker: the console's picture is drawn by the
    worker inside the bot process, through Redis."""
    path = cluster_config(tmp_path / "config.toml", models_dir, extra="local_worker = true")
    done = _drawbot(tmp_path, path, redis_server.url, "run", input="/draw a fox\n")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "(and drawing here too)" in out, out[-3000:]
    import re

    drawn_by = re.search(r"drawn by (\S+) \(attempt token", out)
    assert drawn_by and drawn_by.group(1).endswith("-local"), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    [record] = asyncio.run(_history(load_config(path)))
    assert record.status == "done" and record.delivered_at


def test_a_password_redis_refuses_is_one_line_and_exit_2_for_the_worker_and_the_bot(tmp_path, models_dir,
                                                                                     redis_server):
    """A wrong password in DRAWBOT_REDIS_URL is a set-up error, not an outage to wait out: `drawbot worker` and
    `drawbot run` each say so in one line with the fix and exit 2 (before, both retried for ever as "unreachable")."""
    path = cluster_config(tmp_path / "config.toml", models_dir)
    wrong = redis_server.url.replace(redis_server.password, "not-the-password")
    line = (f"Redis at redis://***@127.0.0.1:{redis_server.port}/0 refuses the password (invalid username-password "
            "pair or user is disabled.): set the one in its requirepass in DRAWBOT_REDIS_URL or "
            "[cluster].redis_url_file")
    _worker_and_bot_exit_2_saying(line, tmp_path, path, wrong, secret="not-the-password")


def test_an_acl_that_denies_a_command_at_start_is_one_line_and_exit_2_for_the_worker_and_the_bot(tmp_path, models_dir,
                                                                                               redis_server):
    """An owner's Redis user that may not run XGROUP (both sides create their consumer groups at start): one line in
    Redis's words with the fix, exit 2, no traceback (before: a traceback from each)."""
    import redis as redis_sync

    admin = redis_sync.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "drawer", "on", ">drawer-pw", "~*", "&*", "+@all", "-xgroup")
    admin.close()
    path = cluster_config(tmp_path / "config.toml", models_dir)
    url = f"redis://drawer:drawer-pw@127.0.0.1:{redis_server.port}/0"
    line = (f"Redis at redis://***@127.0.0.1:{redis_server.port}/0 answered this user has no permissions to run the "
            "'xgroup|create' command: give drawbot's Redis user every command it uses")
    _worker_and_bot_exit_2_saying(line, tmp_path, path, url, secret="drawer-pw")


def test_a_worker_stopped_while_redis_is_still_unreachable_exits_at_once(tmp_path, models_dir):
    """SIGTERM (systemctl stop) while the worker waits for Redis at start: it stops within seconds, exit 0 (before,
    its start-up retries did not look at the stop, and only SIGKILL ended it)."""
    needs_redis()
    server = RedisServer(tmp_path / "redis")  # never started
    path = cluster_config(tmp_path / "config.toml", models_dir)
    pool = Workers(tmp_path, server.url)
    worker = pool.start("w1", path)
    try:
        deadline = time.monotonic() + 90
        while "is unreachable" not in pool.log("w1") and time.monotonic() < deadline:
            assert worker.poll() is None, pool.log("w1")
            time.sleep(0.1)
        assert "is unreachable" in pool.log("w1"), pool.log("w1")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, pool.log("w1")
        assert "Traceback" not in pool.log("w1"), pool.log("w1")
    finally:
        pool.stop_all()


def _drawbot(tmp_path, path, url: str, command: str, *, input: str = "") -> subprocess.CompletedProcess:
    """`drawbot <command>` in a child process on this Redis URL, with no chat tokens (the console only)."""
    env = {**os.environ, "DRAWBOT_REDIS_URL": url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DRAWBOT_TELEGRAM_TOKEN", None)
    env.pop("DRAWBOT_DISCORD_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(path), command], input=input,
                          capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path)


def _worker_and_bot_exit_2_saying(line: str, tmp_path, path, url: str, *, secret: str) -> None:
    """`drawbot worker` and `drawbot run` each: exit 2, `line` said once, no traceback, `secret` nowhere."""
    for command in ("worker", "run"):
        done = _drawbot(tmp_path, path, url, command)
        out = done.stdout + done.stderr
        assert done.returncode == 2, out[-3000:]
        assert out.count(line) == 1, out[-3000:]
        assert "Traceback" not in out and secret not in out, out[-3000:]


async def _start_worker(cleanup: contextlib.AsyncExitStack, server: RedisServer, config, settings, name: str,
                        stop: asyncio.Event, wrap=lambda pipeline: pipeline) -> asyncio.Task:
    """A ClusterWorker in this process on `server`, drawing with the tiny model (the loaded pipeline passed through
    `wrap`); its engine and Redis connection are released by `cleanup`. Returns the task running it until `stop`."""
    from bot.cluster.worker import ClusterWorker, load_capability
    from engine.pipeline import FluxPipeline
    from engine.worker import Engine

    pipeline = await asyncio.to_thread(FluxPipeline.load, settings)
    local = Engine(lambda: wrap(pipeline), max_queue=1)
    await local.start()
    cleanup.push_async_callback(local.close, timeout=0)
    redis = client(server.url)
    cleanup.push_async_callback(redis.aclose)
    worker = ClusterWorker(redis, config.cluster, local, load_capability(config, settings, name, local),
                           url=server.url)
    return asyncio.create_task(worker.run(stop))


async def _history(config):
    store = await Store.open(config.storage.database_path, config.storage.images_dir)
    try:
        return [r for r in await store.history("console", config.console.user, 10)]
    finally:
        await store.close()


async def test_two_live_workers_draw_two_jobs_at_once_and_etas_count_both(tmp_path, models_dir, tiny_settings):
    """The core's feeder reads the RemoteEngine's capacity: with two live workers two jobs are drawn at once (never
    three), and the queue ETA a user is told divides the jobs ahead between the two workers."""
    needs_redis()
    from bot.cluster.worker import PaddedPipeline

    path = cluster_config(tmp_path / "config.toml", models_dir, lease=5.0, heartbeat=0.2)
    config = load_config(path)
    settings = tiny_settings.model_copy(update={"mode": "resident"})
    stop = asyncio.Event()
    drawing = {"now": 0, "most": 0}  # pictures being drawn at once, counted where they are drawn
    guard = threading.Lock()

    class Counted(PaddedPipeline):
        def generate(self, request, on_step):
            with guard:
                drawing["now"] += 1
                drawing["most"] = max(drawing["most"], drawing["now"])
            try:
                return super().generate(request, on_step)
            finally:
                with guard:
                    drawing["now"] -= 1

    # Each resource is released by the stack, in reverse, whatever failed before it: a store left open after a
    # failure kept pytest from exiting (aiosqlite's thread is not a daemon).
    async with contextlib.AsyncExitStack() as cleanup:
        server = RedisServer(tmp_path / "redis")
        server.start()
        cleanup.callback(server.stop)
        store = await Store.open(config.storage.database_path, config.storage.images_dir)
        cleanup.push_async_callback(store.close)
        tasks: list[asyncio.Task] = []

        async def stop_workers():
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=30) if tasks else (set(), set())
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not pending, "a worker did not stop within 30 s of its stop event"

        for n in range(2):
            tasks.append(await _start_worker(cleanup, server, config, settings, f"w{n}", stop,
                                             wrap=lambda pipeline: Counted(pipeline, 0.4)))
        cleanup.push_async_callback(stop_workers)  # before the engines and connections they use close
        bot_engine = RemoteEngine(client(server.url), config.cluster, protocol.expected_identity("tiny"),
                                  url=server.url, model_name="tiny")
        cleanup.push_async_callback(bot_engine.close)
        await bot_engine.start()

        def workers_running() -> None:
            """A worker's task that ended is the failure to show (not the timeout it causes)."""
            for task in tasks:
                if task.done():
                    raise AssertionError(f"a worker stopped: {task.exception() or task.result()!r}")

        async def both_live():
            workers_running()
            return bot_engine.parallelism == 2

        await until(both_live, 20, what="two live workers")
        core = ChatCore(config, store, bot_engine, is_test_model=True, delivery_backoff=0.01)
        warm = RecordingConversation("c0")
        await core.submit(USERS[0], warm, _draw(core, "warm up"))

        async def warm_delivered():
            workers_running()
            return len(warm.pictures) == 1

        await until(warm_delivered, 60, what="the warm-up picture")
        await asyncio.wait_for(core.drain(), 30)
        job_seconds = core.state.job_seconds
        assert job_seconds and len(warm.pictures) == 1

        convs = [RecordingConversation(f"c{n}") for n in range(4)]
        ids = [await core.submit(USERS[n % 4], convs[n % 4], _draw(core, f"job {n}")) for n in range(6)]
        assert all(ids)
        drawing["most"] = 0

        async def all_done():
            workers_running()
            records = [await store.get_job(job_id) for job_id in ids]
            return all(r and r.delivered_at for r in records)

        # (The store's "running" rows are no measure: a worker may start its next job before the bot has saved the
        # last one as done.)
        await until(all_done, 60, every=0.02, what="six pictures")
        assert drawing["most"] == 2

        # Each ack told the place in the store's queue and an ETA of ceil(place / 2) average jobs.
        m = PlainMarkup()
        places = []
        for conv in convs:
            for text in conv.texts():
                if text.startswith("Got it"):
                    place = 1 if "next in line" in text else int(text.split("#")[1].split(" ")[0])
                    places.append(place)
                    assert text == m.escape(f"Got it - you are "
                                            f"{'next in line' if place == 1 else f'#{place} in the queue'}"
                                            f" (about {_duration(job_seconds * -(-place // 2))})."), text
        assert max(places) >= 3  # where one worker would have said a longer wait
        await core.stop_accepting()


def _duration(seconds):
    from bot.replies import duration

    return duration(seconds)


async def test_redis_refusing_writes_is_one_line_on_each_side_and_the_job_accepted_meanwhile_is_drawn(
        tmp_path, models_dir, tiny_settings, caplog):
    """A Redis that answers but refuses writes for a while (its disk full: MISCONF; here NOREPLICAS, the same kind of
    error, by `min-replicas-to-write`): the worker and the bot each say so in one line and retry, neither stops, the
    job accepted meanwhile is not failed, and it is drawn and delivered once Redis takes writes again."""
    needs_redis()

    caplog.set_level(logging.INFO, logger="bot.cluster")
    path = cluster_config(tmp_path / "config.toml", models_dir, lease=3.0, heartbeat=0.3)
    config = load_config(path)
    settings = tiny_settings.model_copy(update={"mode": "resident"})
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as cleanup:
        server = RedisServer(tmp_path / "redis")
        server.start()
        cleanup.callback(server.stop)
        store = await Store.open(config.storage.database_path, config.storage.images_dir)
        cleanup.push_async_callback(store.close)
        task = await _start_worker(cleanup, server, config, settings, "w0", stop)

        async def stop_worker():
            stop.set()
            await asyncio.wait_for(task, 30)

        cleanup.push_async_callback(stop_worker)
        bot_engine = RemoteEngine(client(server.url), config.cluster, protocol.expected_identity("tiny"),
                                  url=server.url, model_name="tiny")
        cleanup.push_async_callback(bot_engine.close)
        await bot_engine.start()

        async def worker_live():
            return len(bot_engine.live_workers) == 1

        await until(worker_live, 20, what="the worker")
        admin = client(server.url)
        cleanup.push_async_callback(admin.aclose)
        core = ChatCore(config, store, bot_engine, is_test_model=True, delivery_backoff=0.01)

        await admin.config_set("min-replicas-to-write", 1)  # every write refused from now on
        conv = RecordingConversation("c0")
        job_id = await core.submit(USERS[0], conv, _draw(core, "a fox"))
        assert job_id, conv.texts()
        await asyncio.sleep(3.0)  # several retries on both sides
        assert not task.done(), task  # the worker did not stop (it raised NOREPLICAS out of its loop before)
        record = await store.get_job(job_id)
        assert record is not None and record.status in ("queued", "running"), record
        assert not conv.pictures and not any("could not" in t for t in conv.texts()), conv.texts()
        worker_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker w0: Redis at")]
        assert worker_lines == [f"worker w0: Redis at redis://***@127.0.0.1:{server.port}/0 refuses writes "
                                "(NOREPLICAS Not enough good replicas to write.); retrying"], worker_lines
        bot_lines = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()
                     and r.name == "bot.cluster.remote"]
        assert 1 <= len(bot_lines) <= 2, bot_lines  # following events, publishing the job: not one per retry

        await admin.config_set("min-replicas-to-write", 0)

        async def delivered():
            return len(conv.pictures) == 1

        await until(delivered, 30, what="the picture accepted while Redis refused writes")
        await asyncio.sleep(0.5)  # room for a duplicate, were there one
        assert [p.job_id for p in conv.pictures] == [job_id]
        record = await store.get_job(job_id)
        assert record is not None and record.status == "done" and record.delivered_at
        assert "worker w0: Redis at" in caplog.text and "is back after" in caplog.text
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert server.password not in caplog.text
        await core.stop_accepting()
    assert task.result() == 0


async def test_a_worker_stopped_while_redis_is_down_after_a_picture_stops_without_waiting_for_redis(
        tmp_path, models_dir, tiny_settings, caplog):
    """Redis goes down just as a picture is finished, and the worker is stopped (systemctl stop): it stops within
    seconds, saying the job is drawn again after its lease, instead of retrying the hand-back until Redis returns
    (before: it never stopped while Redis was down)."""
    needs_redis()
    from engine.jobs import GenerationRequest

    caplog.set_level(logging.INFO, logger="bot.cluster")
    path = cluster_config(tmp_path / "config.toml", models_dir, lease=3.0, heartbeat=0.3)
    config = load_config(path)
    settings = tiny_settings.model_copy(update={"mode": "resident"})
    entered, go = threading.Event(), threading.Event()

    class Gated:
        def __init__(self, pipeline):
            self._pipeline = pipeline
            self.model_name, self.device = pipeline.model_name, pipeline.device
            self.is_test_model, self.size_cost = pipeline.is_test_model, None

        def generate(self, request, on_step):
            entered.set()
            go.wait(60)
            return self._pipeline.generate(request, on_step)

    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as cleanup:
        server = RedisServer(tmp_path / "redis")
        server.start()
        cleanup.callback(server.stop)
        task = await _start_worker(cleanup, server, config, settings, "w0", stop, wrap=Gated)
        cleanup.callback(task.cancel)
        bot_engine = RemoteEngine(client(server.url), config.cluster, protocol.expected_identity("tiny"),
                                  url=server.url, model_name="tiny")
        cleanup.push_async_callback(bot_engine.close)
        await bot_engine.start()
        bot_engine.submit(GenerationRequest("a fox", 1, 2, 64, 64), job_id="fox")
        assert await asyncio.to_thread(entered.wait, 30), "the worker never started drawing"
        server.kill()
        go.set()  # the picture is finished while Redis is down

        async def handing_back():
            return "while handing back job fox" in caplog.text

        await until(handing_back, 30, what="the hand-back retrying")
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
        assert "worker w0: stopping before Redis took job fox back; another worker draws it after its lease" \
            in caplog.text
        assert not [r for r in caplog.records if r.exc_info]
