"""The async engine on the real tiny Flux pipeline: order, positions, progress, cancel, OOM, event-loop lag."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from engine.jobs import EngineClosed, Failure, GenerationRequest, JobCancelled, JobFailed, QueueFull
from engine.worker import Engine


def req(seed: int = 1, steps: int = 3, prompt: str = "a red fox") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=steps, width=64, height=64)


@pytest.fixture
async def engine(tiny_pipeline):
    engine = Engine(lambda: tiny_pipeline, max_queue=10)
    await engine.start()
    yield engine
    await engine.close(timeout=30)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def kinds(self):
        return [e.kind for e in self.events]


async def test_progress_one_event_per_step_in_order(engine):
    rec = Recorder()
    result = await engine.submit(req(steps=5), rec).wait()
    progress = [e for e in rec.events if e.kind == "progress"]
    assert [e.step for e in progress] == [1, 2, 3, 4, 5]
    assert all(e.total == 5 for e in progress)
    assert progress[-1].eta == 0
    assert rec.kinds()[0] == "queued" and rec.kinds()[1] == "started" and rec.kinds()[-1] == "done"
    assert result.png.startswith(b"\x89PNG")
    assert result.test_model  # the chat side says so (bot/replies.py)


async def test_fifo_order_and_live_positions(engine):
    started: list[str] = []
    positions: dict[str, list[int]] = {}

    def listener(event):
        if event.kind == "started":
            started.append(event.job_id)
        if event.kind == "queued":
            positions.setdefault(event.job_id, []).append(event.position)

    jobs = [engine.submit(req(seed=i, steps=2), listener, job_id=f"j{i}") for i in range(4)]
    assert [j.position for j in jobs] == [1, 2, 3, 4]  # nothing has started yet: submit never yields
    await asyncio.gather(*(j.wait() for j in jobs))
    assert started == ["j0", "j1", "j2", "j3"]
    # The last job saw its position fall as the ones ahead of it started.
    assert positions["j3"] == [4, 3, 2, 1]
    assert all(j.position == 0 for j in jobs)


async def test_cancel_queued_job_never_runs_and_others_do(engine):
    rec = Recorder()
    first = engine.submit(req(seed=1, steps=3))
    second = engine.submit(req(seed=2, steps=3), rec)
    third = engine.submit(req(seed=3, steps=3))
    assert second.cancel() is True
    assert second.cancel() is False
    with pytest.raises(JobCancelled):
        await second.wait()
    await first.wait()
    await third.wait()
    assert "started" not in rec.kinds() and rec.kinds()[-1] == "cancelled"
    assert third.position == 0


async def test_cancel_running_job_stops_at_next_step(engine):
    rec = Recorder()
    cancelled_at = []

    def listener(event):
        rec(event)
        if event.kind == "progress" and event.step == 2:
            cancelled_at.append(event.step)
            job.cancel()

    job = engine.submit(req(seed=5, steps=40), listener)
    with pytest.raises(JobCancelled):
        await job.wait()
    steps_run = [e.step for e in rec.events if e.kind == "progress"]
    assert cancelled_at == [2]
    assert max(steps_run) < 40  # stopped well before the end
    # The engine goes on with the next job.
    result = await engine.submit(req(seed=6, steps=2)).wait()
    assert result.request.seed == 6


async def test_out_of_memory_fails_only_that_job(engine, tiny_pipeline):
    """Inject a CUDA OOM inside the real DiT forward once; that job fails clearly, the next one succeeds."""
    calls = {"n": 0}

    def raise_once(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = tiny_pipeline.pipe.dit.blocks[0].register_forward_pre_hook(raise_once)
    try:
        failing = engine.submit(req(seed=8, steps=2))
        following = engine.submit(req(seed=9, steps=2))
        with pytest.raises(JobFailed, match="ran out of memory") as failed:
            await failing.wait()
        assert failed.value.failure is Failure.OUT_OF_MEMORY  # data: the chat side words it (bot.replies.failed)
        result = await following.wait()
    finally:
        handle.remove()
    assert result.request.seed == 9 and result.png.startswith(b"\x89PNG")


async def test_event_loop_stays_responsive_while_generating(engine):
    lags: list[float] = []
    job = engine.submit(GenerationRequest(prompt="lag", seed=3, steps=12, width=128, height=128))

    async def ticker():
        while not job.done():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    await asyncio.gather(ticker(), job.wait())
    assert len(lags) > 20, "the generation was too short to measure anything"
    assert max(lags) < 0.050, f"event loop blocked for {max(lags) * 1000:.0f} ms"


async def test_queue_cap_and_closed_engine(tiny_pipeline):
    engine = Engine(lambda: tiny_pipeline, max_queue=2)
    await engine.start()
    running = engine.submit(req(seed=1, steps=2))
    await asyncio.sleep(0)  # let the worker take it
    engine.submit(req(seed=2))
    engine.submit(req(seed=3))
    with pytest.raises(QueueFull):
        engine.submit(req(seed=4))
    await engine.close(timeout=30)
    await running.wait()  # the running job was allowed to finish
    with pytest.raises(EngineClosed):
        engine.submit(req(seed=5))


async def test_close_stops_a_running_job_after_timeout(tiny_pipeline):
    engine = Engine(lambda: tiny_pipeline)
    await engine.start()
    job = engine.submit(GenerationRequest(prompt="long", seed=1, steps=200, width=64, height=64))
    while job.state.value != "running":
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await engine.close(timeout=0.2)
    assert time.monotonic() - started < 10
    with pytest.raises(JobCancelled):
        await job.wait()


async def test_listener_errors_do_not_break_the_engine(engine):
    def broken(event):
        raise ValueError("listener bug")

    result = await engine.submit(req(seed=11, steps=2), broken).wait()
    assert result.request.seed == 11
