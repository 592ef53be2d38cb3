"""End-to-end tests of the fake Discord server with the real discord.py 2.7 client (and raw protocol checks)."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands

from tests.fakes.discord_api import no_leaked_tasks  # noqa: F401 - autouse fixture
from tests.fakes.discord_api import (
    ACK_WINDOW_S,
    ClientCrashed,
    TOKEN_LIFETIME_S,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    FakeUpload,
    FakeUser,
    Intent,
    Perm,
    running_client,
)

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x20\x08\x02\x00\x00\x00" + bytes(range(256))


@dataclass
class World:
    fake: FakeDiscord
    guild: FakeGuild
    channel: FakeChannel
    alice: FakeUser  # admin (guild owner)
    bob: FakeUser  # plain member



@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        guild = fake.add_guild("Art Club", owner=alice, channels=("general", "nsfw-art"))
        bob = fake.add_user("bob")
        fake.add_member(guild, bob)
        monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
        yield World(fake, guild, guild.channel("general"), alice, bob)


class RecordingClient(discord.Client):
    """A client whose callbacks write what they saw into ``seen`` (no module-level state)."""

    def __init__(self, *, members: bool = True, dynamic_items: tuple[type, ...] = (),
                 persistent_views: tuple[discord.ui.View, ...] = (), **options) -> None:
        intents = discord.Intents.default()
        intents.members = members
        super().__init__(intents=intents, guild_ready_timeout=0.05, **options)
        self.tree = app_commands.CommandTree(self)
        self.seen: list[tuple] = []
        self.errors: list[Exception] = []
        self.ready_count = 0
        self._dynamic_items = dynamic_items
        self._persistent_views = persistent_views

        @self.tree.error
        async def record_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            self.errors.append(getattr(error, "original", error))

    async def setup_hook(self) -> None:
        self.add_dynamic_items(*self._dynamic_items)
        for view in self._persistent_views:
            self.add_view(view)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py sleeps 5 s before every re-IDENTIFY; not needed against a local fake."""

    async def on_ready(self) -> None:
        self.ready_count += 1

    async def on_resumed(self) -> None:
        self.seen.append(("resumed",))


async def test_login_ready_and_guild_create(world: World) -> None:
    fake = world.fake
    client = RecordingClient()
    async with running_client(client, fake):
        assert client.user is not None and client.user.id == fake.bot.id
        assert client.application_id == fake.application_id
        guild = client.get_guild(world.guild.id)
        assert guild is not None and guild.name == "Art Club"
        assert sorted(c.name for c in guild.text_channels) == ["general", "nsfw-art"]
        assert {m.name for m in guild.members} == {"alice", "bob", "drawbot"}
        assert guild.owner_id == world.alice.id
        assert guild.me.guild_permissions.mention_everyone  # the bot role's permissions arrived
        assert guild.get_member(world.alice.id).guild_permissions.administrator
        assert fake.identify_count == 1 and fake.intents == client.intents.value
        # discord.py heartbeats right after HELLO; the ACK gives it a finite latency.
        await fake.wait_for(lambda: math.isfinite(client.latency))
        assert fake.heartbeat_count >= 1
        assert [c.route for c in fake.calls[:2]] == ["GET /users/@me", "GET /oauth2/applications/@me"]
        assert not fake.unhandled


async def test_without_members_intent_guild_create_carries_only_the_bot(world: World) -> None:
    client = RecordingClient(members=False)
    async with running_client(client, world.fake):
        guild = client.get_guild(world.guild.id)
        assert [m.id for m in guild.members] == [world.fake.bot.id]
        assert world.fake.intents is not None and not world.fake.intents & Intent.GUILD_MEMBERS


async def test_bad_token_is_a_login_failure(world: World) -> None:
    client = RecordingClient()
    try:
        with pytest.raises(discord.LoginFailure):
            await client.start("not-the-token")
    finally:
        await client.close()
    assert world.fake.calls[0].status == 401


