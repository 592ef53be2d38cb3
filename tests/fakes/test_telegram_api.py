"""The fake Bot API against the real python-telegram-bot 22.8 over a loopback socket."""

from __future__ import annotations

import asyncio
import datetime as dtm
import io
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes
from telegram.helpers import escape, escape_markdown

from tests.fakes.telegram_api import (
    FakeChat,
    FakeTelegramServer,
    FakeUser,
    MarkupError,
    detect_entities,
    polling_application,
    render_markup,
)

ALICE = FakeUser(id=1001, first_name="Alice", username="alice")
BOB = FakeUser(id=1002, first_name="Bob", username="bobby")
ALICE_DM = FakeChat.private(ALICE)
GROUP = FakeChat.supergroup(42, title="Artists")
AGAIN_BUTTON = InlineKeyboardMarkup([[InlineKeyboardButton("Again", callback_data="again:7")]])


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def send_with_retry(send, attempts: int = 3):
    """The retry the adapter must do without AIORateLimiter: wait retry_after, then try again."""
    for attempt in range(attempts):
        try:
            return await send()
        except RetryAfter as error:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(error.retry_after.total_seconds())
    raise AssertionError("unreachable")


def build_demo_app(tg: FakeTelegramServer, errors: list[BaseException]) -> Application:
    """A tiny bot: /start greets with a button, /draw echoes, /photo sends a PNG, buttons edit."""

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet with a button."""
        await update.effective_message.reply_text(
            f"Hello {escape(update.effective_user.first_name)}!", reply_markup=AGAIN_BUTTON
        )

    async def draw(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Echo the prompt, retrying on flood control."""
        prompt = " ".join(context.args)
        await send_with_retry(lambda: update.effective_message.reply_text(f"drawing: {prompt}"))

    async def photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Send a picture with an HTML caption and spoiler."""
        await update.effective_message.reply_photo(
            png_bytes(), caption="<b>seed</b> 42", parse_mode="HTML", has_spoiler=True,
            filename="drawing.png", reply_markup=AGAIN_BUTTON,
        )

    async def button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """CallbackQueries must be answered, then the message shows the choice."""
        query = update.callback_query
        await query.answer("On it")
        await query.edit_message_text(f"pressed {query.data}")

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        errors.append(context.error)

    app = tg.application_builder().build()
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("draw", draw))
    app.add_handler(CommandHandler("photo", photo))
    app.add_handler(CallbackQueryHandler(button))
    app.add_error_handler(on_error)
    return app


@pytest.fixture(autouse=True)
def timedelta_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    """PTB 22 gives RetryAfter.retry_after as timedelta only with this opt-in (else int + warning)."""
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegramServer]:
    async with FakeTelegramServer(bot_username="DrawTestBot") as server:
        yield server


@pytest.fixture
async def running(tg: FakeTelegramServer) -> AsyncIterator[list[BaseException]]:
    """The demo app polling the fake; yields the list of handler errors (must stay empty)."""
    errors: list[BaseException] = []
    async with polling_application(build_demo_app(tg, errors), poll_timeout=1):
        yield errors


@pytest.fixture
async def bot(tg: FakeTelegramServer) -> AsyncIterator[Bot]:
    """A bare initialized PTB Bot for direct method calls; Alice's and the group chat exist."""
    tg.register_chat(ALICE_DM)
    tg.register_chat(GROUP)
    async with Bot(tg.token, base_url=tg.base_url, base_file_url=tg.base_file_url) as client:
        yield client


# ---- end to end with the Application -----------------------------------------------------


async def test_private_start_gets_a_reply_with_a_button(tg: FakeTelegramServer, running: list) -> None:
    sent = tg.send_text(ALICE_DM, ALICE, "/start")

    replies = await tg.wait_for(lambda: tg.bot_messages(ALICE.id), timeout=5)

    assert [m.text for m in replies] == ["Hello Alice!"]
    reply = replies[0]
    assert reply.payload["from"]["is_bot"] is True
    assert reply.payload["chat"] == {"id": ALICE.id, "type": "private", "username": "alice", "first_name": "Alice"}
    assert reply.message_id == sent.message_id + 1
    assert reply.buttons == [{"text": "Again", "callback_data": "again:7"}]
    assert abs(reply.payload["date"] - time.time()) < 5  # seconds, not milliseconds
    assert tg.calls_to("getMe") and tg.calls_to("deleteWebhook")
    # The next poll confirms the update with its offset.
    await tg.wait_for(lambda: not tg.pending_updates, timeout=3)
    assert running == []


