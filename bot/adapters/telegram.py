"""The Telegram adapter (python-telegram-bot 22): long polling, one handler per command, every rule in the core.

Each update becomes a `bot.chat.User` and a `TelegramConversation`, then a call on `ChatCore`. This module only
renders: HTML parse mode (user text escaped by `TelegramHTML`, seeds in `<code>` so they are tap-to-copy), inline
keyboards for buttons, the photo (plus the lossless PNG as a document when the photo limits or the user ask for it),
the `upload_photo` chat action, and flood control:

- Sends go through PTB's `AIORateLimiter` and are retried after a 429 `retry_after` (`rate_limit_args`).
- Progress edits are not retried here (a late progress line is worthless): a 429 is reported to the core as
  `Flooded(retry_after)`, and the core's pacer for that message waits, widens its interval and sends the newest text
  when the window ends, so the message still ends on "Done.". "Message is not modified" is harmless.
- Delivery errors (`send_picture`) propagate: the core retries with backoff and records the delivery once.

The token is never logged: httpx's request log lines (which carry the URL, token included) are redacted while the
platform runs, and error messages are redacted before logging.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import html
import io
import logging
import re
import traceback
from typing import Any

from PIL import Image
from telegram import (
    BotCommand,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, ParseMode
from telegram.error import BadRequest, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ExtBot,
    MessageHandler,
    filters,
)

from bot import replies
from bot.chat import Button, Flooded, Picture, TokenRefused, User, parse_button
from bot.config import TelegramSettings
from bot.core import ChatCore
from engine.png import fit_for_upload

log = logging.getLogger(__name__)

# Telegram's limits (https://core.telegram.org/bots/api).
MAX_TEXT_CHARS = 4096
MAX_CAPTION_CHARS = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_CALLBACK_ANSWER_CHARS = 200
MAX_PHOTO_BYTES = 10 * 1024 * 1024
MAX_PHOTO_SIDE_SUM = 10_000
MAX_PHOTO_RATIO = 20

SEND_RETRIES = 3
"""Times a send is tried again after a 429, each after the `retry_after` Telegram asked for."""

COMMANDS: list[tuple[str, str]] = replies.menu(typed_options=False)
"""The command menu (setMyCommands). /start, /again and /reroll work too but need no menu entry."""
HANDLED_COMMANDS = ["draw", "start", "help", "history", "usage", "cancel", "again", "reroll"]

_TAG = re.compile(r"<[^>]*>")


class TelegramHTML:
    """`bot.chat.Markup` for Telegram's HTML parse mode: only <, > and & need escaping outside attributes."""

    def escape(self, text: str) -> str:
        return html.escape(text, quote=False)

    def code(self, text: str) -> str:
        return f"<code>{self.escape(text)}</code>"

    def bold(self, text: str) -> str:
        return f"<b>{self.escape(text)}</b>"


def visible_text(text: str) -> str:
    """What a user sees of an HTML text written through `TelegramHTML` (tags dropped, entities decoded)."""
    return html.unescape(_TAG.sub("", text))


def utf16_len(text: str) -> int:
    """Telegram counts text limits in UTF-16 code units (an emoji may count twice)."""
    return len(text.encode("utf-16-le")) // 2


def fit_text(text: str, limit: int) -> tuple[str, str | None]:
    """(text, parse mode) within `limit`: the HTML as it is when it fits, else its visible text cut to the limit
    and sent without a parse mode (cutting HTML could split a tag or an entity)."""
    plain = visible_text(text)
    if utf16_len(plain) <= limit:
        return text, ParseMode.HTML
    kept, used = [], 0
    for char in plain:
        used += utf16_len(char)
        if used > limit - 1:  # room for the ellipsis
            break
        kept.append(char)
    return "".join(kept) + "…", None


def retry_after_seconds(error: RetryAfter) -> float:
    """`RetryAfter.retry_after` is an int, or a timedelta with PTB_TIMEDELTA set; PTB 23 makes it a timedelta."""
    value = error.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


def photo_fits(png: bytes, max_bytes: int) -> tuple[bool, bool]:
    """(the sides allow a photo, the file is small enough to be one) under Telegram's photo limits."""
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    sides_ok = width + height <= MAX_PHOTO_SIDE_SUM and max(width, height) <= MAX_PHOTO_RATIO * min(width, height)
    return sides_ok, len(png) <= max_bytes


