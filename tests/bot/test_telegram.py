"""The Telegram adapter end to end: the real python-telegram-bot Application long-polls the fake Bot API over a
loopback socket, with the real chat core, a real SQLite store and the real engine on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import io
import logging
import re
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from PIL import Image
from telegram.error import RetryAfter

from bot.chat import TokenRefused
from bot.adapters.telegram import (
    MAX_PHOTO_BYTES,
    TelegramHTML,
    TelegramPlatform,
    fit_text,
    retry_after_seconds,
    visible_text,
)
from bot.config import Config, LimitSettings, TelegramSettings
from bot.core import ChatCore
from bot.store import Store
from engine.worker import Engine
from tests.bot.conftest import make_config
from tests.fakes.telegram_api import CallbackQueryRecord, FakeChat, FakeTelegramServer, FakeUser, StoredMessage

BOT_NAME = "DrawTestBot"
ALICE = FakeUser(id=1001, first_name="Alice", username="alice")
BOB = FakeUser(id=1002, first_name="Bob", username="bobby")
ALICE_DM = FakeChat.private(ALICE)
GROUP = FakeChat.supergroup(42, title="Artists")
WAIT = 30.0  # seconds; generous for a loaded 2-core test machine, normally a second or two


@dataclass
class Harness:
    tg: FakeTelegramServer
    core: ChatCore
    platform: TelegramPlatform
    store: Store
    runner: asyncio.Task

    def replies_to(self, message: StoredMessage) -> list[StoredMessage]:
        """The bot's messages that quote `message`."""
        return [m for m in self.tg.bot_messages(message.chat_id)
                if (m.payload.get("reply_to_message") or {}).get("message_id") == message.message_id]

    async def reply_to(self, message: StoredMessage) -> StoredMessage:
        [reply] = await self.tg.wait_for(lambda: self.replies_to(message), WAIT, what=f"a reply to {message.text!r}")
        return reply

    async def settle(self) -> None:
        """Wait until every accepted picture is drawn and delivered."""
        await asyncio.wait_for(self.core.drain(), WAIT)


def settings_for(tg: FakeTelegramServer, *, private: float = 0.0, group: float = 1.0) -> TelegramSettings:
    """Pointed at the fake. The private-chat edit interval is below what the config allows (0.5 s), so a 4-step
    tiny picture shows each step; tests of the throttle use the configured values."""
    return TelegramSettings(api_base_url=tg.base_url, base_file_url=tg.base_file_url).model_copy(
        update={"progress_interval_private": private, "progress_interval_group": group})


@contextlib.asynccontextmanager
async def telegram_bot(
    tmp_path, tiny_settings, tiny_pipeline, *, privacy_mode: bool = True, max_photo_bytes: int = MAX_PHOTO_BYTES,
    seeds: list[int] | None = None, private_interval: float = 0.0, group_interval: float = 1.0, **limits,
) -> AsyncIterator[Harness]:
    """The whole bot, polling the fake, until the block ends."""
    async with FakeTelegramServer(bot_username=BOT_NAME, privacy_mode=privacy_mode,
                                  max_photo_bytes=max_photo_bytes) as tg:
        store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images")
        engine = Engine(lambda: tiny_pipeline)
        await engine.start()
        config = make_config(tiny_settings, **limits).model_copy(
            update={"telegram": settings_for(tg, private=private_interval, group=group_interval)})
        seed_iter = iter(seeds or [])
        core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01,
                        **({"random_seed": lambda: next(seed_iter)} if seeds else {}))
        platform = TelegramPlatform(core, config.telegram, tg.token, poll_timeout=1, max_photo_bytes=max_photo_bytes)
        core.add_platform(platform)
        runner = asyncio.create_task(platform.run())
        harness = Harness(tg, core, platform, store, runner)
        try:
            await tg.wait_for(lambda: tg.commands() or runner.done(), WAIT, what="the command menu")
            assert not runner.done(), runner.exception()
            yield harness
        finally:
            with contextlib.suppress(Exception):
                await harness.settle()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await engine.close(timeout=30)
            await store.close()


def stored_png(record) -> bytes:
    return record.image_path.read_bytes()


# ---- a picture from start to finish --------------------------------------------------------------------------------