async def test_stopping_the_application_is_quick_and_no_conflict(tg: FakeTelegramServer) -> None:
    errors: list[BaseException] = []
    async with polling_application(build_demo_app(tg, errors), poll_timeout=5):
        await tg.wait_for_call("getUpdates")
        await asyncio.sleep(0.1)  # the poll is now waiting server-side
        stopping = time.monotonic()

    assert time.monotonic() - stopping < 2  # the Updater abandons the 5 s poll
    assert tg.conflicts == 0  # the abandoned poll ended by the cleanup poll is not a conflict
    assert errors == []


async def test_group_command_addressed_to_the_bot_arrives(tg: FakeTelegramServer, running: list) -> None:
    tg.send_text(GROUP, BOB, "/draw@OtherBot not for us")
    tg.send_text(GROUP, BOB, "just chatting")
    addressed = tg.send_text(GROUP, BOB, "/draw@DrawTestBot a red fox 🦊")

    replies = await tg.wait_for(lambda: tg.bot_messages(GROUP.id), timeout=5)

    assert [m.text for m in replies] == ["drawing: a red fox 🦊"]
    assert replies[0].payload["chat"]["type"] == "supergroup"
    assert replies[0].payload["reply_to_message"]["message_id"] == addressed.message_id
    delivered = [m.text for m in tg.messages(GROUP.id) if not m.sent_by_bot and m.delivered]
    assert delivered == ["/draw@DrawTestBot a red fox 🦊"]  # privacy mode hid the other two
    assert running == []


async def test_photo_upload_arrives_byte_for_byte_and_downloads_back(
    tg: FakeTelegramServer, running: list, bot: Bot
) -> None:
    tg.send_text(ALICE_DM, ALICE, "/photo")

    [photo] = await tg.wait_for(lambda: tg.photos(ALICE.id), timeout=5)

    assert photo.data == png_bytes()
    assert photo.filename == "drawing.png"
    assert (photo.caption, photo.parse_mode, photo.has_spoiler) == ("<b>seed</b> 42", "HTML", True)
    assert photo.reply_markup == AGAIN_BUTTON.to_dict()
    assert (photo.width, photo.height) == (64, 48)
    message = tg.message(ALICE.id, photo.message_id)
    assert message.caption == "seed 42"  # rendered, as Telegram returns it
    assert message.payload["has_media_spoiler"] is True
    largest = message.payload["photo"][-1]
    assert (largest["width"], largest["height"], largest["file_id"]) == (64, 48, photo.file_id)

    file = await bot.get_file(photo.file_id)
    assert bytes(await file.download_as_bytearray()) == png_bytes()
    assert running == []


async def test_button_press_is_answered_and_edits_the_message(tg: FakeTelegramServer, running: list) -> None:
    tg.send_text(ALICE_DM, ALICE, "/start")
    [greeting] = await tg.wait_for(lambda: tg.bot_messages(ALICE.id), timeout=5)

    press = tg.press_button(greeting, ALICE, "again:7")
    await tg.wait_for(lambda: press.answered and greeting.edit_count == 1, timeout=5)

    assert press.answer == {"text": "On it"}
    assert press.chat_instance == tg.chat_instance(ALICE.id)
    assert greeting.text == "pressed again:7"
    assert greeting.versions[0]["text"] == "Hello Alice!"
    assert "edit_date" in greeting.payload
    assert greeting.reply_markup is None  # editMessageText without reply_markup drops the keyboard
    assert [c.method for c in tg.calls_to("answerCallbackQuery", "editMessageText")] == [
        "answerCallbackQuery", "editMessageText",
    ]
    with pytest.raises(ValueError, match="no button"):
        tg.press_button(greeting, ALICE, "again:7")  # the keyboard is gone now
    assert running == []


async def test_retry_after_is_honoured_by_the_handler_retry(tg: FakeTelegramServer, running: list) -> None:
    tg.inject_retry_after("sendMessage", retry_after=1)
    tg.send_text(ALICE_DM, ALICE, "/draw fox")

    await tg.wait_for(lambda: tg.bot_messages(ALICE.id), timeout=5)

    first, second = tg.calls_to("sendMessage")
    assert (first.http_status, second.http_status) == (429, 200)
    assert first.error == {
        "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
        "parameters": {"retry_after": 1},
    }
    assert second.at - first.at >= 1.0
    assert tg.retry_after_served == 1  # no early retry inside the flood window
    assert [m.text for m in tg.bot_messages(ALICE.id)] == ["drawing: fox"]
    assert running == []