def chat_kind(chat: Chat) -> str:
    """`bot.chat.User.chat_kind` for a Telegram chat (supergroups are groups to the core)."""
    if chat.type == ChatType.PRIVATE:
        return "private"
    return "group" if chat.type in (ChatType.GROUP, ChatType.SUPERGROUP) else "channel"


def keyboard(buttons: list[Button] | None) -> InlineKeyboardMarkup | None:
    """One row of inline buttons; a button whose data would not fit Telegram's 64 bytes is left out."""
    row = [
        InlineKeyboardButton(b.label, callback_data=b.data)
        for b in buttons or []
        if len(b.data.encode()) <= MAX_CALLBACK_DATA_BYTES
    ]
    return InlineKeyboardMarkup([row]) if row else None


class _RedactToken(logging.Filter):
    """Replaces the bot token in log records (httpx logs every request URL, and the URL holds the token)."""

    def __init__(self, token: str):
        super().__init__()
        self._token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._token in message:
            record.msg, record.args = message.replace(self._token, "<token>"), ()
        return True


class TelegramConversation:
    """One chat (or forum topic) the bot answers in; replies quote the message that asked."""

    platform = "telegram"
    markup = TelegramHTML()
    typed_options = False  # /draw takes text flags (--seed 42)

    def __init__(self, owner: TelegramPlatform, chat_id: int, chat_kind: str, *, thread_id: int | None = None,
                 reply_to: int | None = None):
        self._owner = owner
        self.chat_id = chat_id
        self.chat_kind = chat_kind
        self.thread_id = thread_id
        self.reply_to = reply_to
        self.sent = 0
        """Messages sent through this conversation (a button press that produced one needs no alert)."""
        self._delivered: dict[str, set[str]] = {}  # job id -> parts already sent ("photo", "document")

    @property
    def progress_interval(self) -> float:
        settings = self._owner.settings
        return settings.progress_interval_private if self.chat_kind == "private" else settings.progress_interval_group

    def ref(self) -> dict:
        return {"chat_id": self.chat_id, "chat_kind": self.chat_kind, "thread_id": self.thread_id,
                "reply_to": self.reply_to}

    def _where(self) -> dict[str, Any]:
        where: dict[str, Any] = {"chat_id": self.chat_id}
        if self.thread_id is not None:
            where["message_thread_id"] = self.thread_id
        if self.reply_to is not None:
            # The asking message may be gone by now (deleted, or the bot restarted long after): send anyway.
            where["reply_parameters"] = ReplyParameters(self.reply_to, allow_sending_without_reply=True)
        return where

    async def send_text(self, text: str, *, buttons: list[Button] | None = None) -> str | None:
        bot = await self._owner.bot()
        body, parse_mode = fit_text(text, MAX_TEXT_CHARS)
        message = await bot.send_message(text=body, parse_mode=parse_mode, reply_markup=keyboard(buttons),
                                         rate_limit_args=self._owner.send_retries, **self._where())
        self.sent += 1
        return str(message.message_id)

    async def edit_text(self, message_id: str, text: str) -> None:
        """A progress edit, never retried here: a 429 is reported to the core's pacer as `Flooded`."""
        bot = await self._owner.bot()
        body, parse_mode = fit_text(text, MAX_TEXT_CHARS)
        try:
            await bot.edit_message_text(body, chat_id=self.chat_id, message_id=int(message_id), parse_mode=parse_mode)
        except RetryAfter as exc:
            raise Flooded(retry_after_seconds(exc)) from None
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():  # the same text again is harmless
                raise

    async def send_picture(self, picture: Picture) -> str | None:
        """The photo, plus the lossless PNG as a document when asked for or when it cannot be a photo. Errors
        propagate (the core retries); a part that already went out is not sent again on the retry."""
        bot = await self._owner.bot()
        done = self._delivered.setdefault(picture.job_id, set())
        sides_ok, small_enough = photo_fits(picture.png, self._owner.max_photo_bytes)
        caption, parse_mode = fit_text(picture.caption, MAX_CAPTION_CHARS)
        markup = keyboard(picture.buttons)
        first_id: str | None = None
        if sides_ok and "photo" not in done:
            photo, mime = fit_for_upload(picture.png, self._owner.max_photo_bytes)
            name = f"drawbot-{picture.job_id}.{'png' if mime == 'image/png' else 'jpg'}"
            message = await bot.send_photo(photo=photo, filename=name, caption=caption, parse_mode=parse_mode,
                                           reply_markup=markup, has_spoiler=picture.spoiler,
                                           rate_limit_args=self._owner.send_retries, **self._where())
            done.add("photo")
            first_id = str(message.message_id)
        if (picture.as_file or not sides_ok or not small_enough) and "document" not in done:
            # Without a photo the document carries the caption and buttons; with one it is just the file.
            message = await bot.send_document(
                document=picture.png, filename=f"drawbot-{picture.job_id}.png",
                caption=None if sides_ok else caption, parse_mode=None if sides_ok else parse_mode,
                reply_markup=None if sides_ok else markup, disable_content_type_detection=True,
                rate_limit_args=self._owner.send_retries, **self._where())
            done.add("document")
            first_id = first_id or str(message.message_id)
        self.sent += 1
        self._delivered.pop(picture.job_id, None)
        return first_id

    async def working(self) -> None:
        bot = await self._owner.bot()
        await bot.send_chat_action(self.chat_id, ChatAction.UPLOAD_PHOTO, message_thread_id=self.thread_id)