async def test_draw_acks_shows_progress_and_replies_with_the_photo_and_seed(
        tmp_path, tiny_settings, tiny_pipeline, caplog):
    caplog.set_level(logging.INFO)
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, seeds=[1234]) as h:
        asked = h.tg.send_text(ALICE_DM, ALICE, "/draw a red fox --steps 4")
        [photo] = await h.tg.wait_for(lambda: h.tg.photos(ALICE.id), WAIT, what="the photo")
        await h.settle()
        ack = h.replies_to(asked)[0]
        await h.tg.wait_for(lambda: ack.text == "Done.", WAIT, what="the ack to end on Done.")
        [record] = await h.store.history("telegram", str(ALICE.id))

    texts = [v["text"] for v in ack.versions]
    assert texts[0].startswith(("Got it", "Starting"))
    assert any("step 4/4" in t for t in texts), texts  # every step shown: the private interval is 0 here
    assert photo.parse_mode == "HTML" and "seed <code>1234</code>" in photo.caption
    shown = h.tg.message(ALICE.id, photo.message_id)
    assert shown.caption.startswith("a red fox\nseed 1234 · 4 steps · 64×64")
    assert shown.payload["reply_to_message"]["message_id"] == asked.message_id
    assert record.status == "done" and record.delivered_at is not None and record.seed == 1234
    assert photo.data == stored_png(record) and photo.content_type == "image/png"  # small: the lossless PNG itself
    assert [b["callback_data"] for b in shown.buttons] == [f"reroll:{record.id}", f"again:{record.id}"]
    assert not h.tg.documents()
    assert "upload_photo" in {a.action for a in h.tg.chat_actions}
    assert [c["command"] for c in h.tg.commands()] == ["draw", "help", "history", "usage", "cancel"]
    assert not h.tg.calls_to("getUpdates")[0].params.get("drop_pending_updates")
    # httpx logs every request URL, which holds the token: the adapter redacts it.
    assert "HTTP Request" in caplog.text and h.tg.token not in caplog.text


async def test_each_bad_input_gets_an_explanation_and_no_photo(tmp_path, tiny_settings, tiny_pipeline):
    bad = {
        "/draw": "what to draw",
        "/draw a fox --steps 0": "steps",
        "/draw a fox --steps 1000000000": "steps",
        "/draw a fox --seed -5": "seed",
        f"/draw a fox --seed {2**40}": "seed",
        "/draw a fox --wat 3": "--wat",
        "/draw a <fox> --steps <i>&": "“<i>&”",  # the explanation echoes user text: it must be escaped
        "/draw " + "x" * 1500: "long",
    }
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.inject_retry_after("sendMessage", retry_after=1)  # the first answer is flood-limited once
        asked = {text: h.tg.send_text(ALICE_DM, ALICE, text) for text in bad}
        replies = {text: await h.reply_to(message) for text, message in asked.items()}
        await h.settle()
        assert await h.store.history("telegram", str(ALICE.id)) == []

    for text, expected in bad.items():
        reply = replies[text]
        assert expected.lower() in reply.text.lower() and "/draw" in reply.text, (text, reply.text)
        assert reply.edit_count == 0
    assert len(h.tg.bot_messages(ALICE.id)) == len(bad)
    assert not h.tg.photos() and not h.tg.documents()
    flooded, *sends = h.tg.calls_to("sendMessage")
    assert flooded.http_status == 429 and all(c.ok for c in sends)  # HTML valid everywhere
    assert sends[0].at - flooded.at >= 1.0 and h.tg.count_served(429) == 1  # waited out retry_after


# ---- groups --------------------------------------------------------------------------------------------------------