async def test_tree_sync_is_recorded_and_ids_survive_resync(world: World) -> None:
    client = RecordingClient()

    @client.tree.command(description="Draw a picture")
    async def draw(interaction: discord.Interaction, prompt: str) -> None: ...

    async with running_client(client, world.fake):
        first = await client.tree.sync()
        again = await client.tree.sync()
        guild_cmds = await client.tree.sync(guild=discord.Object(world.guild.id))

        @client.tree.command(description="Show your history")
        async def history(interaction: discord.Interaction) -> None: ...

        draw.description = "Draw a picture with Flux"
        third = await client.tree.sync()

    syncs = world.fake.command_syncs
    assert [s.guild_id for s in syncs] == [None, None, world.guild.id, None]
    assert (syncs[0].created, syncs[1].unchanged, syncs[2].created) == (["draw"], ["draw"], [])
    assert (syncs[3].created, syncs[3].updated) == (["history"], ["draw"])
    assert first[0].id == again[0].id == next(c.id for c in third if c.name == "draw")
    assert guild_cmds == []
    sent_option = syncs[0].commands[0]["options"][0]
    assert (sent_option["name"], sent_option["type"], sent_option["required"]) == ("prompt", 3, True)
    assert [c["name"] for c in world.fake.registered_commands()] == ["draw", "history"]


