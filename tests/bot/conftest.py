"""Fixtures shared by the chat-side tests."""

from __future__ import annotations

import discord
import pytest


@pytest.fixture
def discord_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back discord.py's process-wide REST base and gateway URL, which a `DiscordPlatform` sets from its config
    (the tests point it at a fake Discord)."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