async def test_group_draw_addressed_to_the_bot_works_and_other_bots_commands_are_ignored(
        tmp_path, tiny_settings, tiny_pipeline):
    # Privacy mode off (e.g. the bot is an admin): the bot sees every message and must pick out its own.
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, privacy_mode=False, group_interval=1.0) as h:
        other = h.tg.send_text(GROUP, BOB, "/draw@OtherBot a cat")
        chatter = h.tg.send_text(GROUP, BOB, "nice weather")
        unknown = h.tg.send_text(GROUP, BOB, "/frobnicate@DrawTestBot")
        asked = h.tg.send_text(GROUP, BOB, f"/draw@{BOT_NAME} a cat 5 12")
        [photo] = await h.tg.wait_for(lambda: h.tg.photos(GROUP.id), WAIT, what="the group photo")
        await h.settle()
        ack = h.replies_to(asked)[0]
        await h.tg.wait_for(lambda: ack.text == "Done.", WAIT)
        [record] = await h.store.history("telegram", str(BOB.id))

    assert h.replies_to(other) == [] and h.replies_to(chatter) == [] and h.replies_to(unknown) == []
    assert "seed <code>5</code> · 12 steps" in photo.caption
    assert h.tg.message(GROUP.id, photo.message_id).payload["reply_to_message"]["message_id"] == asked.message_id
    assert record.chat_id == str(GROUP.id) and record.delivered_at is not None
    # Progress edits in groups keep the configured group interval (Telegram allows ~20 messages a minute there).
    edits = [c.at for c in h.tg.calls_to("editMessageText") if "step" in c.params["text"]]
    assert all(b - a >= 0.8 for a, b in zip(edits, edits[1:])), edits  # 1 s, less network jitter


async def test_reroll_button_by_the_owner_draws_a_new_seed_and_a_stranger_is_refused(
        tmp_path, tiny_settings, tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, seeds=[11, 22]) as h:
        h.tg.send_text(GROUP, ALICE, f"/draw@{BOT_NAME} a lighthouse")
        [first] = await h.tg.wait_for(lambda: h.tg.photos(GROUP.id), WAIT)
        await h.settle()
        picture = h.tg.message(GROUP.id, first.message_id)
        [reroll] = [b["callback_data"] for b in picture.buttons if b["callback_data"].startswith("reroll:")]

        stranger = h.tg.press_button(picture, BOB, reroll)
        await h.tg.wait_for(lambda: stranger.answered, WAIT)
        owner = h.tg.press_button(picture, ALICE, reroll)
        await h.tg.wait_for(lambda: owner.answered, WAIT)
        [_, second] = await h.tg.wait_for(lambda: len(h.tg.photos(GROUP.id)) == 2 and h.tg.photos(GROUP.id), WAIT)
        await h.settle()
        assert await h.store.history("telegram", str(BOB.id)) == []
        assert len(await h.store.history("telegram", str(ALICE.id))) == 2

    assert stranger.answer["show_alert"] is True and "Only the person who asked" in stranger.answer["text"]
    assert owner.answer.get("show_alert") is not True and owner.answer["text"] == "Queued!"
    assert "seed <code>11</code>" in first.caption and "seed <code>22</code>" in second.caption
    # The new picture answers the old one; nothing was said to the stranger in the group.
    assert h.tg.message(GROUP.id, second.message_id).payload["reply_to_message"]["message_id"] == first.message_id
    assert not any("Only the person" in (m.text or "") for m in h.tg.bot_messages(GROUP.id))


