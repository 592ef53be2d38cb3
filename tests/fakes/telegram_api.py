"""A fake Telegram Bot API server for offline end-to-end tests of python-telegram-bot.

It is an aiohttp app served on 127.0.0.1 (random free port) that answers what a bot calls, with
the wire behaviour PTB 22.8 relies on (see shared/notes/chat-platforms.md, Part 2a):

* URLs ``/bot<token>/<method>`` and ``/file/bot<token>/<file_path>``; JSON, form-encoded and
  multipart bodies (PTB sends form/multipart with JSON-encoded values for objects).
* Answers ``{"ok": true, "result": ...}``; errors ``{"ok": false, "error_code": ..,
  "description": ..}`` with the same HTTP status, ``parameters.retry_after`` on 429.
* Dates in seconds, ``is_bot`` on users, ``chat_instance`` on callback queries, edits return
  the edited Message, "message is not modified" when nothing changed.
* getUpdates honours ``offset`` (confirms older updates), ``limit`` and ``timeout`` (long poll),
  and, like Telegram, ends an overlapping older poll with 409 Conflict.

The test drives the user side synchronously (``send_text``, ``press_button``), inspects what the
bot did (``calls``, ``messages``, ``sent_media`` ...), awaits conditions with ``wait_for``, and
injects faults (``inject_retry_after``, ``inject_error``, ``inject_network_failure``).

Use::

    async with FakeTelegramServer(bot_username="DrawTestBot") as tg:
        app = tg.application_builder().build()
        ... add handlers ...
        async with polling_application(app):
            tg.send_text(FakeChat.private(alice), alice, "/start")
            await tg.wait_for(lambda: tg.bot_messages(alice.id))
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import itertools
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

if TYPE_CHECKING:  # PTB is only needed by the optional helpers at the bottom
    from telegram.ext import Application, ApplicationBuilder

T = TypeVar("T")

# Telegram's documented limits (https://core.telegram.org/bots/api).
MAX_TEXT_CHARS = 4096
MAX_CAPTION_CHARS = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_PHOTO_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_PHOTO_SIDE_SUM = 10_000
MAX_PHOTO_RATIO = 20
MAX_POLL_TIMEOUT_S = 50.0

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
CHAT_ACTIONS = frozenset(
    {
        "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
        "upload_document", "choose_sticker", "find_location", "record_video_note",
        "upload_video_note",
    }
)
# Form fields that are plain strings; every other form value is JSON-decoded when it parses
# (PTB json.dumps()es ints, bools, dicts and lists but sends str values as they are).
_STRING_FIELDS = frozenset(
    {
        "text", "caption", "parse_mode", "callback_query_id", "file_id", "action", "url",
        "language_code", "inline_message_id", "business_connection_id", "photo", "document",
        "emoji", "title", "description", "short_description", "name", "query",
    }
)
_POLLING_METHODS = frozenset({"getupdates"})
_COMMAND_RE = re.compile(r"(?:^|(?<=\s))/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![A-Za-z0-9_@/])")
_MENTION_RE = re.compile(r"(?:^|(?<=[^\w@/]))@[A-Za-z0-9_]{5,32}(?![\w@])")
_BOT_COMMAND_NAME_RE = re.compile(r"^[a-z0-9_]{1,32}$")


# --------------------------------------------------------------------------------------------
# Value objects the test works with
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeUser:
    """A Telegram user on the test's side of the chat."""

    id: int
    first_name: str
    username: str | None = None
    last_name: str | None = None
    language_code: str | None = "en"
    is_bot: bool = False

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        for key in ("last_name", "username", "language_code"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


@dataclass(frozen=True)
class FakeChat:
    """A chat: ``type`` is "private", "group", "supergroup" or "channel"."""

    id: int
    type: str
    title: str | None = None
    username: str | None = None
    first_name: str | None = None

    @classmethod
    def private(cls, user: FakeUser) -> FakeChat:
        """The private chat between ``user`` and the bot (its id is the user's id, as in Telegram)."""
        return cls(id=user.id, type="private", username=user.username, first_name=user.first_name)

    @classmethod
    def group(cls, chat_id: int, title: str = "Test group") -> FakeChat:
        """A basic group; Telegram gives these negative ids."""
        return cls(id=-abs(chat_id), type="group", title=title)

    @classmethod
    def supergroup(cls, chat_id: int, title: str = "Test supergroup") -> FakeChat:
        """A supergroup; Telegram ids look like -100xxxxxxxxxx."""
        return cls(id=-(1_000_000_000_000 + abs(chat_id)), type="supergroup", title=title)

    @property
    def is_group(self) -> bool:
        return self.type in ("group", "supergroup")

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        for key in ("title", "username", "first_name"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


@dataclass
class UploadedFile:
    """One multipart file part as it arrived."""

    field_name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class ApiCall:
    """One request the bot made, and what the fake answered."""

    method: str  # canonical Bot API spelling, e.g. "sendMessage"
    params: dict[str, Any]  # decoded parameters (JSON values decoded)
    files: dict[str, UploadedFile]
    at: float  # time.monotonic() when the request arrived
    http_status: int | None = None
    result: Any = None
    error: dict[str, Any] | None = None  # the error body served, if any

    @property
    def ok(self) -> bool:
        return self.http_status == 200


@dataclass
class ServedError:
    """A fault or flood-window answer the fake served (for counting and timing checks)."""

    method: str
    error_code: int
    description: str
    at: float
    retry_after: int | None = None
    from_flood_window: bool = False  # True: the caller came back before retry_after elapsed


@dataclass
class StoredMessage:
    """A message in a chat, with its edit history. ``payload`` is the Message JSON as served."""

    chat_id: int
    message_id: int
    payload: dict[str, Any]
    sent_by_bot: bool
    source_text: str | None = None  # text/caption as the bot sent it, before parse_mode rendering
    parse_mode: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier payloads, oldest first
    deleted: bool = False
    delivered: bool = True  # user messages: whether the bot received it (privacy mode)

    @property
    def text(self) -> str | None:
        return self.payload.get("text")

    @property
    def caption(self) -> str | None:
        return self.payload.get("caption")

    @property
    def reply_markup(self) -> dict[str, Any] | None:
        return self.payload.get("reply_markup")

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """All inline keyboard buttons, row by row."""
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [button for row in rows for button in row]

    @property
    def versions(self) -> list[dict[str, Any]]:
        """Every version of the message, oldest first, the current one last."""
        return [*self.history, self.payload]

    @property
    def edit_count(self) -> int:
        return len(self.history)

    @property
    def has_photo(self) -> bool:
        return "photo" in self.payload

    @property
    def has_document(self) -> bool:
        return "document" in self.payload


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    filename: str | None = None
    mime_type: str | None = None


@dataclass
class SentMedia:
    """A photo or document the bot sent, with the bytes that arrived."""

    kind: str  # "photo" or "document"
    chat_id: int
    message_id: int
    data: bytes
    filename: str | None
    content_type: str | None
    caption: str | None  # as sent (before parse_mode rendering)
    parse_mode: str | None
    reply_markup: dict[str, Any] | None
    has_spoiler: bool
    file_id: str
    width: int | None = None
    height: int | None = None


@dataclass
class ChatAction:
    chat_id: int
    action: str
    at: float


@dataclass
class CallbackQueryRecord:
    """A button press injected by the test, and the bot's answerCallbackQuery (if any)."""

    id: str
    user: FakeUser
    chat_id: int
    message_id: int
    data: str
    chat_instance: str
    answer: dict[str, Any] | None = None  # params of answerCallbackQuery

    @property
    def answered(self) -> bool:
        return self.answer is not None


@dataclass
class _Fault:
    method: str | None  # lower-case method name, None = any method except getUpdates
    remaining: int
    kind: str  # "api" (JSON error), "bad_gateway" (502 text) or "drop" (connection reset)
    error_code: int = 400
    description: str = ""
    parameters: dict[str, Any] | None = None
    flood_window: bool = False

    def matches(self, method: str) -> bool:
        if self.method is None:
            return method not in _POLLING_METHODS
        return self.method == method


class BotApiError(Exception):
    """An error answer, as Telegram would send it."""

    def __init__(self, error_code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.parameters:
            data["parameters"] = self.parameters
        return data


def _bad_request(detail: str) -> BotApiError:
    return BotApiError(400, f"Bad Request: {detail}")


class MarkupError(ValueError):
    """Text that Telegram would refuse to parse for its parse_mode."""


# --------------------------------------------------------------------------------------------
# Text helpers: UTF-16 offsets, entities, parse_mode rendering
# --------------------------------------------------------------------------------------------


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: the unit of Telegram's entity offsets and lengths."""
    return len(text.encode("utf-16-le")) // 2


def detect_entities(text: str) -> list[dict[str, Any]]:
    """``bot_command`` and ``mention`` entities as Telegram would attach them to a user message."""
    found: list[tuple[int, int, str]] = []
    for kind, pattern in (("bot_command", _COMMAND_RE), ("mention", _MENTION_RE)):
        found.extend((match.start(), match.end(), kind) for match in pattern.finditer(text))
    found.sort()
    return [
        {"type": kind, "offset": utf16_len(text[:start]), "length": utf16_len(text[start:end])}
        for start, end, kind in found
    ]


_HTML_TAGS = frozenset(
    {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a", "code",
     "pre", "blockquote", "tg-emoji", "tg-time"}
)


class _TelegramHtml(HTMLParser):
    """Checks Telegram's HTML subset and collects the visible text."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self._source_lines = source.splitlines(keepends=True)
        self.stack: list[str] = []
        self.plain: list[str] = []

    def _byte_offset(self) -> int:
        line, column = self.getpos()
        if not self._source_lines:
            return 0
        before = "".join(self._source_lines[: line - 1]) + self._source_lines[line - 1][:column]
        return len(before.encode())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS or (tag == "span" and dict(attrs).get("class") != "tg-spoiler"):
            raise MarkupError(f'Unsupported start tag "{tag}" at byte offset {self._byte_offset()}')
        self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise MarkupError(f'Unsupported start tag "{tag}" at byte offset {self._byte_offset()}')

    def handle_endtag(self, tag: str) -> None:
        if not self.stack:
            raise MarkupError(f'Unexpected end tag at byte offset {self._byte_offset()}')
        if self.stack[-1] != tag:
            raise MarkupError(
                f'Unmatched end tag at byte offset {self._byte_offset()}, expected "</{self.stack[-1]}>", '
                f'found "</{tag}>"'
            )
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.plain.append(data)


def _render_html(text: str) -> str:
    parser = _TelegramHtml(text)
    parser.feed(text)
    parser.close()
    if parser.stack:
        raise MarkupError(f'Can\'t find end tag corresponding to start tag "{parser.stack[-1]}"')
    return "".join(parser.plain)


_MDV2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")


def _find_closing(text: str, marker: str, start: int) -> int:
    """Index of the next ``marker`` not escaped by a backslash, or -1."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text.startswith(marker, i):
            return i
        i += 1
    return -1


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _render_markdown(text: str, v2: bool) -> str:
    """Check Markdown (legacy or V2) like Telegram and return the visible text."""
    out: list[str] = []
    open_markers: list[tuple[str, int]] = []  # (marker, byte offset where it opened)

    def offset(index: int) -> int:
        return len(text[:index].encode())

    def toggle(marker: str, index: int) -> None:
        if open_markers and open_markers[-1][0] == marker:
            open_markers.pop()
        elif any(m == marker for m, _ in open_markers):
            raise MarkupError(f"Can't find end of the entity starting at byte offset {offset(index)}")
        else:
            open_markers.append((marker, offset(index)))

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and v2 and i + 1 < len(text) and 0 < ord(text[i + 1]) <= 126:
            out.append(text[i + 1])
            i += 2
        elif text.startswith("```", i) or char == "`":
            marker = "```" if text.startswith("```", i) else "`"
            end = _find_closing(text, marker, i + len(marker)) if v2 else text.find(marker, i + len(marker))
            if end < 0:
                raise MarkupError(f"Can't find end of the entity starting at byte offset {offset(i)}")
            body = text[i + len(marker) : end]
            if marker == "```" and "\n" in body and re.fullmatch(r"[\w+#-]*", body.split("\n", 1)[0]):
                body = body.split("\n", 1)[1]  # the first line names the language
            out.append(_unescape(body) if v2 else body)
            i = end + len(marker)
        elif char == "[":
            close = _find_closing(text, "]", i + 1) if v2 else text.find("]", i + 1)
            if close < 0 or not text.startswith("(", close + 1):
                if v2:
                    raise MarkupError("Character '[' is reserved and must be escaped with the preceding '\\'")
                out.append(char)
                i += 1
                continue
            url_end = _find_closing(text, ")", close + 2) if v2 else text.find(")", close + 2)
            if url_end < 0:
                raise MarkupError(f"Can't find end of a URL at byte offset {offset(close + 2)}")
            out.append(_render_markdown(text[i + 1 : close], v2))
            i = url_end + 1
        elif v2 and char == ">" and (i == 0 or text[i - 1] == "\n"):
            i += 1  # blockquote marker at line start
        elif v2 and (text.startswith("||", i) or text.startswith("__", i)):
            toggle(text[i : i + 2], i)
            i += 2
        elif char in "*_" or (v2 and char == "~"):
            toggle(char, i)
            i += 1
        elif v2 and char in _MDV2_RESERVED:
            raise MarkupError(f"Character '{char}' is reserved and must be escaped with the preceding '\\'")
        else:
            out.append(char)
            i += 1
    if open_markers:
        raise MarkupError(f"Can't find end of the entity starting at byte offset {open_markers[-1][1]}")
    return "".join(out)


def render_markup(text: str, parse_mode: str | None) -> str:
    """The text a user would see, or MarkupError where Telegram answers "can't parse entities"."""
    mode = (parse_mode or "").lower()
    if not mode:
        return text
    if mode == "html":
        return _render_html(text)
    if mode == "markdownv2":
        return _render_markdown(text, v2=True)
    if mode == "markdown":
        return _render_markdown(text, v2=False)
    raise MarkupError(f"Unsupported parse_mode {parse_mode!r}")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _ChangeSignal:
    """Wakes waiters whenever the fake's state changes (callable from sync code)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], T], timeout: float) -> T | None:
        """The first truthy predicate() result, or None when ``timeout`` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)


Handler = Callable[[dict[str, Any], dict[str, UploadedFile]], Awaitable[Any]]


class FakeTelegramServer:
    """Fake Bot API on 127.0.0.1. Start it with ``async with`` (or ``start()`` / ``stop()``)."""

    def __init__(
        self,
        *,
        token: str = "123456789:TEST-fake-token",
        bot_username: str = "DrawTestBot",
        bot_first_name: str = "Draw Test Bot",
        privacy_mode: bool = True,
        validate_markup: bool = True,
        max_photo_bytes: int = MAX_PHOTO_BYTES,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        bot_id, _, _ = token.partition(":")
        if not bot_id.isdigit():
            raise ValueError("token must look like '<digits>:<secret>', as Telegram tokens do")
        self.token = token
        self.bot_user = FakeUser(
            id=int(bot_id), first_name=bot_first_name, username=bot_username, language_code=None, is_bot=True
        )
        self.privacy_mode = privacy_mode
        self.validate_markup = validate_markup
        self.max_photo_bytes = max_photo_bytes
        self.max_upload_bytes = max_upload_bytes

        self.calls: list[ApiCall] = []
        self.served_errors: list[ServedError] = []
        self.chat_actions: list[ChatAction] = []
        self.sent_media: list[SentMedia] = []
        self.callback_queries: dict[str, CallbackQueryRecord] = {}
        self.conflicts = 0  # live getUpdates ended (409) by a newer overlapping getUpdates

        self._chats: dict[int, FakeChat] = {}
        self._messages: dict[int, list[StoredMessage]] = {}
        self._next_message_id: dict[int, int] = {}
        self._updates: list[dict[str, Any]] = []  # queued, not yet confirmed by an offset
        self._update_ids = itertools.count(100_001)
        self._file_ids = itertools.count(1)
        self._callback_ids = itertools.count(4_000_000_000_001)
        self._files: dict[str, StoredFile] = {}
        self._commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._faults: list[_Fault] = []
        self._flood_until: dict[str | None, float] = {}
        self._stubs: dict[str, Any] = {}
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0
        self._closing = False
        self._signal = _ChangeSignal()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

        self._handlers: dict[str, tuple[str, Handler]] = {
            name.lower(): (name, handler)
            for name, handler in {
                "getMe": self._get_me,
                "getUpdates": self._get_updates,
                "deleteWebhook": self._delete_webhook,
                "getWebhookInfo": self._get_webhook_info,
                "sendMessage": self._send_message,
                "sendPhoto": self._send_photo,
                "sendDocument": self._send_document,
                "sendChatAction": self._send_chat_action,
                "editMessageText": self._edit_message_text,
                "editMessageCaption": self._edit_message_caption,
                "editMessageReplyMarkup": self._edit_message_reply_markup,
                "answerCallbackQuery": self._answer_callback_query,
                "deleteMessage": self._delete_message,
                "setMyCommands": self._set_my_commands,
                "getMyCommands": self._get_my_commands,
                "deleteMyCommands": self._delete_my_commands,
                "getFile": self._get_file,
            }.items()
        }

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_upload_bytes + 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._closing = False

    async def stop(self) -> None:
        self._closing = True
        self._signal.notify()  # long polls return at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegramServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """For ``ApplicationBuilder().base_url(...)``: PTB appends the token."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        """For ``ApplicationBuilder().base_file_url(...)``."""
        return f"http://127.0.0.1:{self.port}/file/bot"

    def application_builder(self) -> ApplicationBuilder:
        """A PTB ApplicationBuilder with the token and both URLs pointing here."""
        from telegram.ext import ApplicationBuilder

        return ApplicationBuilder().token(self.token).base_url(self.base_url).base_file_url(self.base_file_url)

    # ---- user side: inject updates ---------------------------------------------------------

    def register_chat(self, chat: FakeChat) -> None:
        """Make a chat known (sending to an unknown chat answers "chat not found")."""
        self._chats[chat.id] = chat
        self._messages.setdefault(chat.id, [])
        self._next_message_id.setdefault(chat.id, 1)

    def send_text(
        self, chat: FakeChat, user: FakeUser, text: str, *, reply_to: StoredMessage | None = None
    ) -> StoredMessage:
        """``user`` writes ``text`` in ``chat``; the bot gets a ``message`` update (unless privacy
        mode hides it: in groups only commands for this bot, replies to the bot and mentions of it
        arrive; see ``StoredMessage.delivered``)."""
        if not text:
            raise ValueError("a Telegram message cannot be empty")
        self.register_chat(chat)
        payload: dict[str, Any] = {
            "message_id": self._take_message_id(chat.id),
            "from": user.to_api(),
            "chat": chat.to_api(),
            "date": int(time.time()),
            "text": text,
        }
        entities = detect_entities(text)
        if entities:
            payload["entities"] = entities
        if reply_to is not None:
            payload["reply_to_message"] = copy.deepcopy(reply_to.payload)
        message = StoredMessage(chat.id, payload["message_id"], payload, sent_by_bot=False, source_text=text)
        message.delivered = self._bot_sees(chat, text, entities, reply_to)
        self._messages[chat.id].append(message)
        if message.delivered:
            self.add_update({"message": copy.deepcopy(payload)})
        else:
            self._signal.notify()
        return message

    def press_button(self, message: StoredMessage, user: FakeUser, callback_data: str) -> CallbackQueryRecord:
        """``user`` taps the inline button carrying ``callback_data`` under ``message``."""
        current = self._find_message(message.chat_id, message.message_id)
        if current is None:
            raise ValueError(f"message {message.message_id} in chat {message.chat_id} does not exist (deleted?)")
        if callback_data not in [b.get("callback_data") for b in current.buttons]:
            raise ValueError(
                f"message {message.message_id} has no button with callback_data {callback_data!r}; "
                f"it has {[b.get('callback_data') for b in current.buttons]}"
            )
        record = CallbackQueryRecord(
            id=str(next(self._callback_ids)),
            user=user,
            chat_id=current.chat_id,
            message_id=current.message_id,
            data=callback_data,
            chat_instance=self.chat_instance(current.chat_id),
        )
        self.callback_queries[record.id] = record
        self.add_update(
            {
                "callback_query": {
                    "id": record.id,
                    "from": user.to_api(),
                    "message": copy.deepcopy(current.payload),
                    "chat_instance": record.chat_instance,
                    "data": callback_data,
                }
            }
        )
        return record

    def add_update(self, update: dict[str, Any]) -> int:
        """Queue any raw update body (without ``update_id``); returns the assigned update_id."""
        update_id = next(self._update_ids)
        self._updates.append({"update_id": update_id, **update})
        self._signal.notify()
        return update_id

    @staticmethod
    def chat_instance(chat_id: int) -> str:
        """A stable opaque id per chat, like Telegram's ``chat_instance``."""
        return str((abs(chat_id) * 2_654_435_761) % 9_000_000_000_000_000_000 + 10**18)

    # ---- inspection ----------------------------------------------------------------------

    def calls_to(self, *methods: str) -> list[ApiCall]:
        """Calls of the given methods (case-insensitive), in arrival order."""
        wanted = {m.lower() for m in methods}
        return [call for call in self.calls if call.method.lower() in wanted]

    def call_times(self, method: str) -> list[float]:
        """time.monotonic() arrival times of every call of ``method`` (faulted ones included)."""
        return [call.at for call in self.calls_to(method)]

    def messages(self, chat_id: int, *, include_deleted: bool = False) -> list[StoredMessage]:
        """Every message in the chat (user's and bot's), oldest first."""
        return [m for m in self._messages.get(chat_id, []) if include_deleted or not m.deleted]

    def bot_messages(self, chat_id: int, *, include_deleted: bool = False) -> list[StoredMessage]:
        return [m for m in self.messages(chat_id, include_deleted=include_deleted) if m.sent_by_bot]

    def message(self, chat_id: int, message_id: int) -> StoredMessage:
        for stored in self._messages.get(chat_id, []):
            if stored.message_id == message_id:
                return stored
        raise KeyError(f"no message {message_id} in chat {chat_id}")

    def photos(self, chat_id: int | None = None) -> list[SentMedia]:
        return [m for m in self.sent_media if m.kind == "photo" and chat_id in (None, m.chat_id)]

    def documents(self, chat_id: int | None = None) -> list[SentMedia]:
        return [m for m in self.sent_media if m.kind == "document" and chat_id in (None, m.chat_id)]

    def commands(self, scope: dict[str, Any] | None = None, language_code: str = "") -> list[dict[str, str]]:
        """The command menu the bot set for ``scope`` (default scope when None)."""
        return copy.deepcopy(self._commands.get((self._scope_key(scope), language_code), []))

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        """Updates not yet confirmed by a getUpdates offset."""
        return copy.deepcopy(self._updates)

    def count_served(self, error_code: int | None = None, method: str | None = None) -> int:
        return sum(
            1
            for e in self.served_errors
            if error_code in (None, e.error_code) and (method is None or e.method.lower() == method.lower())
        )

    @property
    def retry_after_served(self) -> int:
        """How many 429 answers were served (injected ones and flood-window repeats)."""
        return self.count_served(429)

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "") -> T:
        """Wait until ``predicate()`` is truthy (re-checked after every change); return its value.

        Raises AssertionError with the recent calls when ``timeout`` seconds pass first."""
        result = await self._signal.wait_until(predicate, timeout)
        if result:
            return result
        recent = [f"{c.method} {c.http_status} {c.params}" for c in self.calls if c.method != "getUpdates"][-10:]
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}; recent calls: {recent}")

    async def wait_for_call(self, method: str, count: int = 1, timeout: float = 5.0) -> list[ApiCall]:
        """Wait until ``method`` was called at least ``count`` times; return those calls."""
        return await self.wait_for(
            lambda: (calls if len(calls := self.calls_to(method)) >= count else None),
            timeout,
            what=f"{count} call(s) of {method}",
        )

    # ---- fault knobs ---------------------------------------------------------------------

    def inject_retry_after(
        self, method: str | None = None, *, retry_after: int = 1, count: int = 1, flood_window: bool = True
    ) -> None:
        """The next ``count`` calls of ``method`` (None: any method but getUpdates) answer 429 with
        ``parameters.retry_after``. With ``flood_window`` (Telegram's behaviour), calls in that scope
        that come back before ``retry_after`` seconds passed get another 429 (counted too)."""
        self._faults.append(
            _Fault(
                method=method.lower() if method else None,
                remaining=count,
                kind="api",
                error_code=429,
                description=f"Too Many Requests: retry after {retry_after}",
                parameters={"retry_after": retry_after},
                flood_window=flood_window,
            )
        )

    def inject_bad_request(self, method: str | None = None, *, description: str, count: int = 1) -> None:
        """The next ``count`` calls answer 400; "Bad Request: " is prefixed unless present."""
        if not description.startswith("Bad Request"):
            description = f"Bad Request: {description}"
        self.inject_error(method, error_code=400, description=description, count=count)

    def inject_error(
        self,
        method: str | None = None,
        *,
        error_code: int,
        description: str,
        count: int = 1,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        """The next ``count`` calls answer ``error_code`` with a Bot API error body
        (e.g. 403 "Forbidden: bot was blocked by the user")."""
        self._faults.append(
            _Fault(method.lower() if method else None, count, "api", error_code, description, parameters)
        )

    def inject_network_failure(self, method: str | None = None, *, count: int = 1, mode: str = "drop") -> None:
        """The next ``count`` calls fail at the transport: ``mode="drop"`` resets the connection
        without an answer, ``mode="bad_gateway"`` answers 502 with a non-JSON body (as Telegram's
        front end does). PTB raises NetworkError for both."""
        if mode not in ("drop", "bad_gateway"):
            raise ValueError("mode must be 'drop' or 'bad_gateway'")
        self._faults.append(_Fault(method.lower() if method else None, count, mode, 502, "Bad Gateway"))

    def clear_faults(self) -> None:
        self._faults.clear()
        self._flood_until.clear()

    def stub(self, method: str, result: Any) -> None:
        """Answer ``method`` (one the fake does not implement) with ``{"ok": true, "result": result}``."""
        self._stubs[method.lower()] = result

    # ---- HTTP plumbing -------------------------------------------------------------------

    @staticmethod
    def _json_response(body: dict[str, Any], status: int = 200) -> web.Response:
        # Exactly "application/json", like Telegram (no charset suffix).
        return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
        params: dict[str, Any] = {key: self._decode_form_value(key, value) for key, value in request.query.items()}
        files: dict[str, UploadedFile] = {}
        if request.method != "POST" or not request.can_read_body:
            return params, files
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError as exc:
                raise _bad_request(f"can't parse JSON body: {exc}") from exc
            if not isinstance(body, dict):
                raise _bad_request("JSON body must be an object")
            params.update(body)
            return params, files
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, web.FileField):
                files[key] = UploadedFile(key, value.filename, value.content_type, value.file.read())
            else:
                params[key] = self._decode_form_value(key, str(value))
        return params, files

    @staticmethod
    def _decode_form_value(key: str, value: str) -> Any:
        if key in _STRING_FIELDS:
            return value
        try:
            return json.loads(value)
        except ValueError:
            return value

    def _take_fault(self, method: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(method):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _flood_window_error(self, method: str) -> BotApiError | None:
        now = time.monotonic()
        for scope in (method, None):
            until = self._flood_until.get(scope)
            if until is None or (scope is None and method in _POLLING_METHODS):
                continue
            if now < until:
                wait = max(1, math.ceil(until - now))
                return BotApiError(429, f"Too Many Requests: retry after {wait}", {"retry_after": wait})
            del self._flood_until[scope]
        return None

    async def _handle_method(self, request: web.Request) -> web.StreamResponse:
        requested = request.match_info["method"]
        key = requested.lower()
        canonical = self._handlers[key][0] if key in self._handlers else requested
        call = ApiCall(canonical, {}, {}, at=time.monotonic())  # arrival time, before the body
        try:
            try:
                call.params, call.files = await self._read_params(request)
            finally:
                # Recorded once its parameters are known; every method but getUpdates is then
                # answered without yielding, so a waiter woken here already sees the outcome.
                self.calls.append(call)
                self._signal.notify()
            try:
                if request.match_info["token"] != self.token:
                    raise BotApiError(401, "Unauthorized")
                response = await self._dispatch(request, call, key)
            except BotApiError as error:
                call.error = error.body()
                response = self._json_response(error.body(), status=error.error_code)
            call.http_status = response.status
            if key in _POLLING_METHODS and response.status == 409 and not _client_gone(request):
                self.conflicts += 1  # a poll the client abandoned (Updater stopping) is no conflict
            return response
        except BotApiError as error:  # unreadable body
            call.error, call.http_status = error.body(), error.error_code
            return self._json_response(error.body(), status=error.error_code)
        finally:
            self._signal.notify()

    async def _dispatch(self, request: web.Request, call: ApiCall, key: str) -> web.StreamResponse:
        fault = self._take_fault(key)
        flood = None if fault else self._flood_window_error(key)
        if flood is not None:
            self._record_served(call, flood, from_flood_window=True)
            raise flood
        if fault is not None:
            return self._serve_fault(request, call, fault)
        if key in self._stubs:
            result = copy.deepcopy(self._stubs[key])
        elif key in self._handlers:
            result = await self._handlers[key][1](call.params, call.files)
        else:
            raise BotApiError(404, "Not Found")
        call.result = result
        return self._json_response({"ok": True, "result": result})

    def _serve_fault(self, request: web.Request, call: ApiCall, fault: _Fault) -> web.StreamResponse:
        error = BotApiError(fault.error_code, fault.description, copy.deepcopy(fault.parameters))
        self._record_served(call, error)
        if fault.flood_window and fault.parameters:
            self._flood_until[fault.method] = time.monotonic() + fault.parameters["retry_after"]
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            call.error = {"dropped": True}
            return web.Response(status=502)  # never reaches the client: the socket is gone
        if fault.kind == "bad_gateway":
            call.error = {"bad_gateway": True}
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        raise error

    def _record_served(self, call: ApiCall, error: BotApiError, from_flood_window: bool = False) -> None:
        retry_after = (error.parameters or {}).get("retry_after")
        self.served_errors.append(
            ServedError(call.method, error.error_code, error.description, call.at, retry_after, from_flood_window)
        )

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401, text="Unauthorized")
        path = request.match_info["path"]
        for stored in self._files.values():
            if stored.file_path == path:
                return web.Response(body=stored.data, content_type=stored.mime_type or "application/octet-stream")
        return web.Response(status=404, text="Not Found")

    # ---- shared pieces for the methods ---------------------------------------------------

    def _take_message_id(self, chat_id: int) -> int:
        message_id = self._next_message_id[chat_id]
        self._next_message_id[chat_id] = message_id + 1
        return message_id

    def _bot_sees(
        self, chat: FakeChat, text: str, entities: list[dict[str, Any]], reply_to: StoredMessage | None
    ) -> bool:
        if not chat.is_group or not self.privacy_mode:
            return True
        if reply_to is not None and reply_to.sent_by_bot:
            return True
        bot_name = (self.bot_user.username or "").lower()
        first = entities[0] if entities else None
        if first and first["type"] == "bot_command" and first["offset"] == 0:
            _, _, addressee = text[1 : first["length"]].partition("@")
            return addressee.lower() in ("", bot_name)
        return f"@{bot_name}" in text.lower()

    def _chat(self, params: dict[str, Any]) -> FakeChat:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise _bad_request("chat_id is empty")
        if isinstance(raw, str) and raw.lstrip("-").isdigit():
            raw = int(raw)
        if isinstance(raw, int) and raw in self._chats:
            return self._chats[raw]
        if isinstance(raw, str):
            for chat in self._chats.values():
                if chat.username and f"@{chat.username}".lower() == raw.lower():
                    return chat
        raise _bad_request("chat not found")

    def _find_message(self, chat_id: int, message_id: Any) -> StoredMessage | None:
        for stored in self._messages.get(chat_id, []):
            if stored.message_id == message_id and not stored.deleted:
                return stored
        return None

    def _render(self, text: str, parse_mode: str | None) -> str:
        if not self.validate_markup:
            return text
        try:
            return render_markup(text, parse_mode)
        except MarkupError as exc:
            raise _bad_request(f"can't parse entities: {exc}") from exc

    @staticmethod
    def _inline_markup(params: dict[str, Any]) -> dict[str, Any] | None:
        """The inline keyboard to show on the message (other keyboards are not part of a Message)."""
        markup = params.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _bad_request("can't parse reply keyboard markup JSON object")
        if "inline_keyboard" not in markup:
            return None
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise _bad_request("field \"inline_keyboard\" of the InlineKeyboardMarkup must be an Array of Arrays")
        text_only = "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
        for button in (b for row in rows for b in row):
            if not isinstance(button, dict) or not button.get("text") or len(button) < 2:
                raise _bad_request(text_only)
            data = button.get("callback_data")
            if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA_BYTES:
                raise _bad_request("BUTTON_DATA_INVALID")
        return copy.deepcopy(markup) if rows else None

    def _new_bot_message(self, chat: FakeChat, params: dict[str, Any]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "message_id": self._take_message_id(chat.id),
            "from": self.bot_user.to_api(),
            "chat": chat.to_api(),
            "date": int(time.time()),
        }
        reply_to = self._reply_target(chat, params)
        if reply_to is not None:
            payload["reply_to_message"] = copy.deepcopy(reply_to.payload)
        return payload

    def _reply_target(self, chat: FakeChat, params: dict[str, Any]) -> StoredMessage | None:
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id, allow_missing = reply.get("message_id"), bool(reply.get("allow_sending_without_reply"))
        elif params.get("reply_to_message_id") is not None:
            message_id, allow_missing = params["reply_to_message_id"], bool(params.get("allow_sending_without_reply"))
        else:
            return None
        target = self._find_message(chat.id, message_id)
        if target is None and not allow_missing:
            raise _bad_request("message to be replied not found")
        return target

    def _store_bot_message(
        self, chat: FakeChat, payload: dict[str, Any], source_text: str | None, parse_mode: str | None
    ) -> StoredMessage:
        stored = StoredMessage(chat.id, payload["message_id"], payload, True, source_text, parse_mode)
        self._messages[chat.id].append(stored)
        return stored

    def _store_file(self, kind: str, data: bytes, filename: str | None, mime_type: str | None) -> StoredFile:
        number = next(self._file_ids)
        extension = (filename or "").rpartition(".")[2] or "bin"
        stored = StoredFile(
            file_id=f"{kind}-{number:06d}-fake",
            file_unique_id=f"u{number:06d}",
            file_path=f"{kind}s/file_{number}.{extension}",
            data=data,
            filename=filename,
            mime_type=mime_type,
        )
        self._files[stored.file_id] = stored
        return stored

    def _input_file(self, field_name: str, params: dict[str, Any], files: dict[str, UploadedFile]) -> UploadedFile:
        """The uploaded part for ``field_name``, or a file sent before, given by its file_id."""
        if field_name in files:
            upload = files[field_name]
        else:
            value = params.get(field_name)
            if isinstance(value, str) and value.startswith("attach://") and value[9:] in files:
                upload = files[value[9:]]
            elif isinstance(value, str) and value in self._files:
                known = self._files[value]
                upload = UploadedFile(field_name, known.filename, known.mime_type, known.data)
            elif value:
                # URLs cannot be fetched offline; unknown ids are refused the same way by Telegram.
                raise _bad_request("wrong file identifier/HTTP URL specified")
            else:
                raise _bad_request(f"there is no {field_name} in the request")
        if not upload.data:
            raise _bad_request("file must be non-empty")
        if len(upload.data) > self.max_upload_bytes:
            raise BotApiError(413, "Request Entity Too Large")
        return upload

    def _caption(self, params: dict[str, Any]) -> tuple[str | None, str | None]:
        caption, parse_mode = params.get("caption"), params.get("parse_mode") or None
        if caption is None or caption == "":
            return None, parse_mode
        rendered = self._render(str(caption), parse_mode)
        if len(rendered) > MAX_CAPTION_CHARS:
            raise _bad_request("message caption is too long")
        return rendered, parse_mode

    def _editable(self, params: dict[str, Any]) -> StoredMessage:
        if params.get("inline_message_id"):
            raise _bad_request("inline messages are not supported by this fake")
        chat = self._chat(params)
        stored = self._find_message(chat.id, params.get("message_id"))
        if stored is None:
            raise _bad_request("message to edit not found")
        if not stored.sent_by_bot:
            raise _bad_request("message can't be edited")
        return stored

    @staticmethod
    def _apply_edit(stored: StoredMessage, new_payload: dict[str, Any]) -> dict[str, Any]:
        stored.history.append(stored.payload)
        new_payload["edit_date"] = int(time.time())
        stored.payload = new_payload
        return copy.deepcopy(new_payload)

    @staticmethod
    def _scope_key(scope: Any) -> str:
        return json.dumps(scope if scope else {"type": "default"}, sort_keys=True)

    # ---- Bot API methods -----------------------------------------------------------------

    async def _get_me(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        return {
            **self.bot_user.to_api(),
            "can_join_groups": True,
            "can_read_all_group_messages": not self.privacy_mode,
            "supports_inline_queries": False,
        }

    async def _delete_webhook(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _get_webhook_info(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        return {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._updates)}

    async def _get_updates(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        timeout = min(max(float(params.get("timeout") or 0), 0.0), MAX_POLL_TIMEOUT_S)
        allowed = params.get("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = allowed or None  # Telegram remembers the last list given
        # An offset confirms every update before it, as in Telegram.
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]
        if self._allowed_updates:
            self._updates = [u for u in self._updates if set(u) - {"update_id"} <= set(self._allowed_updates)]

        self._poll_generation += 1
        generation = self._poll_generation

        def ready() -> bool:
            return bool(self._updates) or self._closing or self._poll_generation != generation

        if not self._updates and timeout > 0:
            await self._signal.wait_until(ready, timeout)
        if self._poll_generation != generation:
            raise BotApiError(
                409, "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
            )
        return copy.deepcopy(self._updates[:limit])

    async def _send_message(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        chat = self._chat(params)
        text = params.get("text")
        if text is None or str(text).strip() == "":
            raise _bad_request("message text is empty")
        parse_mode = params.get("parse_mode") or None
        rendered = self._render(str(text), parse_mode)
        if rendered.strip() == "":
            raise _bad_request("message text is empty")
        if len(rendered) > MAX_TEXT_CHARS:
            raise _bad_request("message is too long")
        markup = self._inline_markup(params)
        payload = self._new_bot_message(chat, params)
        payload["text"] = rendered
        if markup:
            payload["reply_markup"] = markup
        self._store_bot_message(chat, payload, str(text), parse_mode)
        return copy.deepcopy(payload)

    async def _send_photo(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        chat = self._chat(params)
        upload = self._input_file("photo", params, files)
        if len(upload.data) > self.max_photo_bytes:
            raise _bad_request("PHOTO_SAVE_FILE_INVALID")
        width, height = _image_size(upload.data)
        if width + height > MAX_PHOTO_SIDE_SUM or max(width, height) > MAX_PHOTO_RATIO * min(width, height):
            raise _bad_request("PHOTO_INVALID_DIMENSIONS")
        caption, parse_mode = self._caption(params)
        markup = self._inline_markup(params)
        stored_file = self._store_file("photo", upload.data, upload.filename, upload.content_type)
        payload = self._new_bot_message(chat, params)
        payload["photo"] = _photo_sizes(stored_file, width, height)
        for size in payload["photo"]:  # thumbnails download as the original bytes
            self._files.setdefault(size["file_id"], stored_file)
        if caption is not None:
            payload["caption"] = caption
        if params.get("has_spoiler"):
            payload["has_media_spoiler"] = True
        if markup:
            payload["reply_markup"] = markup
        self._store_bot_message(chat, payload, *_caption_source(params, parse_mode))
        self.sent_media.append(
            SentMedia(
                "photo", chat.id, payload["message_id"], upload.data, upload.filename, upload.content_type,
                params.get("caption"), parse_mode, markup, bool(params.get("has_spoiler")), stored_file.file_id,
                width, height,
            )
        )
        return copy.deepcopy(payload)

    async def _send_document(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        chat = self._chat(params)
        upload = self._input_file("document", params, files)
        caption, parse_mode = self._caption(params)
        markup = self._inline_markup(params)
        stored_file = self._store_file("document", upload.data, upload.filename, upload.content_type)
        payload = self._new_bot_message(chat, params)
        payload["document"] = {
            "file_id": stored_file.file_id,
            "file_unique_id": stored_file.file_unique_id,
            "file_size": len(upload.data),
            **({"file_name": upload.filename} if upload.filename else {}),
            **({"mime_type": upload.content_type} if upload.content_type else {}),
        }
        if caption is not None:
            payload["caption"] = caption
        if markup:
            payload["reply_markup"] = markup
        self._store_bot_message(chat, payload, *_caption_source(params, parse_mode))
        self.sent_media.append(
            SentMedia(
                "document", chat.id, payload["message_id"], upload.data, upload.filename, upload.content_type,
                params.get("caption"), parse_mode, markup, bool(params.get("has_spoiler")), stored_file.file_id,
            )
        )
        return copy.deepcopy(payload)

    async def _send_chat_action(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        chat = self._chat(params)
        action = params.get("action")
        if action not in CHAT_ACTIONS:
            raise _bad_request("wrong parameter action in request")
        self.chat_actions.append(ChatAction(chat.id, action, time.monotonic()))
        return True

    async def _edit_message_text(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        stored = self._editable(params)
        if "text" not in stored.payload:
            raise _bad_request("there is no text in the message to edit")
        text = params.get("text")
        if text is None or str(text).strip() == "":
            raise _bad_request("message text is empty")
        parse_mode = params.get("parse_mode") or None
        rendered = self._render(str(text), parse_mode)
        if len(rendered) > MAX_TEXT_CHARS:
            raise _bad_request("message is too long")
        # Leaving reply_markup out removes the keyboard, as in Telegram.
        markup = self._inline_markup(params)
        if (
            rendered == stored.payload["text"]
            and (str(text), parse_mode) == (stored.source_text, stored.parse_mode)
            and markup == stored.reply_markup
        ):
            raise _bad_request(NOT_MODIFIED.removeprefix("Bad Request: "))
        new_payload = {k: v for k, v in copy.deepcopy(stored.payload).items() if k != "reply_markup"}
        new_payload["text"] = rendered
        if markup:
            new_payload["reply_markup"] = markup
        stored.source_text, stored.parse_mode = str(text), parse_mode
        return self._apply_edit(stored, new_payload)

    async def _edit_message_caption(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        stored = self._editable(params)
        if not (stored.has_photo or stored.has_document):
            raise _bad_request("there is no caption in the message to edit")
        caption, parse_mode = self._caption(params)
        markup = self._inline_markup(params)
        source = params.get("caption") or None
        parse_mode = parse_mode if source else None  # without a caption the mode means nothing
        if (caption, source, parse_mode, markup) == (
            stored.caption, stored.source_text, stored.parse_mode, stored.reply_markup
        ):
            raise _bad_request(NOT_MODIFIED.removeprefix("Bad Request: "))
        new_payload = {k: v for k, v in copy.deepcopy(stored.payload).items() if k not in ("reply_markup", "caption")}
        if caption is not None:
            new_payload["caption"] = caption
        if markup:
            new_payload["reply_markup"] = markup
        stored.source_text, stored.parse_mode = source, parse_mode
        return self._apply_edit(stored, new_payload)

    async def _edit_message_reply_markup(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> dict[str, Any]:
        stored = self._editable(params)
        markup = self._inline_markup(params)
        if markup == stored.reply_markup:
            raise _bad_request(NOT_MODIFIED.removeprefix("Bad Request: "))
        new_payload = {k: v for k, v in copy.deepcopy(stored.payload).items() if k != "reply_markup"}
        if markup:
            new_payload["reply_markup"] = markup
        return self._apply_edit(stored, new_payload)

    async def _answer_callback_query(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        record = self.callback_queries.get(str(params.get("callback_query_id")))
        if record is None or record.answered:
            raise _bad_request("query is too old and response timeout expired or query ID is invalid")
        text = params.get("text")
        if text is not None and len(str(text)) > 200:
            raise _bad_request("MESSAGE_TOO_LONG")
        record.answer = {k: v for k, v in params.items() if k != "callback_query_id"}
        return True

    async def _delete_message(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        chat = self._chat(params)
        stored = self._find_message(chat.id, params.get("message_id"))
        if stored is None:
            raise _bad_request("message to delete not found")
        stored.deleted = True
        return True

    async def _set_my_commands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad_request("commands must be an array of at most 100 BotCommand")
        for command in commands:
            if not isinstance(command, dict) or not _BOT_COMMAND_NAME_RE.match(str(command.get("command", ""))):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        key = (self._scope_key(params.get("scope")), str(params.get("language_code") or ""))
        self._commands[key] = [{"command": c["command"], "description": c["description"]} for c in commands]
        return True

    async def _get_my_commands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> list[dict[str, str]]:
        return self.commands(params.get("scope"), str(params.get("language_code") or ""))

    async def _delete_my_commands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        self._commands.pop((self._scope_key(params.get("scope")), str(params.get("language_code") or "")), None)
        return True

    async def _get_file(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> dict[str, Any]:
        stored = self._files.get(str(params.get("file_id")))
        if stored is None:
            raise _bad_request("invalid file_id")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.data),
            "file_path": stored.file_path,
        }


def _caption_source(params: dict[str, Any], parse_mode: str | None) -> tuple[str | None, str | None]:
    """The caption as sent and its parse_mode, both None when there is no caption."""
    source = params.get("caption") or None
    return source, (parse_mode if source else None)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height of an uploaded photo; Telegram refuses what it cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise _bad_request("IMAGE_PROCESS_FAILED") from exc


def _photo_sizes(stored: StoredFile, width: int, height: int) -> list[dict[str, Any]]:
    """PhotoSize list like Telegram's: thumbnails up to the (at most 2560 px) full size, smallest
    first. All point at the uploaded bytes (the fake does not resample)."""
    sides = [side for side in (90, 320, 800, 1280) if side < max(width, height)] + [min(max(width, height), 2560)]
    sizes = []
    for index, side in enumerate(sides):
        scale = side / max(width, height)
        size: dict[str, Any] = {
            "file_id": stored.file_id if index == len(sides) - 1 else f"{stored.file_id}-{side}",
            "file_unique_id": f"{stored.file_unique_id}-{side}",
            "width": max(1, round(width * scale)),
            "height": max(1, round(height * scale)),
        }
        if index == len(sides) - 1:
            size["file_size"] = len(stored.data)
        sizes.append(size)
    return sizes


@contextlib.asynccontextmanager
async def polling_application(application: Application, *, poll_timeout: int = 1) -> AsyncIterator[Application]:
    """Run a PTB Application with long polling for the body of the ``async with`` and stop it
    cleanly afterwards (short poll timeout so stopping is quick)."""
    async with application:
        assert application.updater is not None, "build the Application with an Updater"
        await application.updater.start_polling(timeout=poll_timeout, poll_interval=0)
        await application.start()
        try:
            yield application
        finally:
            await application.updater.stop()
            await application.stop()
