"""The cluster's edges: config and secrets, the model identity, size refusals, refused workers, Redis unreachable,
and that without [cluster] nothing of redis is imported. Real redis-server where Redis is involved."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest

from bot.cluster import protocol
from bot.cluster.settings import ClusterSettings, RedisUrlError, read_redis_url, redacted
from bot.config import ConfigError, load_config
from engine.jobs import GenerationRequest, RequestRefused
from tests.cluster.conftest import REPO, RedisServer, cluster_config


@pytest.mark.parametrize("key", ["redis_url", "password", "url"])
def test_a_redis_url_or_password_in_the_toml_is_refused(tmp_path, key):
    path = tmp_path / "config.toml"
    path.write_text(f'[cluster]\nenabled = true\n{key} = "redis://:hunter2@10.0.0.2:6379"\n')
    with pytest.raises(ConfigError, match=r"\[cluster\]\.%s: .*DRAWBOT_REDIS_URL" % key) as err:
        load_config(path)
    assert "hunter2" not in str(err.value)


def test_redis_url_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DRAWBOT_REDIS_URL", raising=False)
    with pytest.raises(RedisUrlError, match="DRAWBOT_REDIS_URL"):
        read_redis_url(ClusterSettings())
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@192.168.1.10:6379/0\n")
    assert read_redis_url(ClusterSettings(redis_url_file=secret)) == "redis://:s3cret@192.168.1.10:6379/0"
    monkeypatch.setenv("DRAWBOT_REDIS_URL", "redis://:other@127.0.0.1:6379/0")
    assert read_redis_url(ClusterSettings(redis_url_file=secret)).startswith("redis://:other@")
    monkeypatch.setenv("DRAWBOT_REDIS_URL", "http://example")
    with pytest.raises(RedisUrlError, match="redis://"):
        read_redis_url(ClusterSettings())
    assert redacted("redis://:s3cret@192.168.1.10:6379/0") == "redis://***@192.168.1.10:6379/0"


def test_the_bots_copy_of_the_tiny_models_hash_is_the_engines():
    from engine.tiny import tiny_hashes_by_part
    from engine.weights import REAL_HASHES

    assert protocol.MODEL_HASHES == {"majicflus": REAL_HASHES["dit"], "tiny": tiny_hashes_by_part()["dit"]}


def test_size_tiers():
    assert protocol.tier_of(64 * 64) == 512 * 512
    assert protocol.tier_of(1024 * 1024) == 1024 * 1024
    assert protocol.tier_of(1024 * 1040) == 1536 * 1536
    assert protocol.tiers_up_to(1100 * 1100) == [512 * 512, 768 * 768, 1024 * 1024]


def test_without_cluster_the_bot_never_imports_redis(tmp_path, models_dir):
    """The whole `drawbot run` path (console, tiny model, one picture): no drawbot module imports redis or the cluster
    placement. (torch's Inductor imports redis by itself when it is installed, for its optional remote cache: that
    import is recorded and allowed, since it is torch's, not drawbot's.)"""
    script = f"""
import asyncio, builtins, io, sys
importers = []
_import = builtins.__import__
def recording_import(name, *args, **kwargs):
    if name.split(".")[0] == "redis" and "redis" not in sys.modules:
        importers.append(sys._getframe(1).f_code.co_filename)
    return _import(name, *args, **kwargs)
builtins.__import__ = recording_import
from bot.config import Config
from bot.runner import run
config = Config.model_validate({{"engine": {{"model": "tiny", "models_dir": {str(models_dir)!r}, "mode": "resident",
    "device": "cpu", "width": 64, "height": 64, "default_steps": 1}}, "storage": {{"state_dir": {str(tmp_path / 'state')!r}}}}})
code = asyncio.run(run(config, stdin=io.StringIO("/draw a fox\\n"), stdout=io.StringIO()))
assert code == 0, code
assert all("/torch/" in path for path in importers), importers
cluster = sorted(m for m in sys.modules if m.startswith("bot.cluster") and m != "bot.cluster.settings"
                 and m != "bot.cluster")