async def test_unknown_and_expired_buttons_never_break_the_bot(tmp_path, tiny_settings, tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        greeting = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/start"))
        # A button from an old version of the bot (unknown action), then one Telegram no longer accepts answers for.
        old = CallbackQueryRecord(id="777", user=ALICE, chat_id=ALICE.id, message_id=greeting.message_id,
                                  data="zap:1", chat_instance=h.tg.chat_instance(ALICE.id))
        h.tg.callback_queries[old.id] = old
        for query_id, data in (("777", "zap:1"), ("778", f"reroll:{'0' * 32}")):
            h.tg.add_update({"callback_query": {"id": query_id, "from": ALICE.to_api(), "data": data,
                                                "message": greeting.payload,
                                                "chat_instance": h.tg.chat_instance(ALICE.id)}})
        await h.tg.wait_for(lambda: old.answered, WAIT)
        await h.tg.wait_for_call("answerCallbackQuery", 2, WAIT)
        help_reply = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/help"))
        assert not h.runner.done()

    assert old.answer == {"text": "That button is no longer valid.", "show_alert": True}
    assert not h.tg.calls_to("answerCallbackQuery")[1].ok  # "query is too old": logged, not fatal
    assert "/draw" in help_reply.text


# ---- flood control -------------------------------------------------------------------------------------------------


async def test_429_on_progress_edits_backs_off_and_the_picture_is_still_delivered(
        tmp_path, tiny_settings, tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.inject_retry_after("editMessageText", retry_after=1)
        asked = h.tg.send_text(ALICE_DM, ALICE, "/draw a storm --steps 6")
        await h.tg.wait_for(lambda: h.tg.photos(ALICE.id), WAIT, what="the photo despite the flood")
        await h.settle()
        ack = h.replies_to(asked)[0]
        await h.tg.wait_for(lambda: ack.text == "Done.", WAIT, what="the held edit after the quiet window")
        [record] = await h.store.history("telegram", str(ALICE.id))

    edits = h.tg.calls_to("editMessageText")
    flooded = [c for c in edits if c.http_status == 429]
    assert len(flooded) == 1 and h.tg.count_served(429) == 1  # nothing came back inside the flood window
    after = [c.at for c in edits if c.at > flooded[0].at]
    assert after and min(after) - flooded[0].at >= 1.0
    # The wider interval after a 429 is the core's pacer's (tests/bot/test_pacing.py); the adapter only reports it.
    assert len(h.tg.photos(ALICE.id)) == 1 and record.delivered_at is not None


async def test_a_flood_of_twenty_messages_is_all_answered_with_limits_applied(tmp_path, tiny_settings,
                                                                              tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, cooldown_seconds=0, max_active_per_user=2) as h:
        # Long pictures so the first two are still drawing while the other eighteen arrive.
        asked = [h.tg.send_text(ALICE_DM, ALICE, f"/draw flood {n} --steps 50") for n in range(20)]
        replies = [await h.reply_to(message) for message in asked]
        assert not h.runner.done()
        cancelled = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/cancel"))
        help_reply = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/help"))
        await h.settle()
        rows = await h.store.history("telegram", str(ALICE.id), limit=50)

    acks = [r for r in replies if r.versions[0]["text"].startswith(("Got it", "Starting"))]
    refusals = [r for r in replies if r not in acks]
    assert len(acks) == 2 and len(refusals) == 18 and len(rows) == 2
    assert all("at most 2 at once" in r.text for r in refusals), refusals[0].text
    assert re.fullmatch(r"Cancelled [12] pictures?\.|You have nothing waiting or drawing\.", cancelled.text)
    assert "/draw" in help_reply.text


# ---- files, escaping, delivery -------------------------------------------------------------------------------------


async def test_png_flag_also_sends_the_lossless_file(tmp_path, tiny_settings, tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.inject_network_failure("sendDocument", count=1)  # the photo went out, the file did not: retried
        h.tg.send_text(ALICE_DM, ALICE, "/draw a fox --png")
        await h.tg.wait_for(lambda: h.tg.documents(ALICE.id), WAIT)
        await h.settle()
        [record] = await h.store.history("telegram", str(ALICE.id))

    [photo], [document] = h.tg.photos(ALICE.id), h.tg.documents(ALICE.id)
    assert "seed <code>" in photo.caption and document.caption is None
    assert document.data == stored_png(record) and document.filename == f"drawbot-{record.id}.png"
    assert document.content_type == "image/png"
    assert len(h.tg.calls_to("sendPhoto")) == 1 and len(h.tg.calls_to("sendDocument")) == 2  # no second photo
    assert record.delivered_at is not None and record.delivery_attempts == 1


async def test_a_picture_over_the_photo_limit_goes_as_jpeg_photo_plus_png_file(tmp_path, tiny_settings,
                                                                              tiny_pipeline):
    limit = 4000  # the 64×64 noise PNG is about 11 kB
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, max_photo_bytes=limit) as h:
        h.tg.send_text(ALICE_DM, ALICE, "/draw a fox")
        await h.tg.wait_for(lambda: h.tg.documents(ALICE.id), WAIT)
        await h.settle()
        [record] = await h.store.history("telegram", str(ALICE.id))

    [photo], [document] = h.tg.photos(ALICE.id), h.tg.documents(ALICE.id)
    assert len(stored_png(record)) > limit
    assert len(photo.data) <= limit and Image.open(io.BytesIO(photo.data)).format == "JPEG"
    assert document.data == stored_png(record)


async def test_prompt_with_html_mentions_and_emoji_is_echoed_escaped(tmp_path, tiny_settings, tiny_pipeline):
    prompt = '<b>bold?</b> <i>unclosed & "quoted" @everyone 🦊 <script>'
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.send_text(ALICE_DM, ALICE, f"/draw {prompt} --seed 7")
        [photo] = await h.tg.wait_for(lambda: h.tg.photos(ALICE.id), WAIT)
        await h.settle()
        history = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/history"))

    # The fake parses HTML like Telegram: unescaped tags would be refused or swallowed.
    assert h.tg.message(ALICE.id, photo.message_id).caption.startswith(prompt + "\nseed 7")
    assert prompt in history.text and "seed 7" in history.text
    assert [b["callback_data"].split(":")[0] for b in history.buttons] == ["again"]
    assert all(c.ok for c in h.tg.calls if c.method != "getUpdates")


async def test_network_failure_while_sending_the_photo_is_retried_and_delivered_once(
        tmp_path, tiny_settings, tiny_pipeline):
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.inject_network_failure("sendPhoto", count=1)
        h.tg.send_text(ALICE_DM, ALICE, "/draw a flaky fox")
        await h.tg.wait_for(lambda: h.tg.photos(ALICE.id), WAIT)
        await h.settle()
        [record] = await h.store.history("telegram", str(ALICE.id))

    assert len(h.tg.calls_to("sendPhoto")) == 2 and len(h.tg.photos(ALICE.id)) == 1
    assert record.delivery_attempts == 1 and record.delivered_at is not None


async def test_handler_errors_are_logged_without_the_token_or_the_prompt(tmp_path, tiny_settings, tiny_pipeline,
                                                                         caplog):
    caplog.set_level(logging.INFO)
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline) as h:
        h.tg.inject_error("sendMessage", error_code=403, description="Forbidden: bot was blocked by the user")
        h.tg.send_text(ALICE_DM, ALICE, "/draw my secret words --wat")
        await h.tg.wait_for(lambda: "telegram update" in caplog.text, WAIT, what="the error to be logged")
        help_reply = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, "/help"))

    assert "Forbidden" in caplog.text
    assert "secret words" not in caplog.text and h.tg.token not in caplog.text
    assert "/draw" in help_reply.text


