"""Metrics: counters in a registry of their own, and the /metrics endpoint of a running bot after a real job."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time

import httpx
import pytest

from bot.config import Config, ConsoleSettings, LimitSettings, MetricsSettings, PolicySettings, StorageSettings
from bot.metrics import Metrics, serve
from bot.runner import run
from engine.jobs import GenerationRequest, GenerationResult


def result(seconds: float = 12.0, per_step: float = 0.6, vram: int | None = 7 * 2**30) -> GenerationResult:
    return GenerationResult(request=GenerationRequest("x", 1, 20), png=b"", seconds=seconds,
                            seconds_per_step=per_step, peak_vram_bytes=vram, model_name="m")


def test_counters_live_in_their_own_registry():
    first, second = Metrics(), Metrics()
    first.accepted("telegram")
    first.finished("done", result())
    first.finished("failed")
    first.refused("cooldown")
    first.delivery_failed("discord")
    value = first.registry.get_sample_value
    assert value("drawbot_jobs_accepted_total", {"platform": "telegram"}) == 1
    assert value("drawbot_jobs_total", {"outcome": "done"}) == 1
    assert value("drawbot_jobs_total", {"outcome": "failed"}) == 1
    assert value("drawbot_jobs_total", {"outcome": "cancelled"}) == 0  # present from the start
    assert value("drawbot_refusals_total", {"reason": "cooldown"}) == 1
    assert value("drawbot_delivery_failures_total", {"platform": "discord"}) == 1
    assert value("drawbot_generation_seconds_sum") == 12.0 and value("drawbot_generation_seconds_count") == 1
    assert value("drawbot_seconds_per_step_bucket", {"le": "1.0"}) == 1
    assert value("drawbot_seconds_per_step_bucket", {"le": "0.5"}) == 0
    assert value("drawbot_peak_vram_bytes") == 7 * 2**30
    assert second.registry.get_sample_value("drawbot_jobs_total", {"outcome": "done"}) == 0


def test_queue_length_is_read_at_scrape_time_and_cpu_jobs_leave_vram_alone():
    metrics, waiting = Metrics(), [3]
    metrics.track_queue(lambda: waiting[0])
    assert metrics.registry.get_sample_value("drawbot_queue_length") == 3
    waiting[0] = 0
    assert metrics.registry.get_sample_value("drawbot_queue_length") == 0
    metrics.finished("done", result(vram=None))
    assert metrics.registry.get_sample_value("drawbot_peak_vram_bytes") == 0


def test_unknown_outcome_is_a_bug_not_a_new_label():
    with pytest.raises(ValueError, match="unknown outcome"):
        Metrics().finished("exploded")


def test_server_serves_the_registry_and_closes():
    metrics = Metrics()
    metrics.refused("queue_full")
    server = serve(metrics, "127.0.0.1", 0)
    try:
        body = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
        assert 'drawbot_refusals_total{reason="queue_full"} 1.0' in body
    finally:
        server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_running_bot_serves_the_counters_after_a_job(tmp_path, tiny_settings):
    port = free_port()
    config = Config(engine=tiny_settings, storage=StorageSettings(state_dir=tmp_path / "state"),
                    limits=LimitSettings(cooldown_seconds=0, per_hour=0, per_day=0),
                    policy=PolicySettings(blocked_words=["forbidden"]),
                    console=ConsoleSettings(enabled=True, user="tester"),
                    metrics=MetricsSettings(enabled=True, host="127.0.0.1", port=port))
    read_fd, write_fd = os.pipe()
    out, stop = io.StringIO(), asyncio.Event()
    bot = asyncio.create_task(run(config, stdin=open(read_fd, encoding="utf-8"), stdout=out, stop=stop))
    try:
        os.write(write_fd, b"/draw a forbidden thing\n/draw a small boat 3 2\n")
        deadline = time.monotonic() + 60
        while "picture saved" not in out.getvalue():
            assert not bot.done() and time.monotonic() < deadline, out.getvalue()
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient() as client:
            body = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    finally:
        stop.set()
        assert await asyncio.wait_for(bot, 30) == 0
        os.close(write_fd)
    assert 'drawbot_jobs_total{outcome="done"} 1.0' in body
    assert 'drawbot_jobs_accepted_total{platform="console"} 1.0' in body
    assert 'drawbot_refusals_total{reason="policy"} 1.0' in body
    assert "drawbot_seconds_per_step_count 1.0" in body and "drawbot_generation_seconds_count 1.0" in body
    assert "drawbot_queue_length 0.0" in body
    with pytest.raises(httpx.ConnectError):  # the endpoint goes away with the bot
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