async def test_retry_after_is_honoured_by_aio_rate_limiter(tg: FakeTelegramServer) -> None:
    pytest.importorskip("aiolimiter", reason="python-telegram-bot[rate-limiter] extra is not installed")
    from telegram.ext import AIORateLimiter

    tg.register_chat(ALICE_DM)
    tg.inject_retry_after("sendMessage", retry_after=1)
    app = tg.application_builder().rate_limiter(AIORateLimiter(max_retries=2)).build()
    async with app:
        await app.bot.send_message(ALICE.id, "after the flood")

    first, second = tg.calls_to("sendMessage")
    assert second.at - first.at >= 1.0
    assert tg.retry_after_served == 1


# ---- the fake's Bot API behaviour through a bare PTB Bot ----------------------------------


async def test_retry_after_reaches_ptb_and_early_retries_get_flood_again(tg: FakeTelegramServer, bot: Bot) -> None:
    tg.inject_retry_after(retry_after=2)  # any method

    with pytest.raises(RetryAfter) as first:
        await bot.send_message(ALICE.id, "one")
    with pytest.raises(RetryAfter):
        await bot.send_chat_action(ALICE.id, "typing")  # back too early: still flooded

    assert first.value.retry_after == dtm.timedelta(seconds=2)
    assert tg.retry_after_served == 2
    assert [e.from_flood_window for e in tg.served_errors] == [False, True]
    assert tg.bot_messages(ALICE.id) == []  # a flooded call has no effect


async def test_not_modified_edit_raises_bad_request(tg: FakeTelegramServer, bot: Bot) -> None:
    sent = await bot.send_message(ALICE.id, "step 1/4", reply_markup=AGAIN_BUTTON)

    edited = await bot.edit_message_text("step 1/4", ALICE.id, sent.message_id)  # keyboard removed: a change
    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_text("step 1/4", ALICE.id, sent.message_id)
    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_reply_markup(ALICE.id, sent.message_id)

    assert isinstance(edited, Message) and edited.edit_date is not None
    stored = tg.message(ALICE.id, sent.message_id)
    assert stored.edit_count == 1
    body = tg.calls_to("editMessageText")[-1].error
    assert body["error_code"] == 400 and body["description"].startswith("Bad Request: message is not modified")


async def test_caption_and_markup_edits_on_a_photo(tg: FakeTelegramServer, bot: Bot) -> None:
    sent = await bot.send_photo(ALICE.id, png_bytes(), caption="queued")

    with pytest.raises(BadRequest, match="no text in the message"):
        await bot.edit_message_text("nope", ALICE.id, sent.message_id)
    await bot.edit_message_caption(ALICE.id, sent.message_id, caption="<i>done</i>", parse_mode="HTML")
    await bot.edit_message_reply_markup(ALICE.id, sent.message_id, reply_markup=AGAIN_BUTTON)

    stored = tg.message(ALICE.id, sent.message_id)
    assert [v.get("caption") for v in stored.versions] == ["queued", "done", "done"]
    assert stored.buttons == [{"text": "Again", "callback_data": "again:7"}]


async def test_parse_mode_errors_match_telegram(tg: FakeTelegramServer, bot: Bot) -> None:
    prompt = "a cat (v2.0) #1 <b> & _stuff_"
    with pytest.raises(BadRequest, match="(?i)can't parse entities"):
        await bot.send_message(ALICE.id, f"*Prompt:* {prompt}", parse_mode="MarkdownV2")
    with pytest.raises(BadRequest, match="(?i)can't parse entities"):
        await bot.send_message(ALICE.id, f"<b>Prompt:</b> {prompt}", parse_mode="HTML")

    v2 = await bot.send_message(ALICE.id, f"*Prompt:* {escape_markdown(prompt, version=2)}", parse_mode="MarkdownV2")
    html = await bot.send_message(ALICE.id, f"<b>Prompt:</b> {escape(prompt)}", parse_mode="HTML")

    assert v2.text == html.text == f"Prompt: {prompt}"


async def test_render_markup_rules() -> None:
    assert render_markup("<b>bold</b> <a href='x'>link</a> &lt;3", "HTML") == "bold link <3"
    v2 = "*b* _i_ __u__ ~s~ ||sp|| `c\\`` [t](http://x\\)y) 1\\.5"
    assert render_markup(v2, "MarkdownV2") == "b i u s sp c` t 1.5"
    assert render_markup("```python\nprint(1)```", "MarkdownV2") == "print(1)"
    for bad, mode in [("<br/>", "HTML"), ("<b>x", "HTML"), ("<b>x</i>", "HTML"), ("*open", "MarkdownV2"),
                      ("1.5", "MarkdownV2"), ("*x", "Markdown")]:
        with pytest.raises(MarkupError):
            render_markup(bad, mode)
    assert render_markup("1.5 (ok)", "Markdown") == "1.5 (ok)"