async def test_after_a_restart_the_picture_reaches_the_same_chat(tmp_path, tiny_settings, tiny_pipeline):
    async with FakeTelegramServer(bot_username=BOT_NAME) as tg:
        store = await Store.open(tmp_path / "db.sqlite3", tmp_path / "images")
        config = Config(engine=tiny_settings, limits=LimitSettings(cooldown_seconds=0),
                        telegram=settings_for(tg))

        async def life(run_platform: bool) -> tuple[ChatCore, TelegramPlatform, Engine, asyncio.Task | None]:
            engine = Engine(lambda: tiny_pipeline)
            await engine.start()
            core = ChatCore(config, store, engine, is_test_model=True, delivery_backoff=0.01)
            platform = TelegramPlatform(core, config.telegram, tg.token, poll_timeout=1)
            core.add_platform(platform)
            return core, platform, engine, asyncio.create_task(platform.run()) if run_platform else None

        core1, platform1, engine1, runner1 = await life(True)
        asked = tg.send_text(GROUP, ALICE, f"/draw@{BOT_NAME} a lighthouse --steps 20")
        await tg.wait_for(lambda: tg.bot_messages(GROUP.id), WAIT, what="the ack")
        await core1.stop_accepting()  # the bot is stopped before the picture is done
        await engine1.close(timeout=0)
        await core1.drain()
        runner1.cancel()
        await asyncio.gather(runner1, return_exceptions=True)
        assert not tg.photos()

        # Second life: the job is picked up before polling even starts, and answered where it was asked.
        core2, platform2, engine2, _ = await life(False)
        assert await core2.recover() == 1
        await asyncio.wait_for(core2.drain(), WAIT)
        await platform2.stop()
        await engine2.close()
        [record] = await store.history("telegram", str(ALICE.id))
        await store.close()

    [photo] = tg.photos(GROUP.id)
    assert tg.message(GROUP.id, photo.message_id).payload["reply_to_message"]["message_id"] == asked.message_id
    # The ack, maybe "restarting, kept" (stopped before the engine took it up), then the notice of the second life.
    notice = [m for m in tg.bot_messages(GROUP.id) if not m.has_photo][-1]
    assert "still coming" in notice.versions[0]["text"] and notice.text == "Done."
    assert notice.payload["reply_to_message"]["message_id"] == asked.message_id
    assert record.status == "done" and record.delivered_at is not None