async def test_slash_defer_then_followup_with_file_and_view(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Draw a picture")
    async def draw(interaction: discord.Interaction, prompt: str, steps: app_commands.Range[int, 1, 50] = 20) -> None:
        await interaction.response.defer(thinking=True)
        view = discord.ui.View(timeout=None)
        view.add_item(discord.ui.Button(label="Reroll", custom_id="reroll:7"))
        sent = await interaction.followup.send(
            f"**{prompt}** ({steps} steps)", file=discord.File(io.BytesIO(PNG), "image.png"), view=view,
            embed=discord.Embed(title="seed 7"), allowed_mentions=discord.AllowedMentions.none(), wait=True)
        # The attachment URL points at the fake's CDN, so discord.py can read the bytes back.
        client.seen.append((type(interaction.user), steps, await sent.attachments[0].read()))

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command("draw", {"prompt": "a red fox", "steps": 12}, user=world.bob)
        await fake.wait_for(lambda: client.seen)

    assert client.errors == []
    assert client.seen == [(discord.Member, 12, PNG)]
    assert inter.callback_type == 5 and inter.callback_delay < ACK_WINDOW_S
    [callback] = inter.calls[:1]
    assert callback.query == {"with_response": "1"} and callback.json == {"type": 5}
    assert callback.response["resource"] == {"type": 5}
    assert callback.response["interaction"]["response_message_loading"] is True
    assert inter.payload["data"]["options"] == [{"name": "prompt", "type": 3, "value": "a red fox"},
                                                {"name": "steps", "type": 4, "value": 12}]
    # After a "thinking" defer the first follow-up replaces the loading message: it is the original response.
    [followup] = inter.followups
    assert followup is inter.original and not followup.loading and followup.edit_count == 1
    assert followup.content == "**a red fox** (12 steps)"
    assert followup.embeds[0]["title"] == "seed 7"
    assert followup.custom_ids == ["reroll:7"]
    assert followup.allowed_mentions == {"parse": []}
    [att] = followup.attachments
    assert (att.filename, att.data, att.content_type, att.size) == ("image.png", PNG, "image/png", len(PNG))
    [webhook_call] = fake.calls_to("POST /webhooks/{application_id}/{token}")
    assert [(f.field, f.filename, f.data) for f in webhook_call.files] == [("files[0]", "image.png", PNG)]
    assert webhook_call.json["components"][0]["components"][0]["custom_id"] == "reroll:7"


async def test_progress_edits_keep_history_and_later_followups_are_new_messages(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Draw a picture")
    async def draw(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer(thinking=True)
        for text in ("queued #2", "drawing 50%", "done"):
            await interaction.edit_original_response(content=text)
        await interaction.followup.send("extra", ephemeral=True)
        client.seen.append("finished")

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command("draw", {"prompt": "x"}, user=world.alice)
        await fake.wait_for(lambda: client.seen)

    original = inter.original
    assert [v.content for v in original.versions] == ["", "queued #2", "drawing 50%", "done"]
    assert original.versions[0].flags & 128 and not original.loading and original.type == 20
    assert [v.at for v in original.versions] == sorted(v.at for v in original.versions)
    [extra] = inter.followups
    assert extra is not original and extra.ephemeral and extra.kind == "followup"
    assert fake.messages(world.channel) == [original, extra]


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"reroll:(?P<job>\d+)"):
    """State lives in the custom_id, so it works for messages sent before a restart."""

    def __init__(self, job: int) -> None:
        super().__init__(discord.ui.Button(label="Reroll", custom_id=f"reroll:{job}"))
        self.job = job

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match) -> RerollButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.client.seen.append(("reroll", self.job, interaction.user.id))
        await interaction.response.send_message(f"rerolling job {self.job}", ephemeral=True)


class JobView(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Delete", custom_id="job:delete", style=discord.ButtonStyle.danger)
    async def delete(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        interaction.client.seen.append(("delete", interaction.user.id))
        await interaction.response.edit_message(content="(deleted)", view=None)


async def test_button_presses_reach_dynamic_item_and_persistent_view_after_restart(world: World) -> None:
    fake = world.fake
    first = RecordingClient()
    async with running_client(first, fake):
        view = JobView()
        view.add_item(RerollButton(42))
        await first.get_channel(world.channel.id).send("job 42 done", view=view)
    [message] = fake.messages(world.channel)

    restarted = RecordingClient(dynamic_items=(RerollButton,), persistent_views=(JobView(),))
    async with running_client(restarted, fake):
        reroll = await fake.press_button(message, "reroll:42", user=world.bob)
        await fake.wait_for(lambda: reroll.acknowledged)
        delete = await fake.press_button(message, "job:delete", user=world.alice)
        await fake.wait_for(lambda: delete.acknowledged)

    assert restarted.seen == [("reroll", 42, world.bob.id), ("delete", world.alice.id)]
    assert reroll.payload["data"] == {"custom_id": "reroll:42", "component_type": 2}
    assert reroll.payload["message"]["id"] == str(message.id)
    assert reroll.callback_type == 4 and reroll.original.ephemeral
    assert reroll.original.content == "rerolling job 42"
    assert delete.callback_type == 7 and delete.original is message
    assert [v.content for v in message.versions] == ["job 42 done", "(deleted)"]
    assert message.components == []
    with pytest.raises(LookupError):
        await fake.press_button(message, "reroll:42", user=world.bob)  # the button is gone now


async def test_first_response_after_three_seconds_is_unknown_interaction(world: World) -> None:
    fake = world.fake
    client = RecordingClient()
    gate = asyncio.Event()

    @client.tree.command(description="Slow")
    async def slow(interaction: discord.Interaction) -> None:
        await gate.wait()
        await interaction.response.defer(thinking=True)

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command("slow", user=world.alice)
        fake.advance(ACK_WINDOW_S + 0.5)
        gate.set()
        await fake.wait_for(lambda: client.errors)

    [error] = client.errors
    assert isinstance(error, discord.NotFound) and (error.status, error.code) == (404, 10062)
    assert not inter.acknowledged and inter.original is None
    [rejected] = inter.rejected_calls
    assert rejected.route == "POST /interactions/{interaction_id}/{token}/callback" and rejected.error_code == 10062


async def test_token_dies_after_fifteen_minutes_and_channel_fallback_still_delivers(world: World) -> None:
    fake = world.fake
    client = RecordingClient()
    gate = asyncio.Event()

    @client.tree.command(description="Draw")
    async def draw(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="queued #9")
        await gate.wait()
        try:
            await interaction.followup.send("your image", file=discord.File(io.BytesIO(PNG), "late.png"))
        except discord.HTTPException as exc:
            client.seen.append((exc.status, exc.code))
            await interaction.channel.send(
                f"{interaction.user.mention} your image", file=discord.File(io.BytesIO(PNG), "late.png"),
                allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=[interaction.user]))
            client.seen.append("fallback")

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command("draw", user=world.bob)
        await fake.wait_for(lambda: inter.original is not None and inter.original.content == "queued #9")
        fake.advance(TOKEN_LIFETIME_S + 1)
        gate.set()
        await fake.wait_for(lambda: "fallback" in client.seen)

    assert client.seen == [(401, 50027), "fallback"]
    assert inter.followups == [] and inter.rejected_calls[0].error_code == 50027
    delivered = fake.messages(world.channel)[-1]
    assert delivered.kind == "channel" and delivered.attachments[0].data == PNG
    assert delivered.pings.users == {world.bob.id} and not delivered.pings.everyone


async def test_allowed_mentions_are_recorded_and_pings_computed(world: World) -> None:
    fake = world.fake
    client = RecordingClient()
    async with running_client(client, fake):
        channel = client.get_channel(world.channel.id)
        careless = await channel.send("@everyone look")
        careful = await channel.send("@everyone look", allowed_mentions=discord.AllowedMentions.none())
        users_only = discord.AllowedMentions(everyone=False, roles=False, users=True)
        user_only = await channel.send(f"@here <@{world.bob.id}>", allowed_mentions=users_only)

    sent = fake.messages(world.channel)
    assert [m.allowed_mentions for m in sent] == [
        None,
        {"parse": []},
        {"parse": ["users"], "replied_user": True},
    ]
    assert [m.pings.everyone for m in sent] == [True, False, False]
    assert sent[2].pings.users == {world.bob.id}
    # The real client sees the same thing Discord would report.
    assert (careless.mention_everyone, careful.mention_everyone, user_only.mention_everyone) == (True, False, False)
    assert [u.id for u in user_only.mentions] == [world.bob.id]


async def test_injected_429_is_retried_by_discord_py(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.followup.send("pong")
        client.seen.append("sent")

    async with running_client(client, fake):
        await client.tree.sync()
        fake.fail_next("POST /channels/{channel_id}/messages", retry_after=0.05)
        await client.get_channel(world.channel.id).send("hello")
        fake.fail_next("POST /webhooks/{application_id}/{token}", times=2, retry_after=0.02)
        await fake.slash_command("ping", user=world.alice)
        await fake.wait_for(lambda: client.seen)

    assert [c.status for c in fake.calls_to("POST /channels/{channel_id}/messages")] == [429, 200]
    assert [c.status for c in fake.calls_to("POST /webhooks/{application_id}/{token}")] == [429, 429, 200]
    assert [m.content for m in fake.messages(world.channel)] == ["hello", "pong"]
    with pytest.raises(ValueError, match="unknown route"):
        fake.fail_next("POST /channels/{id}/messages")


async def test_dm_slash_command(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Help")
    @app_commands.allowed_contexts(guilds=True, dms=True)
    async def help(interaction: discord.Interaction) -> None:
        client.seen.append((interaction.guild, type(interaction.user), type(interaction.channel),
                            interaction.context.dm_channel))
        await interaction.response.send_message("help text")

    @client.tree.command(description="Ban")
    @app_commands.guild_only()
    @app_commands.default_permissions(ban_members=True)
    async def ban(interaction: discord.Interaction, user: discord.User) -> None: ...

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command("help", user=world.bob, dm=True)
        await fake.wait_for(lambda: inter.acknowledged)
        with pytest.raises(PermissionError, match="not available in DMs"):
            await fake.slash_command("ban", {"user": world.alice}, user=world.alice, dm=True)
        with pytest.raises(PermissionError, match="default_member_permissions"):
            await fake.slash_command("ban", {"user": world.alice}, user=world.bob)

    assert client.seen == [(None, discord.User, discord.DMChannel, True)]
    assert "guild_id" not in inter.payload and inter.payload["user"]["id"] == str(world.bob.id)
    dm = fake.dm_channel(world.bob)
    assert inter.original.channel_id == dm.id and inter.original.guild_id is None
    assert fake.messages(dm)[0].content == "help text"


async def test_option_resolution_and_client_side_validation(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Edit an image")
    async def edit(interaction: discord.Interaction, image: discord.Attachment, target: discord.Member,
                   where: discord.TextChannel, strength: app_commands.Range[float, 0.0, 1.0] = 0.5) -> None:
        client.seen.append((await image.read(), image.filename, target.id, where.id, strength))
        await interaction.response.send_message("ok", ephemeral=True)

    async with running_client(client, fake):
        await client.tree.sync()
        inter = await fake.slash_command(
            "edit", {"image": FakeUpload("in.png", PNG), "target": world.bob, "where": world.channel,
                     "strength": 0.25}, user=world.alice)
        await fake.wait_for(lambda: client.seen)
        with pytest.raises(ValueError, match="above max_value"):
            await fake.slash_command("edit", {"image": FakeUpload("a.png", PNG), "target": world.bob,
                                              "where": world.channel, "strength": 2.0}, user=world.alice)
        with pytest.raises(ValueError, match="required options missing"):
            await fake.slash_command("edit", {"target": world.bob, "where": world.channel}, user=world.alice)
        with pytest.raises(LookupError, match="not registered"):
            await fake.slash_command("nope", user=world.alice)

    assert client.seen == [(PNG, "in.png", world.bob.id, world.channel.id, 0.25)]
    assert set(inter.payload["data"]["resolved"]) == {"attachments", "users", "members", "channels"}


async def test_modal_opened_from_button_and_submitted(world: World) -> None:
    fake = world.fake

    class PromptModal(discord.ui.Modal, title="Edit prompt"):
        prompt = discord.ui.TextInput(label="Prompt", custom_id="prompt", max_length=200)

        async def on_submit(self, interaction: discord.Interaction) -> None:
            interaction.client.seen.append(self.prompt.value)
            await interaction.response.edit_message(content=f"new prompt: {self.prompt.value}")

    class EditView(discord.ui.View):
        def __init__(self) -> None:
            super().__init__(timeout=None)

        @discord.ui.button(label="Edit", custom_id="job:edit")
        async def edit(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.send_modal(PromptModal())

    client = RecordingClient(persistent_views=(EditView(),))
    async with running_client(client, fake):
        await client.get_channel(world.channel.id).send("a cat", view=EditView())
        [message] = fake.messages(world.channel)
        press = await fake.press_button(message, "job:edit", user=world.alice)
        await fake.wait_for(lambda: press.modal)
        submit = await fake.submit_modal(press, {"prompt": "a dog"})
        await fake.wait_for(lambda: submit.acknowledged)

    assert press.callback_type == 9 and press.modal["title"] == "Edit prompt"
    assert client.seen == ["a dog"]
    assert submit.callback_type == 7 and message.content == "new prompt: a dog"


async def test_gateway_resume_replays_and_invalidation_forces_identify(world: World) -> None:
    fake = world.fake
    client = RecordingClient()

    @client.tree.command(description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with running_client(client, fake):
        await client.tree.sync()
        await fake.request_reconnect()
        await fake.wait_for(lambda: ("resumed",) in client.seen)
        assert (fake.identify_count, fake.resume_count) == (1, 1)

        fake.resume_policy = "invalidate"
        await fake.request_reconnect()
        await fake.wait_for(lambda: fake.identify_count == 2 and client.ready_count == 2)
        inter = await fake.slash_command("ping", user=world.bob)
        await fake.wait_for(lambda: inter.acknowledged)

    assert fake.resume_count == 2
    assert [f["op"] for f in fake.gateway_sent if f["op"] == 9] == [9]
    assert inter.original.content == "pong"


# ------------------------------------------------------------------------------------- raw protocol (no discord.py)


async def _recv(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def test_raw_gateway_handshake_and_rest_errors(world: World) -> None:
    fake = world.fake
    auth = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(fake.gateway_url) as ws:
            hello = await _recv(ws)
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == fake.heartbeat_interval_ms
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 1}})
            closing = await asyncio.wait_for(ws.receive(), 2)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4004

        async with http.ws_connect(fake.gateway_url) as ws:
            await _recv(ws)
            await ws.send_json({"op": 1, "d": None})
            assert (await _recv(ws))["op"] == 11
            await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": Intent.GUILDS | Intent.GUILD_MESSAGES}})
            ready, guild_create = await _recv(ws), await _recv(ws)
            assert (ready["t"], ready["s"], guild_create["t"], guild_create["s"]) == ("READY", 1, "GUILD_CREATE", 2)
            assert ready["d"]["application"]["id"] == str(fake.application_id)
            assert guild_create["d"]["members"][0]["flags"] == 0

            fake.set_commands([{"name": "draw", "description": "d", "options": []}])
            inter = await fake.slash_command("draw", user=world.alice)
            created = await _recv(ws)
            assert created["t"] == "INTERACTION_CREATE" and created["d"]["member"]["permissions"] == str(Perm.ALL)
            for key in ("app_permissions", "attachment_size_limit", "entitlements", "authorizing_integration_owners",
                        "context", "channel", "guild"):
                assert key in created["d"], key

            base = fake.api_base
            # A webhook call before the first callback is refused.
            async with http.post(f"{base}/webhooks/{fake.application_id}/{inter.token}", json={"content": "x"}) as r:
                assert r.status == 404 and (await r.json())["code"] == 10015
            callback = f"{base}/interactions/{inter.id}/{inter.token}/callback?with_response=1"
            async with http.post(callback, json={"type": 6}) as r:
                assert r.status == 400 and (await r.json())["code"] == 50035
            async with http.post(callback, json={"type": 4, "data": {"content": "hi"}}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "application/json"
                body = await r.json()
                assert body["resource"]["type"] == 4 and body["resource"]["message"]["content"] == "hi"
            assert (await _recv(ws))["t"] == "MESSAGE_CREATE"  # GUILD_MESSAGES intent was given
            async with http.post(callback, json={"type": 4, "data": {"content": "again"}}) as r:
                assert r.status == 400 and (await r.json())["code"] == 40060
            async with http.post(f"{base}/channels/{world.channel.id}/messages", json={"content": "x" * 2001},
                                 headers=auth) as r:
                assert r.status == 400 and "content" in (await r.json())["errors"]
            async with http.post(f"{base}/channels/{world.channel.id}/messages", json={}, headers=auth) as r:
                assert r.status == 400 and (await r.json())["code"] == 50006
            async with http.get(f"{base}/users/@me") as r:
                assert r.status == 401
            async with http.get(f"{base}/guilds/{world.guild.id}/bans", headers=auth) as r:
                assert r.status == 404
    assert [c.path for c in fake.unhandled] == [f"/guilds/{world.guild.id}/bans"]
    assert fake.server_errors == []


async def test_raw_resume_replays_events_missed_while_disconnected(world: World) -> None:
    fake = world.fake
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(fake.gateway_url) as ws:
            await _recv(ws)
            await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": Intent.GUILDS}})
            ready = await _recv(ws)
            await _recv(ws)  # GUILD_CREATE, s=2
        await fake.wait_for(lambda: not fake.connected)
        await fake.dispatch("TYPING_START", {"channel_id": str(world.channel.id)})  # buffered for the resume

        async with http.ws_connect(fake.gateway_url) as ws:
            await _recv(ws)
            await ws.send_json({"op": 6, "d": {"token": fake.token, "session_id": ready["d"]["session_id"], "seq": 2}})
            replayed, resumed = await _recv(ws), await _recv(ws)
    assert (replayed["t"], replayed["s"]) == ("TYPING_START", 3)
    assert (resumed["t"], resumed["s"]) == ("RESUMED", 4)


async def test_a_gateway_payload_the_client_cannot_parse_surfaces_as_client_crashed(world: World) -> None:
    client = RecordingClient()
    with pytest.raises(ClientCrashed):
        async with running_client(client, world.fake):
            await world.fake.dispatch("MESSAGE_CREATE", {"channel_id": str(world.channel.id)})  # no id, no author
            await world.fake.wait_for(lambda: False, timeout=2)
    assert client.is_closed()