assert not cluster, cluster
print("NO-REDIS-OK", importers)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert "NO-REDIS-OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_the_chat_side_imports_no_redis():
    """Config, core, store and runner import without redis (a bot without [cluster] needs no redis package)."""
    script = ("import sys; import bot.config, bot.core, bot.runner, bot.store, bot.cli; "
              "assert 'redis' not in sys.modules; print('OK')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert "OK" in done.stdout, done.stderr[-2000:]


async def _remote_engine(url, settings, model="tiny"):
    from bot.cluster.connection import client
    from bot.cluster.remote import RemoteEngine

    engine = RemoteEngine(client(url), settings, protocol.expected_identity(model), url=url)
    await engine.start()
    return engine


async def test_a_size_no_live_worker_draws_is_refused_and_a_foreign_worker_is_logged(redis_server, caplog):
    from bot.cluster.connection import client

    settings = ClusterSettings(enabled=True, heartbeat_seconds=0.2)
    keys = protocol.Keys(settings.namespace)
    redis = client(redis_server.url)
    small = protocol.Capability("small-gpu", "tiny", protocol.MODEL_HASHES["tiny"], protocol.PROTOCOL, 768 * 768, 8.0,
                                "cuda:0", seen=time.time())
    foreign = protocol.Capability("other-model", "majicflus", protocol.MODEL_HASHES["majicflus"], protocol.PROTOCOL,
                                  2048 * 2048, 24.0, "cuda:1", seen=time.time())
    for cap in (small, foreign):
        await redis.set(keys.worker(cap.name), cap.to_json(), px=60_000)
    caplog.set_level(logging.INFO, logger="bot.cluster.remote")
    engine = await _remote_engine(redis_server.url, settings)
    try:
        assert [c.name for c in engine.live_workers] == ["small-gpu"] and engine.parallelism == 1
        assert engine.check(GenerationRequest("a fox", 1, 2, 768, 768)) is None
        refusal = engine.check(GenerationRequest("a fox", 1, 2, 1024, 1024))
        assert refusal is not None and refusal.reason == "too_large" and "768x768" in refusal.message
        with pytest.raises(RequestRefused):
            engine.submit(GenerationRequest("a fox", 1, 2, 1024, 1024), job_id="big")
        assert not await redis.exists(keys.job("big"))
        assert "worker other-model is refused: it draws model majicflus" in caplog.text
        # ETAs count every live worker: two workers halve the wait of the second in line.
        await redis.set(keys.worker("second"), protocol.Capability(**{**small.__dict__, "name": "second"}).to_json(),
                        px=60_000)
        deadline = time.monotonic() + 5
        while engine.parallelism < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.parallelism == 2 and engine.capacity == 2
    finally:
        await engine.close()
        await redis.aclose()


def test_a_worker_for_another_model_is_refused_with_a_clear_line(tmp_path, models_dir, redis_server, workers):
    import redis as redis_sync

    r = redis_sync.Redis.from_url(redis_server.url)
    r.set("drawbot:bot", json.dumps({"model": "majicflus", "dit_hash": protocol.MODEL_HASHES["majicflus"],
                                     "protocol": protocol.PROTOCOL}))
    r.close()
    path = cluster_config(tmp_path / "config.toml", models_dir)
    proc = workers.start("wrong", path)
    assert proc.wait(180) == 2
    log = workers.log("wrong")
    assert "refused: the bot on this Redis wants model majicflus" in log and "this worker draws model tiny" in log
    assert "Traceback" not in log


def test_doctor_shows_redis_and_the_live_workers(redis_server, monkeypatch, tmp_path):
    import redis as redis_sync

    from bot.config import Config
    from bot.doctor import Verdict, check_cluster

    config = Config.model_validate({"engine": {"model": "tiny"}, "cluster": {"enabled": True}})
    monkeypatch.setenv("DRAWBOT_REDIS_URL", redis_server.url)
    check = check_cluster(config)
    assert check.verdict is Verdict.WARN and "0 live worker(s)" in check.detail and "drawbot worker" in check.fix
    r = redis_sync.Redis.from_url(redis_server.url)
    r.set("drawbot:worker:gpu0", protocol.Capability("gpu0", "tiny", protocol.MODEL_HASHES["tiny"], protocol.PROTOCOL,
                                                     1024 * 1024, 8.0, "cuda:0").to_json(), px=60_000)
    r.close()
    check = check_cluster(config)
    assert check.verdict is Verdict.OK and "gpu0: cuda:0, 8 GB, up to 1024x1024, idle - ok" in check.detail
    assert "test-secret" not in check.detail
    monkeypatch.setenv("DRAWBOT_REDIS_URL", "redis://:x@127.0.0.1:1/0")
    check = check_cluster(config)
    assert check.verdict is Verdict.FAIL and "does not answer" in check.detail


async def test_after_a_redis_restart_the_first_commands_on_pooled_connections_succeed(redis_server):
    """Connections opened before Redis restarted are stale: the first command on each is answered by "Connection
    closed by server". The client replaces such a connection and sends the command once more, so a restart that is
    over costs no error (and no "unreachable" line): before, a worker's hand-back right after a restart could fail on
    a pooled connection and log an outage that had already ended."""
    from bot.cluster.connection import client

    redis = client(redis_server.url)
    try:
        # Two connections in the pool: a blocking read holds one while the other command runs.
        await redis.xgroup_create("s", "g", id="$", mkstream=True)
        await asyncio.gather(redis.xreadgroup("g", "c", {"s": ">"}, block=200), redis.set("k", "1"))
        assert len(redis.connection_pool._available_connections) == 2
        redis_server.kill()
        redis_server.start()  # the same port; the data is on disk (appendfsync always)
        assert await redis.get("k") == b"1"
        assert await redis.set("k", "2")
        await asyncio.gather(redis.xreadgroup("g", "c", {"s": ">"}, block=200), redis.set("k", "3"))
    finally:
        await redis.aclose()


async def test_a_redis_acl_that_refuses_a_command_is_one_line_in_redis_words_and_the_worker_goes_on(redis_server,
                                                                                                    caplog):
    """An owner's Redis user without the right to a command the worker needs (here XAUTOCLAIM): the worker says so
    once, in Redis's words (which say what to fix), with no traceback, and keeps trying; once the ACL allows it, the
    next try goes through."""
    import redis as redis_sync

    from bot.cluster.connection import client
    from bot.cluster.worker import ClusterWorker

    admin = redis_sync.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "drawer", "on", ">drawer-pw", "~*", "&*", "+@all", "-xautoclaim")
    url = f"redis://drawer:drawer-pw@127.0.0.1:{redis_server.port}/0"
    settings = ClusterSettings(enabled=True, heartbeat_seconds=0.2, lease_seconds=2.0)
    cap = protocol.Capability("w-acl", "tiny", protocol.MODEL_HASHES["tiny"], protocol.PROTOCOL, 768 * 768, 8.0, "cpu")
    caplog.set_level(logging.INFO, logger="bot.cluster")
    redis = client(url)
    stop = asyncio.Event()
    worker = ClusterWorker(redis, settings, engine=None, capability=cap, url=url)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(2.5)  # a few tries, one second apart
        assert not task.done()
        lines = [r.getMessage() for r in caplog.records if "xautoclaim" in r.getMessage()]
        assert lines == ["worker w-acl: taking or drawing a job failed (going on): Redis answered this user has no "
                         "permissions to run the 'xautoclaim' command"], lines
        assert not [r for r in caplog.records if r.exc_info]
        admin.execute_command("ACL", "SETUSER", "drawer", "+xautoclaim")
        caplog.clear()
        await asyncio.sleep(1.5)
        assert not task.done() and "xautoclaim" not in caplog.text
        assert admin.exists("drawbot:worker:w-acl")  # its heartbeat went on throughout
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
        await redis.aclose()
        admin.close()
