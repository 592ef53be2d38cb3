"""The chat-side test rig, shared by the core, admin and adapter tests: a real SQLite store, the real engine on the
tiny model, the limits most tests want (none in the way) and a core with a recording platform."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.config import Config, LimitSettings
from bot.core import ChatCore
from bot.store import Store
from engine.settings import EngineSettings
from engine.worker import Engine
from tests.bot.conversation import RecordingPlatform


def make_config(tiny_settings: EngineSettings, **limits: Any) -> Config:
    """The tiny engine at 2 steps by default; no cooldown or quota unless a test asks (`**limits`)."""
    base: dict[str, Any] = dict(cooldown_seconds=0, max_active_per_user=5, per_hour=0, per_day=0, queue_cap=50)
    base.update(limits)
    return Config(engine=tiny_settings.model_copy(update={"default_steps": 2}), limits=LimitSettings(**base))


def core_for(config: Config, store: Store, engine: Any, **kw: Any) -> ChatCore:
    """A core flagged as on the test model, retrying deliveries quickly, with a `RecordingPlatform` added."""
    core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01, **kw)
    core.add_platform(RecordingPlatform())
    return core


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images")
    yield store
    await store.close()


@pytest.fixture
async def engine(tiny_pipeline: Any) -> AsyncIterator[Engine]:
    engine = Engine(lambda: tiny_pipeline)
    await engine.start()
    yield engine
    await engine.close(timeout=30)


@pytest.fixture
def discord_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back discord.py's process-wide REST base and gateway URL, which a `DiscordPlatform` sets from its config
    (the tests point it at a fake Discord)."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