async def test_start_up_waits_for_the_network_and_a_refused_token_is_reported_without_it(tmp_path):
    async with FakeTelegramServer(bot_username=BOT_NAME) as tg:
        tg.inject_network_failure("getMe", count=1)  # Telegram unreachable at boot
        platform = TelegramPlatform(None, settings_for(tg), tg.token, poll_timeout=1,  # type: ignore[arg-type]
                                    connect_retry=0.2)
        runner = asyncio.create_task(platform.run())
        await tg.wait_for(lambda: tg.commands(), WAIT, what="start-up after the failure")
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        assert [c.ok for c in tg.calls_to("getMe")] == [False, True]

        wrong = "999:not-the-token"
        refused = TelegramPlatform(None, settings_for(tg), wrong)  # type: ignore[arg-type]
        with pytest.raises(TokenRefused, match="refused the bot token") as error:
            await refused.run()
        assert wrong not in str(error.value) and error.value.__cause__ is None


# ---- the pieces ----------------------------------------------------------------------------------------------------


def test_conversation_reference_round_trips_and_bad_references_are_refused(tmp_path):
    settings = TelegramSettings(api_base_url="http://127.0.0.1:9/bot", base_file_url="http://127.0.0.1:9/file/bot")
    platform = TelegramPlatform(None, settings, "1:x")  # type: ignore[arg-type]
    conv = platform.conversation({"chat_id": -100123, "chat_kind": "group", "thread_id": 7, "reply_to": 99})
    assert platform.conversation(conv.ref()).ref() == conv.ref() == {
        "chat_id": -100123, "chat_kind": "group", "thread_id": 7, "reply_to": 99}
    assert conv.progress_interval == settings.progress_interval_group
    assert platform.conversation({"chat_id": 5}).progress_interval == settings.progress_interval_private
    with pytest.raises(ValueError):
        platform.conversation({"chat": "console"})


def test_html_markup_and_length_limits():
    m = TelegramHTML()
    assert m.escape("<b> & </b>") == "&lt;b&gt; &amp; &lt;/b&gt;"
    assert m.code("1<2") == "<code>1&lt;2</code>" and m.bold("a&b") == "<b>a&amp;b</b>"
    text = m.bold("title") + m.escape(" <x> ") + m.code("42")
    assert visible_text(text) == "title <x> 42" and fit_text(text, 4096) == (text, "HTML")
    long = m.escape("🦊&" * 3000)  # an emoji counts twice in Telegram's UTF-16 limits
    cut, mode = fit_text(long, 4096)
    assert mode is None and cut.endswith("…") and len(cut.encode("utf-16-le")) // 2 <= 4096
    assert cut.startswith("🦊&🦊&")


@pytest.mark.parametrize("opt_in, kind", [("true", dtm.timedelta), (None, int)])
def test_retry_after_is_read_as_int_or_timedelta(monkeypatch, opt_in, kind):
    if opt_in:
        monkeypatch.setenv("PTB_TIMEDELTA", opt_in)
    else:
        monkeypatch.delenv("PTB_TIMEDELTA", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTB warns that int periods are deprecated
        error = RetryAfter(3)
        assert isinstance(error.retry_after, kind)
        assert retry_after_seconds(error) == 3.0


async def test_an_admin_bans_and_unbans_by_user_id(tmp_path, tiny_settings, tiny_pipeline):
    bob_dm = FakeChat.private(BOB)
    async with telegram_bot(tmp_path, tiny_settings, tiny_pipeline, admins=[f"telegram:{ALICE.id}"]) as h:
        stranger = await h.reply_to(h.tg.send_text(bob_dm, BOB, f"/ban {ALICE.id}"))
        banned = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, f"/ban {BOB.id}"))
        refused = await h.reply_to(h.tg.send_text(bob_dm, BOB, "/draw a cat"))
        lifted = await h.reply_to(h.tg.send_text(ALICE_DM, ALICE, f"/unban {BOB.id}"))
        assert not h.tg.photos(BOB.id)
        h.tg.send_text(bob_dm, BOB, "/draw a cat")
        await h.tg.wait_for(lambda: h.tg.photos(BOB.id), WAIT, what="bob's picture after the unban")
    assert stranger.text == "Only the bot's admins can ban."
    assert banned.text == f"telegram:{BOB.id} is banned (until an admin unbans them)."
    assert "blocked" in refused.text
    assert lifted.text == f"telegram:{BOB.id} may draw again."
