"""End to end: the real discord.py client (DiscordPlatform) against the fake Discord on loopback, with the real chat
core, a real SQLite store and the real engine on the tiny model. Nothing Discord-side is mocked: the fake enforces
the 3-second acknowledgement and the 15-minute token, and records every message version with the pings it causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.adapters.discord import DiscordPlatform
from bot.config import Config, DiscordSettings, LimitSettings, StorageSettings
from bot.core import ChatCore
from bot.store import Store
from engine.png import read_parameters
from engine.worker import Engine
from tests.fakes.discord_api import no_leaked_tasks  # noqa: F401 - autouse fixture
from tests.fakes.discord_api import (
    ACK_WINDOW_S,
    TOKEN_LIFETIME_S,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeUser,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MSG_FLAG_LOADING = 1 << 7


@dataclass
class World:
    fake: FakeDiscord
    guild: FakeGuild
    channel: FakeChannel
    alice: FakeUser
    bob: FakeUser
    state_dir: Path


def assert_nothing_could_ping_the_crowd(fake: FakeDiscord) -> None:
    """Every message version the bot produced: no @everyone/@here/role ping, and mentions restricted explicitly."""
    for message in fake.messages():
        for version in message.versions:
            assert not version.pings.everyone and not version.pings.roles, (message.id, version.content)
            if version.content:
                assert version.allowed_mentions is not None, version.content
                parse = set(version.allowed_mentions.get("parse") or [])
                assert not parse & {"everyone", "roles", "users"}, version.allowed_mentions



@pytest.fixture
async def world(discord_urls: None, tmp_path: Path) -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        guild = fake.add_guild("Art Club", channels=("general",))
        fake.add_member(guild, alice)
        fake.add_member(guild, bob)
        yield World(fake, guild, guild.channel("general"), alice, bob, tmp_path / "state")
        assert_nothing_could_ping_the_crowd(fake)


class PacedPipeline:
    """The real tiny pipeline, with a pause after each step so a job's length does not depend on the CPU:
    progress edits (at most one a second) and "still queued" windows then happen on any machine."""

    def __init__(self, pipeline, seconds_per_step: float) -> None:
        self._pipeline = pipeline
        self._pause = seconds_per_step

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def generate(self, request, on_step):
        def paced(done: int, total: int) -> None:
            if done:
                time.sleep(self._pause)  # the engine's executor thread, as a slower GPU would take
            on_step(done, total)

        return self._pipeline.generate(request, paced)


@pytest.fixture
async def engine(tiny_pipeline) -> AsyncIterator[Engine]:
    engine = Engine(lambda: PacedPipeline(tiny_pipeline, seconds_per_step=0.04))
    await engine.start()
    yield engine
    await engine.close(timeout=30)


def make_config(tiny_settings, world: World, **discord_settings) -> Config:
    return Config(
        engine=tiny_settings.model_copy(update={"default_steps": 2, "max_steps": 200}),
        limits=LimitSettings(cooldown_seconds=0, max_active_per_user=5, per_hour=0, per_day=0,
                             admins=[f"discord:{world.alice.id}"]),
        storage=StorageSettings(state_dir=world.state_dir),
        discord=DiscordSettings(progress_interval=1.0, api_base_url=world.fake.api_base,
                                gateway_url=world.fake.gateway_url, **discord_settings),
    )


def make_bot(config: Config, store: Store, engine, seeds: Iterator[int] | None = None) -> DiscordPlatform:
    seeds = seeds or iter(range(1000, 2000))
    core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01,
                    random_seed=lambda: next(seeds))
    platform = DiscordPlatform(core, config.discord, FakeDiscord().token, guild_ready_timeout=0.05)
    core.add_platform(platform)
    return platform


@contextlib.asynccontextmanager
async def running(platform: DiscordPlatform, fake: FakeDiscord, *, drain: bool = True
                  ) -> AsyncIterator[DiscordPlatform]:
    """`platform.run()` until the block ends (after the core's jobs are delivered, with `drain`); a crash of the
    client surfaces in `fake.wait_for`."""
    task = asyncio.create_task(platform.run(), name="discord-platform-run")
    fake.watch_task(task)
    try:
        await fake.wait_for(platform.client.is_ready)
        yield platform
        if drain:
            await asyncio.wait_for(platform.core.drain(), timeout=30)
    finally:
        fake.unwatch_task(task)
        await platform.stop()
        ready_countdown = getattr(platform.client._connection, "_ready_task", None)  # private discord.py 2.7
        if ready_countdown is not None and not ready_countdown.done():
            ready_countdown.cancel()
            await asyncio.wait({ready_countdown})
        await asyncio.wait({task}, timeout=5)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()


def picture_of(interaction: FakeInteraction) -> FakeMessage | None:
    return next((m for m in interaction.followups if m.attachments and not m.deleted), None)


def job_id_of(message: FakeMessage) -> str:
    return message.custom_ids[0].rsplit(":", 1)[1]


def seed_in(message: FakeMessage) -> int:
    return int(message.embeds[0]["description"].split("seed `")[1].split("`")[0])


async def test_draw_is_deferred_at_once_shows_queue_and_progress_then_delivers_a_png_with_buttons(
        tiny_settings, world, store, engine, caplog):
    fake = world.fake
    platform = make_bot(make_config(tiny_settings, world), store, engine)
    with caplog.at_level(logging.DEBUG):
        async with running(platform, fake):
            inter = await fake.slash_command("draw", {"prompt": "a red fox", "seed": 42, "steps": 40},
                                             user=world.alice)
            picture = await fake.wait_for(lambda: picture_of(inter), timeout=60)
    # Neither the prompt nor any token reaches the log at INFO or above.
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert logged and not [line for line in logged if "red fox" in line or fake.token in line or inter.token in line]

    assert inter.callback_type == 5 and inter.callback_delay < ACK_WINDOW_S
    assert inter.calls[0].json == {"type": 5}  # thinking, not ephemeral: the queue message is public
    # The original response: "thinking…", then the queue position, throttled progress, and "Done."
    original = inter.original
    texts = [v.content for v in original.versions]
    assert original.versions[0].flags & MSG_FLAG_LOADING and texts[0] == ""
    assert texts[1].startswith(("Got it", "Starting"))
    progress = [v for v in original.versions if v.content.startswith("Drawing")]
    assert progress and all("/40" in v.content for v in progress)
    assert all(b.at - a.at >= 0.9 for a, b in zip(progress, progress[1:]))  # progress_interval = 1 s
    assert texts[-1] == "Done."
    # The picture: a follow-up with the PNG, an embed with the parameters, and three persistent buttons.
    assert picture is not original and picture.kind == "followup" and not picture.ephemeral
    [attachment] = picture.attachments
    assert attachment.data.startswith(PNG_SIGNATURE) and attachment.content_type == "image/png"
    assert "Seed: 42," in read_parameters(attachment.data)
    [embed] = picture.embeds
    assert embed["description"].startswith("a red fox\nseed `42` · 40 steps · 64×64 · ")
    assert "noise" in embed["description"]  # the tiny model says so
    assert embed["image"]["url"] == f"attachment://{attachment.filename}"
    job = job_id_of(picture)
    assert picture.custom_ids == [f"drawbot:reroll:{job}", f"drawbot:again:{job}", f"drawbot:delete:{job}"]
    [record] = await store.history("discord", str(world.alice.id))
    assert record.id == job and record.seed == 42 and record.steps == 40 and record.delivered_at is not None
    assert record.image_path.read_bytes() == attachment.data


async def test_buttons_owner_gets_new_pictures_and_delete_others_get_a_private_refusal(
        tiny_settings, world, store, engine):
    fake = world.fake
    platform = make_bot(make_config(tiny_settings, world), store, engine, seeds=iter([11, 22, 33]))
    async with running(platform, fake):
        first = await fake.slash_command("draw", {"prompt": "a lighthouse"}, user=world.alice)
        picture = await fake.wait_for(lambda: picture_of(first), timeout=60)
        job = job_id_of(picture)

        stranger = await fake.press_button(picture, f"drawbot:reroll:{job}", user=world.bob)
        refusal = await fake.wait_for(lambda: stranger.followups and stranger.followups[0])
        reroll = await fake.press_button(picture, f"drawbot:reroll:{job}", user=world.alice)
        rerolled = await fake.wait_for(lambda: picture_of(reroll), timeout=60)
        again = await fake.press_button(picture, f"drawbot:again:{job}", user=world.alice)
        same = await fake.wait_for(lambda: picture_of(again), timeout=60)
        stranger_delete = await fake.press_button(picture, f"drawbot:delete:{job}", user=world.bob)
        await fake.wait_for(lambda: stranger_delete.followups)
        delete = await fake.press_button(picture, f"drawbot:delete:{job}", user=world.alice)
        await fake.wait_for(lambda: picture.deleted)

    # A button press is acknowledged silently at once (deferred update); the picture message is not touched.
    for press in (stranger, reroll, again, stranger_delete, delete):
        assert press.callback_type == 6 and press.callback_delay < ACK_WINDOW_S
    assert refusal.ephemeral and "Only the person who asked" in refusal.content
    assert stranger_delete.followups[0].ephemeral and "Only the person" in stranger_delete.followups[0].content
    assert (seed_in(picture), seed_in(rerolled), seed_in(same)) == (11, 22, 11)
    # The reroll's own queue message is public and separate from the picture it came from.
    queue_message = reroll.followups[0]
    assert queue_message.versions[0].content.startswith(("Got it", "Starting")) and not queue_message.ephemeral
    assert queue_message.content == "Done." and rerolled is reroll.followups[1]
    assert picture.edit_count == 0 and not rerolled.deleted and not same.deleted
    assert delete.followups == []  # nothing said, the picture just went away
    assert len(await store.history("discord", str(world.bob.id))) == 0


async def test_a_prompt_full_of_mentions_pings_nobody_and_is_shown_as_typed(tiny_settings, world, store, engine):
    fake = world.fake
    role = fake.add_role(world.guild, "artists", mentionable=True)
    prompt = f"@everyone @here <@&{role.id}> <@{world.bob.id}> **loud** # title"
    platform = make_bot(make_config(tiny_settings, world), store, engine)
    async with running(platform, fake):
        inter = await fake.slash_command("draw", {"prompt": prompt}, user=world.alice)
        picture = await fake.wait_for(lambda: picture_of(inter), timeout=60)
        history = await fake.slash_command("history", user=world.alice)
        await fake.wait_for(lambda: history.followups)

    description = picture.embeds[0]["description"]
    assert "@\u200beveryone @\u200bhere" in description and "\\*\\*loud\\*\\*" in description
    listing = history.followups[0]
    assert listing.ephemeral and "@\u200beveryone" in listing.content
    for message in fake.messages():
        for version in message.versions:
            assert version.pings.users == frozenset() and version.pings.roles == frozenset()
    # The stored prompt is the prompt as typed: escaping is only how Discord shows it.
    [record] = await store.history("discord", str(world.alice.id))
    assert record.prompt == prompt


async def test_a_job_that_outlives_its_interaction_token_is_delivered_in_the_channel_to_its_requester(
        tiny_settings, world, store, engine):
    fake = world.fake
    platform = make_bot(make_config(tiny_settings, world), store, engine)
    async with running(platform, fake):
        long = await fake.slash_command("draw", {"prompt": "a long one", "steps": 40}, user=world.alice)
        await fake.wait_for(lambda: long.original and long.original.content.startswith(("Drawing", "Starting")),
                            timeout=60)
        queued = await fake.slash_command("draw", {"prompt": "waiting in line"}, user=world.bob)
        await fake.wait_for(lambda: queued.original and "next in line" in queued.original.content)
        fake.advance(TOKEN_LIFETIME_S + 1)  # both tokens die while the first job is still drawing
        delivered = await fake.wait_for(
            lambda: len(found := [m for m in fake.messages(world.channel) if m.kind == "channel"]) == 2 and found,
            timeout=60)

    by_requester = {next(iter(m.pings.users)): m for m in delivered}
    assert set(by_requester) == {world.alice.id, world.bob.id}
    for user, message in ((world.alice, by_requester[world.alice.id]), (world.bob, by_requester[world.bob.id])):
        assert message.content.startswith(f"<@{user.id}>") and message.pings.users == {user.id}
        assert message.allowed_mentions == {"parse": [], "users": [user.id]}
        assert message.attachments[0].data.startswith(PNG_SIGNATURE)
        assert message.custom_ids[0].startswith("drawbot:reroll:")
    assert "waiting in line" in by_requester[world.bob.id].embeds[0]["description"]
    # The follow-up was tried first and refused with Discord's "Invalid Webhook Token".
    assert any(c.error_code == 50027 for c in queued.rejected_calls)
    assert picture_of(queued) is None
    # Progress kept going through the channel endpoint, which can still edit the bot's own message.
    assert queued.original.content == "Done."
    records = {r.prompt: r for r in await store.history("discord", str(world.bob.id))}
    assert records["waiting in line"].delivered_at is not None


async def test_commands_sync_once_across_restarts_and_buttons_still_work_after_one(
        tiny_settings, world, store, engine):
    fake = world.fake
    config = make_config(tiny_settings, world)
    first = make_bot(config, store, engine, seeds=iter([7]))
    async with running(first, fake):
        inter = await fake.slash_command("draw", {"prompt": "before the restart"}, user=world.alice)
        picture = await fake.wait_for(lambda: picture_of(inter), timeout=60)
    assert len(fake.command_syncs) == 1 and fake.command_syncs[0].guild_id is None
    assert sorted(fake.command_syncs[0].created) == ["cancel", "draw", "drawbot-admin", "help", "history", "usage"]

    # Restart with the same commands: no sync; the old picture's button is handled by the new process.
    second = make_bot(config, store, engine, seeds=iter([8]))
    async with running(second, fake):
        again = await fake.press_button(picture, f"drawbot:again:{job_id_of(picture)}", user=world.alice)
        redrawn = await fake.wait_for(lambda: picture_of(again), timeout=60)
    assert len(fake.command_syncs) == 1
    assert seed_in(redrawn) == 7

    # Restart with a changed command set (no DMs now): synced again, once.
    third = make_bot(make_config(tiny_settings, world, allow_dms=False), store, engine)
    async with running(third, fake):
        pass
    assert len(fake.command_syncs) == 2 and "draw" in fake.command_syncs[1].updated
    draw = next(c for c in fake.registered_commands() if c["name"] == "draw")
    assert draw["contexts"] == [0]


async def test_dms_refused_when_not_allowed(tiny_settings, world, store, engine):
    fake = world.fake
    platform = make_bot(make_config(tiny_settings, world, allow_dms=False), store, engine)
    async with running(platform, fake):
        with pytest.raises(PermissionError, match="not available in DMs"):  # hidden from the DM command list
            await fake.slash_command("draw", {"prompt": "x"}, user=world.bob, dm=True)
        # A stale client could still send it: the bot refuses privately and draws nothing.
        inter = await fake.slash_command("draw", {"prompt": "x"}, user=world.bob, dm=True, validate=False)
        await fake.wait_for(lambda: inter.acknowledged)
    assert inter.callback_type == 4 and inter.original.ephemeral
    assert "only draw in servers" in inter.original.content
    assert await store.history("discord", str(world.bob.id)) == []


async def test_jobs_accepted_before_a_restart_are_drawn_after_it_and_delivered_in_the_channel(
        tiny_settings, tiny_pipeline, world, store):
    fake = world.fake
    config = make_config(tiny_settings, world)
    engine = Engine(lambda: PacedPipeline(tiny_pipeline, seconds_per_step=0.04))
    await engine.start()
    first = make_bot(config, store, engine)
    async with running(first, fake, drain=False):
        drawing = await fake.slash_command("draw", {"prompt": "cut short", "steps": 40}, user=world.alice)
        await fake.wait_for(lambda: drawing.original and drawing.original.content.startswith(("Drawing", "Starting")),
                            timeout=60)
        waiting = await fake.slash_command("draw", {"prompt": "still waiting"}, user=world.bob)
        await fake.wait_for(lambda: waiting.original and "next in line" in waiting.original.content)
        # What the runner does on SIGTERM: stop accepting, stop the engine, let the followers end.
        await first.core.stop_accepting()
        await engine.close(timeout=0)
        await asyncio.wait_for(first.core.drain(), timeout=30)
    assert "restarting" in waiting.followups[-1].content
    assert {r.status for r in await store.unfinished_jobs()} == {"queued"}  # the cut-short one is queued again

    fake.advance(TOKEN_LIFETIME_S + 1)  # down long enough for every interaction token to die
    engine = Engine(lambda: PacedPipeline(tiny_pipeline, seconds_per_step=0.04))
    await engine.start()
    try:
        second = make_bot(config, store, engine)
        # The runner recovers before the platforms run: the conversations log in over REST by themselves.
        assert await second.core.recover() == 2
        async with running(second, fake):
            delivered = await fake.wait_for(
                lambda: len(found := [m for m in fake.messages(world.channel) if m.attachments]) == 2 and found,
                timeout=60)
    finally:
        await engine.close(timeout=30)
    assert [m.content for m in delivered] == [f"<@{world.alice.id}> here is your picture:",
                                              f"<@{world.bob.id}> here is your picture:"]
    assert [m.pings.users for m in delivered] == [{world.alice.id}, {world.bob.id}]
    assert all(m.kind == "channel" for m in delivered)
    # Each job's new progress message starts by saying so, in the channel (the tokens are dead), pinging nobody.
    notices = [m for m in fake.messages(world.channel) if "still coming" in m.versions[0].content]
    assert len(notices) == 2 and all(m.kind == "channel" and not m.pings.users for m in notices)
    assert all(m.content == "Done." for m in notices)
    assert all(r.delivered_at is not None for r in await store.history("discord", str(world.alice.id)))