async def test_long_poll_waits_for_new_updates_and_offset_confirms(tg: FakeTelegramServer, bot: Bot) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, tg.send_text, ALICE_DM, ALICE, "/start")
    started = time.monotonic()

    updates = await bot.get_updates(timeout=3)

    assert 0.25 <= time.monotonic() - started < 2
    assert [u.message.text for u in updates] == ["/start"]
    assert updates[0].message.entities[0].type == "bot_command"
    assert len(await bot.get_updates(offset=updates[0].update_id, timeout=0)) == 1  # not yet confirmed
    started = time.monotonic()
    assert await bot.get_updates(offset=updates[0].update_id + 1, timeout=1) == ()
    assert time.monotonic() - started >= 0.9  # waited the full timeout
    assert tg.pending_updates == []


async def test_limit_and_overlapping_poll_conflict(tg: FakeTelegramServer) -> None:
    for n in range(3):
        tg.send_text(ALICE_DM, ALICE, f"msg {n}")
    url = f"{tg.base_url}{tg.token}/getUpdates"
    async with httpx.AsyncClient() as client:
        limited = (await client.post(url, json={"limit": 2})).json()
        assert [u["message"]["text"] for u in limited["result"]] == ["msg 0", "msg 1"]

        last = limited["result"][-1]["update_id"]
        # Drain, then two long polls overlap: Telegram ends the older one with 409.
        await client.post(url, json={"offset": last + 2})
        older = asyncio.create_task(client.post(url, json={"offset": last + 2, "timeout": 5}))
        await asyncio.sleep(0.2)
        newer = await client.post(url, json={"offset": last + 2, "timeout": 0})
        older_response = await older

    assert newer.json() == {"ok": True, "result": []}
    assert older_response.status_code == 409
    assert older_response.json()["description"].startswith("Conflict: terminated by other getUpdates")
    assert tg.conflicts == 1


async def test_command_entities_use_utf16_offsets(bot: Bot) -> None:
    text = "/draw@DrawTestBot 🦊 ask @somebody then /help"
    payload = {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"}, "text": text,
               "entities": detect_entities(text)}

    parsed = Message.de_json(payload, bot).parse_entities()

    assert sorted(parsed.values()) == ["/draw@DrawTestBot", "/help", "@somebody"]
    assert [e["type"] for e in payload["entities"]] == ["bot_command", "mention", "bot_command"]
    assert detect_entities("path/to /x") == [{"type": "bot_command", "offset": 8, "length": 2}]


async def test_message_ids_increase_per_chat_and_replies_link(tg: FakeTelegramServer, bot: Bot) -> None:
    asked = tg.send_text(ALICE_DM, ALICE, "/start")
    a1 = await bot.send_message(ALICE.id, "one", reply_to_message_id=asked.message_id)
    g1 = await bot.send_message(GROUP.id, "group one")
    a2 = await bot.send_message(ALICE.id, "two")

    assert (asked.message_id, a1.message_id, a2.message_id) == (1, 2, 3)
    assert g1.message_id == 1
    assert a1.reply_to_message.message_id == asked.message_id
    with pytest.raises(BadRequest, match="Chat not found"):
        await bot.send_message(999, "who?")
    with pytest.raises(BadRequest, match="Message to be replied not found"):
        await bot.send_message(ALICE.id, "x", reply_to_message_id=77)


async def test_documents_chat_actions_delete_and_commands(tg: FakeTelegramServer, bot: Bot) -> None:
    doc = await bot.send_document(GROUP.id, png_bytes(), filename="full.png", caption="lossless")
    assert await bot.send_chat_action(GROUP.id, "upload_photo") is True
    with pytest.raises(BadRequest, match="Wrong parameter action"):
        await bot.send_chat_action(GROUP.id, "dancing")
    assert await bot.delete_message(GROUP.id, doc.message_id) is True
    with pytest.raises(BadRequest, match="Message to delete not found"):
        await bot.delete_message(GROUP.id, doc.message_id)
    await bot.set_my_commands([("draw", "Draw a picture"), ("help", "How to use me")])
    with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_INVALID"):
        await bot.set_my_commands([("Draw-It", "bad name")])

    [document] = tg.documents(GROUP.id)
    assert (document.data, document.filename, document.caption) == (png_bytes(), "full.png", "lossless")
    assert doc.document.file_name == "full.png" and doc.document.file_size == len(png_bytes())
    assert [(a.chat_id, a.action) for a in tg.chat_actions] == [(GROUP.id, "upload_photo")]
    assert tg.messages(GROUP.id) == [] and tg.messages(GROUP.id, include_deleted=True)[0].deleted
    assert [c.command for c in await bot.get_my_commands()] == ["draw", "help"]
    assert tg.commands() == [{"command": "draw", "description": "Draw a picture"},
                             {"command": "help", "description": "How to use me"}]


