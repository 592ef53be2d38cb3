"""The Discord adapter piece by piece: real `discord.Interaction` objects built from INTERACTION_CREATE payloads and
run through the command tree (as discord.py's own tests do), with the real chat core and SQLite store.

The payloads come from the fake Discord (tests/fakes/discord_api.py), which also answers the REST calls the
adapter makes, so acknowledgements, follow-ups and channel messages are checked on the wire. A plain client holds
the fake's gateway session; the adapter's client only logs in over REST and never sees the gateway, so each
interaction reaches the adapter exactly once: through `call_tree`. The engine is a stand-in that holds jobs
(no drawing here; tests/bot/test_discord.py runs the real one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import discord
import pytest
from discord import app_commands

from bot.adapters.discord import ConversationRef, DiscordMarkdown, DiscordPlatform
from bot.adapters.discord.buttons import JobButton, job_view
from bot.adapters.discord.commands import CommandSettings, build_tree
from bot.adapters.discord.conversation import TOKEN_SAFE_SECONDS, TokenExpired
from bot.adapters.discord.handlers import ADMINS_ONLY, NOT_IN_THIS_CHANNEL, NOT_IN_THIS_SERVER
from bot.adapters.discord.platform import use_endpoints
from bot.adapters.discord.sync import SyncState, command_payload, payload_hash
from bot.chat import Button, Picture
from bot.commands import SEED_MAX, size_for_ratio
from bot.config import Config, ConfigError, DiscordSettings, LimitSettings, StorageSettings, load_config
from bot.core import ChatCore
from bot.store import Store
from engine.jobs import GenerationRequest, JobCancelled, JobEvent, JobState
from tests.fakes.discord_api import no_leaked_tasks  # noqa: F401 - autouse fixture
from tests.fakes.discord_api import (
    ACK_WINDOW_S,
    TOKEN_LIFETIME_S,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    FakeInteraction,
    FakeUser,
    running_client,
)

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x40\x08\x02\x00\x00\x00" + bytes(64)
EPHEMERAL = 1 << 6


# ----------------------------------------------------------------------------------------------- a held engine


class HeldJob:
    def __init__(self, request: GenerationRequest, listener, job_id: str, position: int) -> None:
        self.id, self.request, self._listener = job_id, request, listener
        self.state = JobState.QUEUED
        self._position = position
        self._done: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def position(self) -> int:
        return self._position

    def cancel(self) -> bool:
        if self._done.done():
            return False
        self.state = JobState.CANCELLED
        self._done.set_exception(JobCancelled("cancelled"))
        if self._listener:
            self._listener(JobEvent(self.id, "cancelled"))
        return True

    async def wait(self):
        return await self._done


class HeldEngine:
    """Accepts jobs and keeps them queued until cancelled: what the adapter needs, without a model."""

    def __init__(self) -> None:
        self.jobs: list[HeldJob] = []

    def submit(self, request: GenerationRequest, listener=None, *, job_id: str | None = None) -> HeldJob:
        job = HeldJob(request, listener, job_id or f"job{len(self.jobs)}", position=self.queue_length + 1)
        self.jobs.append(job)
        return job

    @property
    def queue_length(self) -> int:
        return sum(1 for j in self.jobs if j.state is JobState.QUEUED)


# ----------------------------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    fake: FakeDiscord
    guild: FakeGuild
    channel: FakeChannel
    alice: FakeUser  # guild owner and bot admin
    bob: FakeUser
    core: ChatCore
    store: Store
    engine: HeldEngine
    platform: DiscordPlatform

    async def release_jobs(self) -> None:
        """Cancel the held jobs and wait until the core has finished following them."""
        for job in self.engine.jobs:
            job.cancel()
        await asyncio.wait_for(self.core.drain(), timeout=10)

    def interaction(self, inter: FakeInteraction) -> discord.Interaction:
        """A real discord.py Interaction, parsed from the payload Discord sent."""
        return discord.Interaction(data=inter.payload, state=self.platform.client._connection)

    async def command(self, name: str, options: dict | None = None, *, user: FakeUser, **where) -> FakeInteraction:
        inter = await self.fake.slash_command(name, options, user=user, **where)
        await call_tree(self.platform.tree, self.interaction(inter))
        return inter


async def call_tree(tree: app_commands.CommandTree, interaction: discord.Interaction) -> None:
    """What the tree runs for an INTERACTION_CREATE (discord.py 2.7 has no public `CommandTree.call`)."""
    try:
        await tree._call(interaction)
    except app_commands.AppCommandError as error:
        await tree._dispatch_error(interaction, error)


def make_config(state_dir: Path, fake: FakeDiscord, *, admins: list[str], **discord_settings) -> Config:
    return Config(
        limits=LimitSettings(cooldown_seconds=0, max_active_per_user=5, per_hour=30, per_day=0, admins=admins),
        storage=StorageSettings(state_dir=state_dir),
        discord=DiscordSettings(api_base_url=fake.api_base, gateway_url=fake.gateway_url, **discord_settings),
    )


@pytest.fixture
async def make_rig(tmp_path: Path, discord_urls: None) -> AsyncIterator:
    """`await make_rig(**discord_settings)`: fake Discord + store + core + logged-in platform (torn down after)."""
    stack: list = []

    async def make(**discord_settings) -> Rig:
        fake = FakeDiscord()
        await fake.start()
        stack.append(fake.stop)
        alice, bob = fake.add_user("alice"), fake.add_user("bob")
        guild = fake.add_guild("Art Club", owner=alice, channels=("general",))
        fake.add_member(guild, bob)
        store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images")
        stack.append(store.close)
        engine = HeldEngine()
        core = ChatCore(make_config(tmp_path / "state", fake, admins=[f"discord:{alice.id}"], **discord_settings),
                        store, engine, delivery_backoff=0.01, random_seed=lambda: 4242,
                        feed_ahead=100)  # the held engine never starts a job: let it hold every one
        platform = DiscordPlatform(core, core.config.discord, fake.token)
        core.add_platform(platform)
        await platform.login()
        stack.append(platform.stop)
        holder = running_client(discord.Client(intents=discord.Intents(guilds=True), guild_ready_timeout=0.05), fake)
        await holder.__aenter__()
        stack.append(lambda: holder.__aexit__(None, None, None))

        rig = Rig(fake, guild, guild.channel("general"), alice, bob, core, store, engine, platform)
        stack.append(rig.release_jobs)
        return rig

    yield make
    for close in reversed(stack):
        await close()


# ----------------------------------------------------------------------------------------------- slash commands


async def test_draw_defers_first_and_hands_typed_options_to_the_core(make_rig):
    rig = await make_rig()
    inter = await rig.command("draw", {"prompt": "a red fox", "seed": 7, "steps": 12, "size": "wide", "png": True},
                              user=rig.bob)
    callback = inter.calls[0]
    assert callback.route == "POST /interactions/{interaction_id}/{token}/callback" and callback.json == {"type": 5}
    assert inter.callback_delay < ACK_WINDOW_S
    # The first follow-up replaced "thinking…": the original response now shows the queue position.
    assert inter.original.content == "Got it - you are next in line." and not inter.original.loading
    [request] = [job.request for job in rig.engine.jobs]
    width, height = size_for_ratio(16, 9, rig.core.rules)
    assert request == GenerationRequest("a red fox", 7, 12, width, height)
    [record] = await rig.store.history("discord", str(rig.bob.id))
    assert record.chat_id == str(rig.guild.id) and record.reply_ref["as_file"] is True
    ref = ConversationRef.from_dict(record.reply_ref["conv"])
    assert (ref.application_id, ref.token, ref.channel_id, ref.guild_id, ref.requester_id) == (
        rig.fake.application_id, inter.token, rig.channel.id, rig.guild.id, rig.bob.id)
    assert not ref.ephemeral and abs(ref.created_at - time.time()) < 60


async def test_command_payloads_carry_the_configured_ranges_and_choices(make_rig):
    rig = await make_rig(allow_dms=False)
    [draw] = [c for c in rig.fake.registered_commands() if c["name"] == "draw"]
    options = {o["name"]: o for o in draw["options"]}
    engine = rig.core.config.engine
    assert (options["prompt"]["required"], options["prompt"]["max_length"]) == (True, 1000)
    assert (options["seed"]["min_value"], options["seed"]["max_value"]) == (0, SEED_MAX)
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (engine.min_steps, engine.max_steps)
    assert [c["value"] for c in options["size"]["choices"]] == ["square", "portrait", "landscape", "tall", "wide"]
    assert options["png"]["type"] == 5 and draw["contexts"] == [0]
    [admin] = [c for c in rig.fake.registered_commands() if c["name"] == "drawbot-admin"]
    assert int(admin["default_member_permissions"]) == discord.Permissions(manage_guild=True).value
    assert [o["name"] for o in admin["options"]] == ["queue", "ban", "unban"]


async def test_a_prompt_the_core_refuses_is_explained_in_the_response(make_rig):
    rig = await make_rig()
    inter = await rig.command("draw", {"prompt": "   "}, user=rig.bob)
    assert inter.callback_type == 5
    assert "Tell me what to draw" in inter.original.content and rig.engine.jobs == []


async def test_a_server_outside_the_allowlist_is_refused_privately_and_nothing_is_stored(make_rig, tmp_path):
    rig = await make_rig()
    other = rig.fake.add_guild("Elsewhere", owner=rig.bob)
    settings = rig.core.config.discord.model_copy(update={"allowed_guilds": [rig.guild.id]})
    rig.platform = DiscordPlatform(rig.core, settings, rig.fake.token, state_dir=tmp_path / "allowlist")
    await rig.platform.login()
    try:
        inter = await rig.command("draw", {"prompt": "a fox"}, user=rig.bob, guild_id=other)
        allowed = await rig.command("draw", {"prompt": "a fox"}, user=rig.bob, guild_id=rig.guild)
        await rig.release_jobs()
    finally:
        await rig.platform.stop()
    assert inter.callback_type == 4 and inter.original.ephemeral
    assert inter.original.content == NOT_IN_THIS_SERVER
    assert allowed.callback_type == 5 and len(rig.engine.jobs) == 1
    [record] = await rig.store.history("discord", str(rig.bob.id))
    assert record.chat_id == str(rig.guild.id)


async def test_a_channel_outside_the_allowlist_is_refused_privately(make_rig, tmp_path):
    rig = await make_rig()
    art = rig.fake.add_channel(rig.guild, "art")
    settings = rig.core.config.discord.model_copy(update={"allowed_channels": [art.id]})
    rig.platform = DiscordPlatform(rig.core, settings, rig.fake.token, state_dir=tmp_path / "channels")
    await rig.platform.login()
    try:
        refused = await rig.command("draw", {"prompt": "a fox"}, user=rig.bob, guild_id=rig.guild,
                                    channel_id=rig.guild.channel("general"))
        allowed = await rig.command("draw", {"prompt": "a fox"}, user=rig.bob, guild_id=rig.guild, channel_id=art)
        await rig.release_jobs()
    finally:
        await rig.platform.stop()
    assert refused.original.ephemeral and refused.original.content == NOT_IN_THIS_CHANNEL
    assert allowed.callback_type == 5 and len(rig.engine.jobs) == 1


async def test_personal_commands_answer_ephemerally(make_rig):
    rig = await make_rig()
    help_ = await rig.command("help", user=rig.bob)
    usage = await rig.command("usage", user=rig.bob)
    history = await rig.command("history", user=rig.bob)
    for inter in (help_, usage, history):
        assert inter.calls[0].json == {"type": 5, "data": {"flags": EPHEMERAL}}
        assert inter.original.ephemeral and inter.original.allowed_mentions == {"parse": []}
    assert help_.original.content.startswith("**drawbot** draws pictures")
    assert "/draw prompt: [seed:]" in help_.original.content and "--seed" not in help_.original.content
    assert "This hour: 0 of 30" in usage.original.content
    assert "no pictures yet" in history.original.content


async def test_cancel_cancels_only_the_callers_jobs(make_rig):
    rig = await make_rig()
    await rig.command("draw", {"prompt": "alice's"}, user=rig.alice)
    await rig.command("draw", {"prompt": "bob's"}, user=rig.bob)
    inter = await rig.command("cancel", user=rig.bob)
    await rig.fake.wait_for(lambda: inter.original.content)
    assert inter.original.content == "Cancelled 1 picture." and inter.original.ephemeral
    assert [j.state for j in rig.engine.jobs] == [JobState.QUEUED, JobState.CANCELLED]


async def test_admin_tools_are_hidden_and_refused_for_members_and_work_for_admins(make_rig):
    rig = await make_rig()
    await rig.command("draw", {"prompt": "**bold** @everyone"}, user=rig.bob)
    with pytest.raises(PermissionError, match="default_member_permissions"):
        await rig.command("drawbot-admin queue", user=rig.bob)  # Discord hides it from members
    stale = await rig.command("drawbot-admin queue", user=rig.bob, validate=False)
    assert stale.original.ephemeral and stale.original.content == ADMINS_ONLY

    queue = await rig.command("drawbot-admin queue", user=rig.alice)
    listing = queue.original.content
    assert queue.original.ephemeral and f"<@{rig.bob.id}>" in listing
    assert "\\*\\*bold\\*\\* @\u200beveryone" in listing and queue.original.pings.users == frozenset()

    ban = await rig.command("drawbot-admin ban", {"user": rig.bob}, user=rig.alice)
    assert f"<@{rig.bob.id}> is banned" in ban.original.content and ban.original.pings.users == frozenset()
    assert await rig.store.is_banned("discord", str(rig.bob.id))  # kept in the database across restarts
    refused = await rig.command("draw", {"prompt": "again"}, user=rig.bob)
    assert "blocked your account" in refused.original.content and len(rig.engine.jobs) == 1
    unban = await rig.command("drawbot-admin unban", {"user": rig.bob}, user=rig.alice)
    assert "may draw again" in unban.original.content
    assert not await rig.store.is_banned("discord", str(rig.bob.id))
    admin_ban = await rig.command("drawbot-admin ban", {"user": rig.alice}, user=rig.alice)
    assert "is an admin" in admin_ban.original.content
    assert not await rig.store.is_banned("discord", str(rig.alice.id))


async def test_an_error_inside_a_command_gets_a_friendly_private_answer(make_rig, caplog):
    rig = await make_rig()

    async def broken(user, conv):
        raise RuntimeError("boom")

    rig.core.usage = broken
    with caplog.at_level(logging.ERROR, logger="bot.adapters.discord"):
        inter = await rig.command("usage", user=rig.bob)
    assert "something went wrong" in inter.followups[-1].content and inter.followups[-1].ephemeral
    assert any("/usage failed" in r.getMessage() for r in caplog.records)


async def test_a_dev_guild_gets_the_commands_and_a_failed_sync_is_retried_at_the_next_start(make_rig, tmp_path,
                                                                                                caplog):
    rig = await make_rig()
    assert [s.guild_id for s in rig.fake.command_syncs] == [None]  # the rig's platform synced globally
    settings = rig.core.config.discord.model_copy(update={"dev_guild": rig.guild.id})

    async def start_and_stop() -> None:
        platform = DiscordPlatform(rig.core, settings, rig.fake.token, state_dir=tmp_path / "dev")
        try:
            await platform.login()
        finally:
            await platform.stop()

    rig.fake.fail_next("PUT /applications/{application_id}/guilds/{guild_id}/commands", status=403, code=50001,
                       message="Missing Access")
    with caplog.at_level(logging.ERROR):
        await start_and_stop()  # a failed sync is logged; the bot still starts
    assert any("could not register the slash commands" in r.getMessage() for r in caplog.records)
    assert rig.fake.registered_commands(rig.guild.id) == []
    await start_and_stop()
    await start_and_stop()
    assert [s.guild_id for s in rig.fake.command_syncs] == [None, rig.guild.id]  # retried once, then unchanged
    assert sorted(c["name"] for c in rig.fake.registered_commands(rig.guild.id)) == [
        "cancel", "draw", "drawbot-admin", "help", "history", "usage"]


# ----------------------------------------------------------------------------------------------- buttons


async def test_button_presses_are_acknowledged_then_judged_by_the_core(make_rig):
    rig = await make_rig()
    first = await rig.command("draw", {"prompt": "a lighthouse"}, user=rig.alice)
    [record] = await rig.store.history("discord", str(rig.alice.id))
    conv = rig.platform.conversation(record.reply_ref["conv"])
    await conv.send_picture(Picture(PNG, "a lighthouse", record.id, [Button("🎲 New seed", "reroll", record.id)]))
    picture = first.followups[-1]
    assert picture.custom_ids == [f"drawbot:reroll:{record.id}", f"drawbot:delete:{record.id}"]

    press = await rig.fake.press_button(picture, f"drawbot:reroll:{record.id}", user=rig.bob)
    await rig.platform.handlers.on_job_button(rig.interaction(press), "reroll", record.id)
    assert press.callback_type == 6 and press.followups[0].ephemeral
    assert press.followups[0].content.startswith("Only the person who asked")

    press = await rig.fake.press_button(picture, f"drawbot:reroll:{record.id}", user=rig.alice)
    await rig.platform.handlers.on_job_button(rig.interaction(press), "reroll", record.id)
    assert press.callback_type == 6 and len(rig.engine.jobs) == 2
    [queued] = press.followups  # the new job's queue message; no extra "Queued!" note
    assert queued.content.startswith("Got it") and not queued.ephemeral

    press = await rig.fake.press_button(picture, f"drawbot:delete:{record.id}", user=rig.alice)
    await rig.platform.handlers.on_job_button(rig.interaction(press), "delete", record.id)
    assert picture.deleted and press.followups == []


async def test_job_buttons_round_trip_through_their_custom_id():
    view = job_view([Button("🎲 New seed", "reroll", "abc123"), Button("x", "png", "abc123"),
                     Button("🔁 1", "again", "f" * 32)])
    custom_ids = [item.item.custom_id for item in view.children]
    assert custom_ids == ["drawbot:reroll:abc123", f"drawbot:again:{'f' * 32}"]  # png is not a Discord button
    match = JobButton.__discord_ui_compiled_template__.fullmatch(custom_ids[1])
    rebuilt = await JobButton.from_custom_id(None, discord.ui.Button(label="🔁 1", custom_id=custom_ids[1]), match)
    assert (rebuilt.action, rebuilt.job_id, rebuilt.item.label) == ("again", "f" * 32, "🔁 1")
    assert JobButton.__discord_ui_compiled_template__.fullmatch("drawbot:nuke:abc") is None
    assert job_view([]) is None


# ----------------------------------------------------------------------------------------------- conversations


async def test_conversation_ref_round_trips_and_bad_refs_are_refused(make_rig):
    rig = await make_rig()
    ref = ConversationRef(rig.fake.application_id, "tok", rig.channel.id, rig.guild.id, rig.bob.id, 123.5)
    rebuilt = rig.platform.conversation(ref.to_dict())
    assert rebuilt.ref() == ref.to_dict() and ConversationRef.from_dict(ref.to_dict()) == ref
    for bad in ({}, {"chat": "console"}, {**ref.to_dict(), "channel_id": "general"}):
        with pytest.raises(ValueError, match="not a Discord conversation"):
            rig.platform.conversation(bad)


async def test_an_old_conversation_delivers_in_the_channel_mentioning_only_the_requester(make_rig):
    rig = await make_rig()
    old = ConversationRef(rig.fake.application_id, "long-dead-token", rig.channel.id, rig.guild.id, rig.bob.id,
                          time.time() - TOKEN_SAFE_SECONDS - 1)
    conv = rig.platform.conversation(old.to_dict())
    picture = Picture(PNG, "caption @everyone", "a" * 32, [Button("🎲 New seed", "reroll", "a" * 32)],
                      mention_user=str(rig.bob.id))
    message_id = await conv.send_picture(picture)
    [message] = rig.fake.messages(rig.channel)
    assert message_id == f"c:{message.id}" and message.kind == "channel"
    assert message.content == f"<@{rig.bob.id}> here is your picture:"
    assert message.allowed_mentions == {"parse": [], "users": [rig.bob.id]}
    assert message.pings.users == {rig.bob.id} and not message.pings.everyone
    assert message.attachments[0].data == PNG and message.embeds[0]["description"] == "caption @everyone"
    assert rig.fake.calls_to("POST /webhooks/{application_id}/{token}") == []  # no doomed attempt first
    await conv.edit_text(message_id, "edited")
    assert message.content == "edited" and message.pings.users == frozenset()


async def test_a_token_that_died_is_noticed_once_then_the_channel_is_used(make_rig):
    rig = await make_rig()
    inter = await rig.command("draw", {"prompt": "slow"}, user=rig.bob)
    [record] = await rig.store.history("discord", str(rig.bob.id))
    conv = rig.platform.conversation(record.reply_ref["conv"])
    rig.fake.advance(TOKEN_LIFETIME_S + 1)
    first = await conv.send_text("one")
    second = await conv.send_text("two")
    assert first.startswith("c:") and second.startswith("c:")
    assert [c.error_code for c in inter.rejected_calls] == [50027]  # tried once, then straight to the channel
    await conv.edit_text(f"w:{inter.original.id}", "progress via the channel")
    assert inter.original.content == "progress via the channel"


async def test_a_private_reply_never_falls_back_to_the_public_channel(make_rig):
    rig = await make_rig()
    ref = ConversationRef(rig.fake.application_id, "dead", rig.channel.id, rig.guild.id, rig.bob.id,
                          time.time() - TOKEN_SAFE_SECONDS - 1, ephemeral=True)
    conv = rig.platform.conversation(ref.to_dict())
    with pytest.raises(TokenExpired):
        await conv.send_text("your usage")
    await conv.edit_text("w:123", "quietly skipped")
    assert rig.fake.messages(rig.channel) == []


@pytest.mark.parametrize("spoiler, as_file, embedded", [(False, False, True), (True, False, False),
                                                         (False, True, False)])
async def test_spoiler_and_file_pictures_stay_plain_attachments(make_rig, spoiler, as_file, embedded):
    rig = await make_rig()
    inter = await rig.command("draw", {"prompt": "x"}, user=rig.bob)
    [record] = await rig.store.history("discord", str(rig.bob.id))
    conv = rig.platform.conversation(record.reply_ref["conv"])
    await conv.send_picture(Picture(PNG, "cap", record.id, spoiler=spoiler, as_file=as_file))
    message = inter.followups[-1]
    [attachment] = message.attachments
    assert attachment.spoiler == spoiler and attachment.filename.endswith(".png")
    assert ("image" in message.embeds[0]) == embedded


# ----------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("text, shown", [
    ("@everyone and @here", "@\u200beveryone and @\u200bhere"),
    ("<@123456789012345678> <@&123456789012345678>", "<@\u200b123456789012345678> <@\u200b&123456789012345678>"),
    ("**bold** _it_ ~~s~~ ||x|| `c`", "\\*\\*bold\\*\\* \\_it\\_ \\~\\~s\\~\\~ \\|\\|x\\|\\| \\`c\\`"),
    ("# title\n> quote\n- item\n1. first", "\\# title\n\\> quote\n\\- item\n1\\. first"),
    ("  # indented\n\t> quoted", "  \\# indented\n\t\\> quoted"),
    ("[link](https://example.com)", "\\[link](https://example.com)"),
    ("🦊 émoji ñ 狐", "🦊 émoji ñ 狐"),
])
def test_markdown_escape_shows_text_as_typed(text, shown):
    assert DiscordMarkdown().escape(text) == shown


def test_markdown_code_and_bold():
    m = DiscordMarkdown()
    assert m.code("42") == "`42`" and m.code("a`b") == "`aˋb`" and m.code("") == ""
    assert m.bold("Your *last* pictures") == "**Your \\*last\\* pictures**"


def test_discord_py_talks_to_the_configured_endpoints(discord_urls, caplog):
    defaults = DiscordSettings()
    with caplog.at_level(logging.INFO, logger="bot.adapters.discord.platform"):
        use_endpoints(defaults)
    assert discord.http.Route.BASE == "https://discord.com/api/v10"
    assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"
    assert not caplog.records  # Discord's own endpoints go unmentioned
    with caplog.at_level(logging.INFO, logger="bot.adapters.discord.platform"):
        use_endpoints(DiscordSettings(api_base_url="http://127.0.0.1:4321/api/v10/",
                                      gateway_url="ws://127.0.0.1:4321/gateway"))
    assert discord.http.Route.BASE == "http://127.0.0.1:4321/api/v10"
    assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:4321/gateway"
    assert any("127.0.0.1:4321" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("key", "value"), [("api_base_url", "discord.com/api/v10"),
                                            ("api_base_url", "wss://gateway.discord.gg/"),
                                            ("gateway_url", "https://discord.com/api/v10"),
                                            ("gateway_url", "ws://")])
def test_an_endpoint_that_is_not_a_url_of_its_kind_is_refused_at_start_up(tmp_path, key, value):
    path = tmp_path / "config.toml"
    path.write_text(f'[discord]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError, match=rf"\[discord\].{key}.*should be a URL starting with"):
        load_config(path)


def test_command_hash_changes_only_with_the_command_set(tmp_path):
    def digest(**changes) -> str:
        settings = dict(min_steps=1, max_steps=50, default_steps=20, max_prompt_chars=1000, allow_dms=True)
        settings.update(changes)
        client = discord.Client(intents=discord.Intents.none())
        return payload_hash(command_payload(build_tree(client, None, CommandSettings(**settings))))

    assert digest() == digest()
    assert len({digest(), digest(max_steps=40), digest(allow_dms=False), digest(max_prompt_chars=500)}) == 4
    state = SyncState(tmp_path / "state" / "discord-commands.json")
    assert state.get("1/global") is None
    state.put("1/global", "abc")
    state.put("1/guild/2", "def")
    assert (state.get("1/global"), state.get("1/guild/2")) == ("abc", "def")
    state.path.write_text("{not json")
    assert state.get("1/global") is None  # a damaged file means: sync again