class TelegramPlatform:
    """Runs the PTB Application against `settings.api_base_url` and turns updates into core calls."""

    name = "telegram"

    def __init__(self, core: ChatCore, settings: TelegramSettings, token: str, *, poll_timeout: int = 30,
                 max_photo_bytes: int = MAX_PHOTO_BYTES, send_retries: int = SEND_RETRIES,
                 connect_retry: float = 1.0):
        self.core = core
        self.settings = settings
        self.max_photo_bytes = max_photo_bytes
        self.send_retries = send_retries
        self._token = token
        self._poll_timeout = poll_timeout
        self._connect_retry = connect_retry
        self._redact = _RedactToken(token)
        self._init_lock = asyncio.Lock()
        self._initialized = False
        self.application: Application = (
            Application.builder()
            .token(token)
            .base_url(settings.api_base_url)
            .base_file_url(settings.base_file_url)
            # Retries only where a call asks for them (rate_limit_args): sends yes, progress edits no.
            .rate_limiter(AIORateLimiter(max_retries=0))
            .build()
        )
        only_new = filters.UpdateType.MESSAGE  # an edited "/draw" must not draw a second picture
        for command in HANDLED_COMMANDS:
            self.application.add_handler(CommandHandler(command, self._on_command, filters=only_new))
        # Handlers of one group are tried in order, so this one gets only what no command handler took.
        self.application.add_handler(MessageHandler(filters.TEXT & only_new, self._on_other_text))
        self.application.add_handler(CallbackQueryHandler(self._on_button))
        self.application.add_error_handler(self._on_error)

    # -- the Platform protocol --------------------------------------------------------------------------------------
    def conversation(self, ref: dict) -> TelegramConversation:
        """Rebuild a conversation from `TelegramConversation.ref()` (after a restart)."""
        if "chat_id" not in ref:
            raise ValueError(f"not a Telegram conversation reference: {sorted(ref)}")
        return TelegramConversation(
            self, int(ref["chat_id"]), str(ref.get("chat_kind") or "private"),
            thread_id=int(ref["thread_id"]) if ref.get("thread_id") is not None else None,
            reply_to=int(ref["reply_to"]) if ref.get("reply_to") is not None else None,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    async def bot(self) -> ExtBot:
        """The initialized bot. Initialized on first use: the core may deliver pictures from before a restart
        (`ChatCore.recover`) before `run()` starts polling."""
        async with self._init_lock:
            if not self._initialized:
                logging.getLogger("httpx").addFilter(self._redact)
                try:
                    await self.application.initialize()
                except InvalidToken:
                    # PTB's message quotes the token: replace it with one that does not.
                    raise TokenRefused("Telegram refused the bot token (401 Unauthorized): check "
                                       "DRAWBOT_TELEGRAM_TOKEN or [telegram].token_file (the token @BotFather "
                                       "gave)") from None
                self._initialized = True
        return self.application.bot

    async def run(self) -> None:
        """Poll for updates until cancelled. Messages sent while the bot was down are answered too."""
        try:
            bot = await self._connect()
            await self.application.start()
            assert self.application.updater is not None
            await self.application.updater.start_polling(
                timeout=self._poll_timeout, poll_interval=0, drop_pending_updates=False,
                allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY],
            )
            try:
                await bot.set_my_commands([BotCommand(c, d) for c, d in COMMANDS],
                                          rate_limit_args=self.send_retries)
            except TelegramError as exc:
                log.warning("could not set the Telegram command menu: %s", self._redacted(str(exc)))
            log.info("telegram: polling as @%s", bot.username)
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _connect(self) -> ExtBot:
        """The bot, once Telegram answers: at boot the network may come up after the bot does, so connection
        failures are retried (a refused token is not: that needs the owner)."""
        delay = self._connect_retry
        while True:
            try:
                return await self.bot()
            except NetworkError as exc:
                if isinstance(exc, BadRequest):  # PTB files BadRequest under NetworkError; it is an answer
                    raise
                log.warning("cannot reach Telegram (%s); trying again in %.0f s", self._redacted(str(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def stop(self) -> None:
        """Stop polling and close the connection pool; safe to call more than once."""
        app = self.application
        try:
            if app.updater is not None and app.updater.running:
                await app.updater.stop()
            if app.running:
                await app.stop()
            if self._initialized:
                await app.shutdown()
        finally:
            self._initialized = False
            logging.getLogger("httpx").removeFilter(self._redact)

    # -- handlers --------------------------------------------------------------------------------------------------
    def _from_message(self, update: Update) -> tuple[User, TelegramConversation, Message] | None:
        message, sender, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or sender is None or chat is None or sender.is_bot:
            return None  # channel posts, anonymous admins, other bots
        kind = chat_kind(chat)
        user = User(platform="telegram", id=str(sender.id), name=sender.full_name, chat_id=str(chat.id),
                    chat_kind=kind)
        thread_id = message.message_thread_id if message.is_topic_message else None
        conv = TelegramConversation(self, chat.id, kind, thread_id=thread_id, reply_to=message.message_id)
        return user, conv, message

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A command for this bot (PTB already dropped `/cmd@OtherBot`): the core parses and answers it."""
        found = self._from_message(update)
        if found is None:
            return
        user, conv, message = found
        await self.core.on_text(user, conv, message.text or "", bot_username=context.bot.username)

    async def _on_other_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Any other text: the core hints in private chats, answers unknown commands, ignores the rest."""
        await self._on_command(update, context)

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button press. Callback queries must always be answered, or the button keeps spinning."""
        query = update.callback_query
        if query is None:
            return
        answer: str | None = None
        conv: TelegramConversation | None = None
        try:
            parsed = parse_button(query.data or "")  # encoded by this adapter as Button.data
            if query.message is None or parsed is None:  # a button on an inline message, or not one of ours
                answer = replies.BUTTON_INVALID
            else:
                chat = query.message.chat
                kind = chat_kind(chat)
                thread_id = getattr(query.message, "message_thread_id", None) if getattr(
                    query.message, "is_topic_message", False) else None
                conv = TelegramConversation(self, chat.id, kind, thread_id=thread_id,
                                            reply_to=query.message.message_id)
                user = User(platform="telegram", id=str(query.from_user.id), name=query.from_user.full_name,
                            chat_id=str(chat.id), chat_kind=kind)
                answer = await self.core.on_button(user, conv, *parsed)
        except Exception as exc:
            log.error("button press failed: %s", self._redacted(f"{type(exc).__name__}: {exc}"))
            answer = replies.BUTTON_BROKE
        finally:
            # A refusal (nothing was sent in the chat) is an alert the presser must dismiss; news is a toast.
            refusal = answer is not None and (conv is None or conv.sent == 0)
            try:
                await (await self.bot()).answer_callback_query(
                    query.id, text=(answer or "")[:MAX_CALLBACK_ANSWER_CHARS] or None, show_alert=refusal,
                    rate_limit_args=self.send_retries)
            except TelegramError as exc:
                log.info("could not answer a button press (too old?): %s", exc)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log a handler error: its type and redacted traceback, never the token or the message text."""
        error = context.error
        update_id = update.update_id if isinstance(update, Update) else None
        if error is None:
            return
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        log.error("telegram update %s failed: %s", update_id, self._redacted(details))

    def _redacted(self, text: str) -> str:
        return text.replace(self._token, "<token>")