async def test_photo_limits_and_invalid_uploads(tg: FakeTelegramServer, bot: Bot) -> None:
    tg.max_photo_bytes = 1000  # shrink Telegram's 10 MB limit so the test stays small
    with pytest.raises(BadRequest, match="(?i)PHOTO_SAVE_FILE_INVALID"):
        await bot.send_photo(ALICE.id, png_bytes(400, 400))
    with pytest.raises(BadRequest, match="(?i)IMAGE_PROCESS_FAILED"):
        await bot.send_photo(ALICE.id, b"not an image at all")
    with pytest.raises(BadRequest, match="(?i)PHOTO_INVALID_DIMENSIONS"):
        await bot.send_photo(ALICE.id, png_bytes(630, 30))  # ratio 21 > 20
    with pytest.raises(BadRequest, match="Wrong file identifier"):
        await bot.send_photo(ALICE.id, "https://example.com/cat.png")
    with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="y" * 65)]])
        await bot.send_message(ALICE.id, "too much data", reply_markup=markup)
    assert tg.sent_media == [] and tg.bot_messages(ALICE.id) == []


async def test_injected_errors_map_to_ptb_exceptions(tg: FakeTelegramServer, bot: Bot) -> None:
    tg.inject_error("sendMessage", error_code=403, description="Forbidden: bot was blocked by the user")
    tg.inject_bad_request("sendPhoto", description="wrong type of the web page content", count=2)
    tg.inject_network_failure("sendMessage", mode="drop")
    tg.inject_network_failure("sendMessage", mode="bad_gateway")

    with pytest.raises(Forbidden, match="blocked"):
        await bot.send_message(ALICE.id, "a")
    with pytest.raises(NetworkError):
        await bot.send_message(ALICE.id, "b")  # connection reset, no answer
    with pytest.raises(NetworkError, match="Bad Gateway"):
        await bot.send_message(ALICE.id, "c")
    for _ in range(2):
        with pytest.raises(BadRequest, match="Wrong type of the web page content"):
            await bot.send_photo(ALICE.id, png_bytes())
    ok = await bot.send_message(ALICE.id, "d")

    assert ok.text == "d"
    assert [e.error_code for e in tg.served_errors] == [403, 502, 502, 400, 400]
    assert tg.count_served(400, method="sendPhoto") == 2


async def test_wrong_token_and_raw_wire_format(tg: FakeTelegramServer) -> None:
    with pytest.raises(InvalidToken):
        async with Bot("999:wrong", base_url=tg.base_url, base_file_url=tg.base_file_url):
            pass
    tg.register_chat(ALICE_DM)
    url = f"{tg.base_url}{tg.token}"
    async with httpx.AsyncClient() as client:
        by_form = await client.post(f"{url}/sendMessage", data={"chat_id": str(ALICE.id), "text": "123"})
        by_json = await client.post(f"{url}/sendMessage", json={"chat_id": ALICE.id, "text": "json"})
        unknown = await client.post(f"{url}/sendDice", json={"chat_id": ALICE.id})
        broken = await client.post(f"{url}/sendMessage", content=b"{oops", headers={"content-type": "application/json"})
        tg.stub("setMyDescription", True)
        stubbed = await client.post(f"{url}/setMyDescription", json={"description": "draws"})

    assert by_form.headers["content-type"] == "application/json"
    assert by_form.json()["result"]["text"] == "123"  # text stays a string from a form body
    assert by_json.json()["result"]["text"] == "json"
    assert (unknown.status_code, unknown.json()["description"]) == (404, "Not Found")
    assert stubbed.json() == {"ok": True, "result": True}
    assert broken.status_code == 400 and broken.json()["description"].startswith("Bad Request: can't parse JSON")


async def test_wait_for_times_out_with_a_clear_message(tg: FakeTelegramServer) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="a reply that never comes"):
        await tg.wait_for(lambda: tg.bot_messages(ALICE.id), timeout=0.2, what="a reply that never comes")
    assert time.monotonic() - started < 1
