"""Shared fixtures. The tiny Flux model is written and loaded once per test session (import + load ≈ 5 s)."""

from __future__ import annotations

import asyncio
import faulthandler
from pathlib import Path

import pytest

EXIT_GRACE_SECONDS = 60
"""After the summary, how long the interpreter may take to exit before the watchdog below ends it."""


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A thread that is not a daemon and never ends (one test's leak) keeps Python from exiting after the summary; CI
    then runs until it is killed, with nothing said. Instead: every thread's stack, then exit status 1."""
    faulthandler.dump_traceback_later(EXIT_GRACE_SECONDS, exit=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder holding only the generated tiny model (no real weights exist on test machines)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_settings(models_dir):
    from engine.settings import EngineSettings

    return EngineSettings(model="tiny", models_dir=models_dir, device="cpu", width=64, height=64,
                          default_steps=4, max_steps=50)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_settings):
    """The real FluxPipeline (DiffSynth, fp8 DiT) on the tiny model, loaded once."""
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(tiny_settings)


@pytest.fixture(scope="session")
def tiny_offload_pipeline(tiny_settings):
    """The same tiny model in DiffSynth's own per-layer offload mode (the fallback to `stream`)."""
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(tiny_settings.model_copy(update={"mode": "offload"}))


@pytest.fixture(autouse=True)
def no_store_left_open(monkeypatch):
    """Fails a test that leaves a Store open, and stops that store's thread. aiosqlite's worker thread is not a
    daemon: one store left open (a test's cleanup cut short) kept pytest from exiting after its summary, and CI ran
    until it was killed."""
    from bot.store import Store

    opened: list[Store] = []
    connect = Store._connect.__func__

    async def recording(cls, *args, **kwargs):
        store = await connect(cls, *args, **kwargs)
        opened.append(store)
        return store

    monkeypatch.setattr(Store, "_connect", classmethod(recording))
    yield
    left = [store for store in opened if store._db._connection is not None]
    for store in left:  # the test's event loop is closed by now: close the connection from a new one
        asyncio.run(asyncio.wait_for(store._db.close(), 10))
        store._db._thread.join(10)
    if left:
        pytest.fail(f"the test left {len(left)} Store(s) open ({', '.join(str(s._path) for s in left)}): close them "
                    "in its cleanup")
