"""A fake Discord gateway + REST server on loopback, for end-to-end tests of the real discord.py client.

One aiohttp app on 127.0.0.1 (random free port) speaks the parts of Discord a slash-command bot touches:

* WebSocket gateway at ``/gateway``: HELLO -> IDENTIFY -> READY (+ ``application``) -> GUILD_CREATE per guild,
  heartbeat ACKs, RESUME (replays missed events, or invalidates the session to force a fresh IDENTIFY),
  INTERACTION_CREATE for injected user actions, MESSAGE_CREATE/UPDATE/DELETE for the bot's own messages.
* REST under ``/api/v10``: users, application info, command sync, interaction callbacks, interaction
  webhooks (follow-ups, ``@original``), channel messages, DMs; multipart uploads are recorded byte for byte.
* Discord's windows, on an injectable clock: the first callback must arrive within 3 s of INTERACTION_CREATE
  (else 404 ``Unknown interaction``, code 10062), and an interaction token is dead after 15 min
  (401 ``Invalid Webhook Token``, code 50027).

Point discord.py at it with ``discord.http.Route.BASE = fake.api_base`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)``.

Payload shapes follow discord.py's ``discord/types/*.py`` TypedDicts and Discord's API docs; error bodies
follow Discord's ``{"message", "code", "errors"}`` form. Known simplifications are listed in ``FakeDiscord``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import re
import secrets
import struct
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import pytest
from aiohttp import WSMsgType, web

if TYPE_CHECKING:  # discord.py is only needed by ``running_client``
    import discord

T = TypeVar("T")

DEFAULT_TOKEN = "ZmFrZS1ib3Q.fake.token-for-tests"
DISCORD_EPOCH_MS = 1_420_070_400_000
ACK_WINDOW_S = 3.0  # first interaction response deadline
TOKEN_LIFETIME_S = 15 * 60.0  # interaction webhook token lifetime
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024  # Discord's default upload limit (non-boosted guild)


class Perm:
    """Permission bits (Discord "Permissions" docs)."""

    ADD_REACTIONS = 1 << 6
    ADMINISTRATOR = 1 << 3
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    BAN_MEMBERS = 1 << 2
    MANAGE_GUILD = 1 << 5
    USE_APPLICATION_COMMANDS = 1 << 31
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1


DEFAULT_EVERYONE_PERMISSIONS = (
    Perm.VIEW_CHANNEL | Perm.SEND_MESSAGES | Perm.READ_MESSAGE_HISTORY | Perm.EMBED_LINKS | Perm.ATTACH_FILES
    | Perm.ADD_REACTIONS | Perm.USE_EXTERNAL_EMOJIS | Perm.USE_APPLICATION_COMMANDS | Perm.SEND_MESSAGES_IN_THREADS
)
# The bot may mention @everyone by default so that a careless message really would ping everyone.
DEFAULT_BOT_PERMISSIONS = DEFAULT_EVERYONE_PERMISSIONS | Perm.MENTION_EVERYONE
DM_APP_PERMISSIONS = DEFAULT_EVERYONE_PERMISSIONS


class Intent:
    """Gateway intent bits."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT


# Application flags: the three "limited" gateway intents are enabled (what a small bot has).
DEFAULT_APPLICATION_FLAGS = (1 << 13) | (1 << 15) | (1 << 19)

MSG_FLAG_SUPPRESS_EMBEDS = 1 << 2
MSG_FLAG_EPHEMERAL = 1 << 6
MSG_FLAG_LOADING = 1 << 7
MSG_FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
MSG_FLAG_COMPONENTS_V2 = 1 << 15
_SENDABLE_FLAGS = MSG_FLAG_SUPPRESS_EMBEDS | MSG_FLAG_SUPPRESS_NOTIFICATIONS | MSG_FLAG_COMPONENTS_V2
_INTERACTION_SENDABLE_FLAGS = _SENDABLE_FLAGS | MSG_FLAG_EPHEMERAL


# --------------------------------------------------------------------------------------------------- clock


class Clock(Protocol):
    """What the fake needs from a clock: monotonic seconds for the windows, wall seconds for timestamps."""

    def now(self) -> float: ...

    def wall(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class FakeClock:
    """Real time plus a manual offset (``advance``); ``frozen=True`` stops real time so only ``advance`` moves it."""

    def __init__(self, *, frozen: bool = False, start_wall: float | None = None) -> None:
        self._frozen = frozen
        self._origin = time.monotonic()
        self._wall_origin = time.time() if start_wall is None else start_wall
        self._offset = 0.0

    def now(self) -> float:
        elapsed = 0.0 if self._frozen else time.monotonic() - self._origin
        return self._origin + elapsed + self._offset

    def wall(self) -> float:
        return self._wall_origin + (self.now() - self._origin)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._offset += seconds


class _Snowflakes:
    """Discord snowflakes whose timestamp comes from the fake's wall clock (``Interaction.created_at`` relies on it)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last = 0

    def next(self) -> int:
        ms = int(self._clock.wall() * 1000) - DISCORD_EPOCH_MS
        self._last = max(ms << 22, self._last + 1)
        return self._last


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=timezone.utc).isoformat()


# --------------------------------------------------------------------------------------------------- models


@dataclass(eq=False)
class FakeUser:
    """A Discord user. ``dms_open=False`` makes DMs to this user fail with 50007."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    dms_open: bool = True

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "username": self.username, "discriminator": "0", "global_name": self.global_name,
            "avatar": None, "bot": self.bot, "system": False, "public_flags": 0,
        }


@dataclass(eq=False)
class FakeRole:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    mentionable: bool = False
    managed: bool = False

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "name": self.name, "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False, "position": self.position, "permissions": str(self.permissions), "managed": self.managed,
            "mentionable": self.mentionable, "flags": 0, "icon": None, "unicode_emoji": None,
        }


@dataclass(eq=False)
class FakeChannel:
    """A guild text channel (type 0) or a DM (type 1, ``recipient`` set)."""

    id: int
    name: str
    type: int = 0
    guild_id: int | None = None
    nsfw: bool = False
    position: int = 0
    topic: str | None = None
    recipient: FakeUser | None = None

    @property
    def is_dm(self) -> bool:
        return self.type == 1

    def payload(self) -> dict[str, Any]:
        if self.is_dm:
            assert self.recipient is not None
            return {"id": str(self.id), "type": 1, "last_message_id": None, "flags": 0,
                    "recipients": [self.recipient.payload()]}
        return {
            "id": str(self.id), "type": self.type, "guild_id": str(self.guild_id), "name": self.name,
            "position": self.position, "permission_overwrites": [], "nsfw": self.nsfw, "parent_id": None,
            "topic": self.topic, "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }


@dataclass(eq=False)
class FakeMember:
    user: FakeUser
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_wall: float = 0.0

    def payload(self, *, with_user: bool = True, permissions: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(r) for r in self.roles], "nick": self.nick, "avatar": None, "banner": None,
            "joined_at": _iso(self.joined_wall), "premium_since": None, "deaf": False, "mute": False,
            "pending": False, "flags": 0, "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass(eq=False)
class FakeGuild:
    """A guild. ``roles[0]`` is @everyone (same id as the guild). Channel permission overwrites are not modelled."""

    id: int
    name: str
    owner_id: int
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    members: dict[int, FakeMember] = field(default_factory=dict)
    locale: str = "en-US"
    features: list[str] = field(default_factory=list)
    joined_wall: float = 0.0

    @property
    def everyone_role(self) -> FakeRole:
        return self.roles[0]

    @property
    def text_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels if c.type == 0]

    def channel(self, name: str) -> FakeChannel:
        for chan in self.channels:
            if chan.name == name:
                return chan
        raise LookupError(f"guild {self.name!r} has no channel named {name!r}")

    def role(self, name: str) -> FakeRole:
        for role in self.roles:
            if role.name == name:
                return role
        raise LookupError(f"guild {self.name!r} has no role named {name!r}")

    def permissions_for(self, user_id: int) -> int:
        """Guild-level permissions: owner and ADMINISTRATOR get everything; otherwise @everyone | member roles."""
        if user_id == self.owner_id:
            return Perm.ALL
        member = self.members.get(user_id)
        value = self.everyone_role.permissions
        if member is not None:
            for role in self.roles:
                if role.id in member.roles:
                    value |= role.permissions
        return Perm.ALL if value & Perm.ADMINISTRATOR else value


@dataclass(frozen=True)
class FakeUpload:
    """A file a user attaches to a slash-command ATTACHMENT option."""

    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(eq=False)
class FakeAttachment:
    id: int
    filename: str
    data: bytes
    content_type: str
    url: str
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def spoiler(self) -> bool:
        return self.filename.startswith("SPOILER_")

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "filename": self.filename, "size": self.size, "url": self.url,
            "proxy_url": self.url, "content_type": self.content_type, "flags": 0,
        }
        dims = _image_size(self.data)
        if dims is not None:
            data["width"], data["height"] = dims
        if self.description is not None:
            data["description"] = self.description
        if self.spoiler:
            data["spoiler"] = True
        return data


@dataclass(frozen=True)
class Pings:
    """Who a message version would notify under its allowed_mentions (content only; embeds never ping)."""

    everyone: bool = False
    users: frozenset[int] = frozenset()
    roles: frozenset[int] = frozenset()


@dataclass(frozen=True)
class MessageVersion:
    """One state of a message: the initial send, then one per edit. ``at`` is fake-clock time."""

    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: tuple[FakeAttachment, ...]
    flags: int
    allowed_mentions: dict[str, Any] | None
    pings: Pings
    at: float
    wall: float


@dataclass(eq=False)
class FakeMessage:
    """A message the bot created. ``kind``: "channel", "interaction_response" (an ``@original``) or "followup"."""

    id: int
    channel_id: int
    guild_id: int | None
    author: FakeUser
    kind: str
    type: int
    versions: list[MessageVersion]
    created_wall: float
    interaction_id: int | None = None
    webhook_id: int | None = None
    reference: dict[str, Any] | None = None
    deleted: bool = False

    @property
    def current(self) -> MessageVersion:
        return self.versions[-1]

    @property
    def content(self) -> str:
        return self.current.content

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.current.embeds

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.current.components

    @property
    def attachments(self) -> tuple[FakeAttachment, ...]:
        return self.current.attachments

    @property
    def flags(self) -> int:
        return self.current.flags

    @property
    def allowed_mentions(self) -> dict[str, Any] | None:
        return self.current.allowed_mentions

    @property
    def pings(self) -> Pings:
        return self.current.pings

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MSG_FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & MSG_FLAG_LOADING)

    @property
    def edit_count(self) -> int:
        return len(self.versions) - 1

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in _walk_components(self.components) if "custom_id" in c]

    def component(self, custom_id: str) -> dict[str, Any] | None:
        for comp in _walk_components(self.components):
            if comp.get("custom_id") == custom_id:
                return comp
        return None


@dataclass(frozen=True)
class UploadedFile:
    """A multipart file part exactly as received."""

    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass(eq=False)
class RestCall:
    """One REST request as the fake saw it.

    ``route`` is the key ``fail_next``/``calls_to`` use, e.g. "POST /channels/{channel_id}/messages".
    """

    method: str
    path: str
    route: str | None
    params: dict[str, str]
    query: dict[str, str]
    json: Any
    files: list[UploadedFile]
    at: float
    status: int = 0
    response: Any = None
    interaction_id: int | None = None
    faulted: bool = False

    @property
    def error_code(self) -> int | None:
        if self.status >= 400 and isinstance(self.response, dict):
            return self.response.get("code")
        return None


@dataclass(eq=False)
class CommandSync:
    """One bulk overwrite (``tree.sync``). ``guild_id`` None = global. Names are split by what Discord did with them."""

    guild_id: int | None
    commands: list[dict[str, Any]]
    created: list[str]
    updated: list[str]
    unchanged: list[str]
    deleted: list[str]
    at: float


@dataclass(eq=False)
class FakeInteraction:
    """An interaction the fake dispatched, and what the bot did with it.

    ``callback_type`` / ``callback_at`` are set by the first accepted callback; ``calls`` are the REST calls made
    with this interaction's id or token (rejected ones included).
    """

    id: int
    token: str
    type: int
    user: FakeUser
    guild_id: int | None
    channel_id: int
    data: dict[str, Any]
    payload: dict[str, Any]
    created_at: float
    _messages: dict[int, FakeMessage] = field(repr=False)
    message_id: int | None = None
    callback_type: int | None = None
    callback_at: float | None = None
    callback_data: dict[str, Any] | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    calls: list[RestCall] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None

    @property
    def callback_delay(self) -> float | None:
        return None if self.callback_at is None else self.callback_at - self.created_at

    @property
    def original(self) -> FakeMessage | None:
        return None if self.original_message_id is None else self._messages.get(self.original_message_id)

    @property
    def followups(self) -> list[FakeMessage]:
        """Messages sent through the follow-up webhook; after a type-5 defer the first one IS the original message."""
        return [self._messages[i] for i in self.followup_ids]

    @property
    def modal(self) -> dict[str, Any] | None:
        return self.callback_data if self.callback_type == 9 else None

    @property
    def rejected_calls(self) -> list[RestCall]:
        return [c for c in self.calls if c.status >= 400]


class DiscordAPIError(Exception):
    """An error answer in Discord's shape; raised inside handlers, turned into the HTTP response."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {message} (code {code})")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def _unknown_interaction() -> DiscordAPIError:
    return DiscordAPIError(404, 10062, "Unknown interaction")


def _invalid_webhook_token() -> DiscordAPIError:
    return DiscordAPIError(401, 50027, "Invalid Webhook Token")


def _unknown_webhook() -> DiscordAPIError:
    return DiscordAPIError(404, 10015, "Unknown Webhook")


def _unknown_message() -> DiscordAPIError:
    return DiscordAPIError(404, 10008, "Unknown Message")


def _unknown_channel() -> DiscordAPIError:
    return DiscordAPIError(404, 10003, "Unknown Channel")


def _missing_permissions() -> DiscordAPIError:
    return DiscordAPIError(403, 50013, "Missing Permissions")


def _form_error(path: str, code: str, message: str) -> DiscordAPIError:
    """400 Invalid Form Body with Discord's nested ``errors`` object (``a.b.0.c`` -> nested keys)."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return DiscordAPIError(400, 50035, "Invalid Form Body", errors)


class FakeServerError(AssertionError):
    """The fake itself failed while handling a request (a bug in the fake or an unsupported request shape)."""


class ClientCrashed(AssertionError):
    """A client task watched by the fake ended while a test was waiting on it."""


# --------------------------------------------------------------------------------------------------- helpers


def _walk_components(components: Iterable[Mapping[str, Any]]) -> Iterable[dict[str, Any]]:
    for comp in components:
        yield comp  # type: ignore[misc]
        yield from _walk_components(comp.get("components") or [])
        for key in ("component", "accessory"):
            if isinstance(comp.get(key), dict):
                yield from _walk_components([comp[key]])


def _image_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return None


def _content_type(filename: str, data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE = re.compile(r"@(everyone|here)\b")


def compute_pings(content: str, allowed_mentions: Mapping[str, Any] | None, *, can_mention_everyone: bool,
                  replied_author: int | None = None) -> Pings:
    """Discord's allowed-mentions rules: no object = parse everything; otherwise only what ``parse``/ids permit."""
    users = {int(u) for u in _USER_MENTION.findall(content)}
    roles = {int(r) for r in _ROLE_MENTION.findall(content)}
    everyone = bool(_EVERYONE.search(content))
    if allowed_mentions is None:
        parse, user_ids, role_ids, replied = {"users", "roles", "everyone"}, set(), set(), True
    else:
        parse = set(allowed_mentions.get("parse") or [])
        user_ids = {int(u) for u in allowed_mentions.get("users") or []}
        role_ids = {int(r) for r in allowed_mentions.get("roles") or []}
        replied = bool(allowed_mentions.get("replied_user", False))
    pinged_users = {u for u in users if "users" in parse or u in user_ids}
    if replied and replied_author is not None:
        pinged_users.add(replied_author)
    return Pings(
        everyone=everyone and "everyone" in parse and can_mention_everyone,
        users=frozenset(pinged_users),
        roles=frozenset(r for r in roles if "roles" in parse or r in role_ids),
    )


def _validate_allowed_mentions(am: Any) -> None:
    if am is None:
        return
    if not isinstance(am, dict):
        raise _form_error("allowed_mentions", "MODEL_TYPE_CONVERT", "Must be an object.")
    parse = am.get("parse") or []
    for value in parse:
        if value not in ("users", "roles", "everyone"):
            raise _form_error("allowed_mentions.parse", "ENUM_TYPE_COERCE",
                              f"Value {value!r} is not a valid enum value.")
    for kind in ("users", "roles"):
        if kind in parse and am.get(kind):
            raise _form_error("allowed_mentions", "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                              f"parse:[\"{kind}\"] and {kind}: [ids] are mutually exclusive.")
        if len(am.get(kind) or []) > 100:
            raise _form_error(f"allowed_mentions.{kind}", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")


_EMBED_LIMITS = {"title": 256, "description": 4096}


def _validate_embeds(embeds: Any) -> None:
    if not isinstance(embeds, list):
        raise _form_error("embeds", "BASE_TYPE_LIST", "Must be an array.")
    if len(embeds) > 10:
        raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    total = 0
    for i, embed in enumerate(embeds):
        for key, limit in _EMBED_LIMITS.items():
            text = embed.get(key) or ""
            total += len(text)
            if len(text) > limit:
                raise _form_error(f"embeds.{i}.{key}", "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")
        fields = embed.get("fields") or []
        if len(fields) > 25:
            raise _form_error(f"embeds.{i}.fields", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        for j, fld in enumerate(fields):
            for key, limit in (("name", 256), ("value", 1024)):
                text = str(fld.get(key) or "")
                total += len(text)
                if not text or len(text) > limit:
                    raise _form_error(f"embeds.{i}.fields.{j}.{key}", "BASE_TYPE_BAD_LENGTH",
                                      f"Must be between 1 and {limit} in length.")
        footer = (embed.get("footer") or {}).get("text") or ""
        author = (embed.get("author") or {}).get("name") or ""
        total += len(footer) + len(author)
        if len(footer) > 2048 or len(author) > 256:
            raise _form_error(f"embeds.{i}", "BASE_TYPE_MAX_LENGTH", "Embed footer/author too long.")
    if total > 6000:
        raise _form_error("embeds", "MESSAGE_EMBED_TOO_LARGE", "Embed size exceeds maximum size of 6000")


def _validate_components(components: Any, *, components_v2: bool) -> None:
    if not isinstance(components, list):
        raise _form_error("components", "BASE_TYPE_LIST", "Must be an array.")
    if not components_v2 and len(components) > 5:
        raise _form_error("components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    seen: set[str] = set()
    for i, row in enumerate(components):
        if not components_v2 and row.get("type") != 1:
            raise _form_error(f"components.{i}.type", "UNION_TYPE_CHOICES",
                              "Value of field \"type\" must be one of (1,).")
        if row.get("type") == 1 and len(row.get("components") or []) > 5:
            raise _form_error(f"components.{i}.components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    for comp in _walk_components(components):
        custom_id = comp.get("custom_id")
        if comp.get("type") == 2 and comp.get("style") == 5:
            if not comp.get("url") or custom_id is not None:
                raise _form_error("components", "BUTTON_COMPONENT_URL_REQUIRED",
                                  "Link buttons need a url and no custom_id.")
            continue
        if comp.get("type") in (2, 3, 4, 5, 6, 7, 8):
            if not custom_id or len(custom_id) > 100:
                raise _form_error("components", "BASE_TYPE_BAD_LENGTH",
                                  "custom_id must be between 1 and 100 in length.")
            if custom_id in seen:
                raise _form_error("components", "COMPONENT_CUSTOM_ID_DUPLICATED",
                                  "Component custom id cannot be duplicated")
            seen.add(custom_id)
        if comp.get("type") == 2 and len(comp.get("label") or "") > 80:
            raise _form_error("components", "BASE_TYPE_MAX_LENGTH", "Button label must be 80 or fewer in length.")


_COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
_OPTION_PY_TYPES: tuple[tuple[type, int], ...] = ((bool, 5), (int, 4), (float, 10), (str, 3))


def _command_key(cmd: Mapping[str, Any]) -> tuple[int, str]:
    return int(cmd.get("type", 1)), str(cmd.get("name"))


def _comparable_command(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """A command as sent, with Discord's defaults filled in and server-assigned keys dropped (to detect edits)."""
    full = {"type": 1, "description": "", "options": [], **cmd}
    return {k: v for k, v in full.items() if k not in ("id", "application_id", "version", "guild_id")}


# --------------------------------------------------------------------------------------------------- the server


@dataclass(eq=False)
class _Fault:
    status: int
    retry_after: float
    is_global: bool
    message: str | None
    code: int

    def response(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        if self.status == 429:
            body = {"message": self.message or "You are being rate limited.", "retry_after": self.retry_after,
                    "global": self.is_global, "code": self.code}
            # discord.py treats a 429 without "Via" as a Cloudflare ban and gives up instead of retrying.
            headers = {"Via": "1.1 google", "Retry-After": str(max(1, round(self.retry_after))),
                       "X-RateLimit-Scope": "global" if self.is_global else "user"}
            if self.is_global:
                headers["X-RateLimit-Global"] = "true"
            return 429, body, headers
        return self.status, {"message": self.message or f"{self.status}: injected fault", "code": self.code}, {}


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    seq: int = 0
    conn: _Connection | None = None
    sent: list[dict[str, Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    query: dict[str, str]
    session: _Session | None = None


_ROUTES: list[tuple[str, str, str, bool]] = [
    # (method, template, handler name, needs "Authorization: Bot <token>")
    ("GET", "/users/@me", "_h_get_me", True),
    ("POST", "/users/@me/channels", "_h_create_dm", True),
    ("GET", "/users/{user_id}", "_h_get_user", True),
    ("GET", "/oauth2/applications/@me", "_h_get_application", True),
    ("GET", "/gateway", "_h_gateway", False),
    ("GET", "/gateway/bot", "_h_gateway", True),
    ("GET", "/applications/{application_id}/commands", "_h_get_commands", True),
    ("PUT", "/applications/{application_id}/commands", "_h_put_commands", True),
    ("POST", "/applications/{application_id}/commands", "_h_post_command", True),
    ("DELETE", "/applications/{application_id}/commands/{command_id}", "_h_delete_command", True),
    ("GET", "/applications/{application_id}/guilds/{guild_id}/commands", "_h_get_commands", True),
    ("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", "_h_put_commands", True),
    ("POST", "/applications/{application_id}/guilds/{guild_id}/commands", "_h_post_command", True),
    ("DELETE", "/applications/{application_id}/guilds/{guild_id}/commands/{command_id}", "_h_delete_command", True),
    ("POST", "/interactions/{interaction_id}/{token}/callback", "_h_interaction_callback", False),
    ("POST", "/webhooks/{application_id}/{token}", "_h_webhook_execute", False),
    ("GET", "/webhooks/{application_id}/{token}/messages/{message_id}", "_h_webhook_get", False),
    ("PATCH", "/webhooks/{application_id}/{token}/messages/{message_id}", "_h_webhook_edit", False),
    ("DELETE", "/webhooks/{application_id}/{token}/messages/{message_id}", "_h_webhook_delete", False),
    ("GET", "/channels/{channel_id}", "_h_get_channel", True),
    ("POST", "/channels/{channel_id}/typing", "_h_typing", True),
    ("POST", "/channels/{channel_id}/messages", "_h_channel_send", True),
    ("GET", "/channels/{channel_id}/messages/{message_id}", "_h_channel_get_message", True),
    ("PATCH", "/channels/{channel_id}/messages/{message_id}", "_h_channel_edit", True),
    ("DELETE", "/channels/{channel_id}/messages/{message_id}", "_h_channel_delete", True),
    ("GET", "/guilds/{guild_id}/members/{user_id}", "_h_get_member", True),
]
ROUTE_KEYS: tuple[str, ...] = tuple(f"{m} {t}" for m, t, _, _ in _ROUTES)


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(f"^{pattern}$")


_COMPILED = [(m, t, _compile(t), h, auth) for m, t, h, auth in _ROUTES]


class FakeDiscord:
    """Fake Discord (gateway + REST) for one bot, as an async context manager.

    Simplifications (deliberate): one shard; no compression (plain JSON text frames, which discord.py accepts);
    channel permission overwrites, threads, reactions, autocomplete and entity selects are not modelled;
    message ``type`` is 20 for a slash command's original response and 0 otherwise; a follow-up or ``@original``
    call made before the interaction was acknowledged answers 404 Unknown Webhook (10015).
    Internal errors of the fake answer HTTP 418 (a 500 would make discord.py retry for ~10 s) and are re-raised
    from ``wait_for`` and on exit.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_name: str = "drawbot",
        clock: Clock | None = None,
        heartbeat_interval_ms: int = 41_250,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_LIMIT,
        resume_policy: Literal["resume", "invalidate"] = "resume",
        allowed_privileged_intents: int = Intent.PRIVILEGED,
        application_flags: int = DEFAULT_APPLICATION_FLAGS,
    ) -> None:
        self.token = token
        self.clock: Clock = clock or FakeClock()
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.attachment_size_limit = attachment_size_limit
        self.resume_policy: Literal["resume", "invalidate"] = resume_policy
        self.allowed_privileged_intents = allowed_privileged_intents
        self.application_flags = application_flags
        self._ids = _Snowflakes(self.clock)
        self.users: dict[int, FakeUser] = {}
        self.bot = self.add_user(bot_name, bot=True)
        self.application_id = self.bot.id  # modern apps: bot user id == application id
        self.app_owner = self.add_user(f"{bot_name}-owner")
        self.guilds: dict[int, FakeGuild] = {}
        self.channels: dict[int, FakeChannel] = {}
        self._messages: dict[int, FakeMessage] = {}
        self._attachments: dict[int, FakeAttachment] = {}
        self.interactions: list[FakeInteraction] = []
        self._interactions_by_id: dict[int, FakeInteraction] = {}
        self._interactions_by_token: dict[str, FakeInteraction] = {}
        self._commands: dict[int | None, dict[tuple[int, str], dict[str, Any]]] = {}  # scope -> (type, name) -> cmd
        self.command_syncs: list[CommandSync] = []
        self.calls: list[RestCall] = []
        self.unhandled: list[RestCall] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._sessions: dict[str, _Session] = {}
        self._active: _Session | None = None
        self._connections: list[_Connection] = []
        self.gateway_received: list[dict[str, Any]] = []
        self.gateway_sent: list[dict[str, Any]] = []
        self.server_errors: list[str] = []
        self._watched: list[asyncio.Task[Any]] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.stop()
        if exc_type is None:
            self._raise_server_errors()

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._ws_handler)
        app.router.add_route("*", r"/api/v{version:\d+}/{tail:.*}", self._rest_handler)
        app.router.add_get("/attachments/{attachment_id}/{filename}", self._cdn_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"fake discord shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base(self) -> str:
        """Value for ``discord.http.Route.BASE``."""
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """Value (as ``yarl.URL``) for ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ world building

    def add_user(self, username: str, *, bot: bool = False, global_name: str | None = None,
                 dms_open: bool = True) -> FakeUser:
        user = FakeUser(self._ids.next(), username, global_name=global_name, bot=bot, dms_open=dms_open)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str = "Fake Guild", *, owner: FakeUser | None = None,
                  channels: Iterable[str] = ("general",), everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS,
                  bot_permissions: int = DEFAULT_BOT_PERMISSIONS) -> FakeGuild:
        """A guild with @everyone, a managed bot role holding ``bot_permissions``, text channels, the owner and the bot.

        Add guilds before the bot connects; later ones need ``await fake.dispatch_guild_create(guild)``.
        """
        owner = owner or self.add_user(f"{name.lower().replace(' ', '-')}-owner")
        guild_id = self._ids.next()
        guild = FakeGuild(guild_id, name, owner.id, joined_wall=self.clock.wall())
        guild.roles.append(FakeRole(guild_id, "@everyone", everyone_permissions))
        bot_role = FakeRole(self._ids.next(), self.bot.username, bot_permissions, position=1, managed=True)
        guild.roles.append(bot_role)
        self.guilds[guild_id] = guild
        for channel_name in channels:
            self.add_channel(guild, channel_name)
        self.add_member(guild, owner)
        self.add_member(guild, self.bot, roles=[bot_role])
        return guild

    def add_channel(self, guild: FakeGuild, name: str, *, nsfw: bool = False, topic: str | None = None) -> FakeChannel:
        channel = FakeChannel(self._ids.next(), name, 0, guild.id, nsfw=nsfw, position=len(guild.channels), topic=topic)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def add_role(self, guild: FakeGuild, name: str, *, permissions: int = 0, mentionable: bool = False) -> FakeRole:
        role = FakeRole(self._ids.next(), name, permissions, position=len(guild.roles), mentionable=mentionable)
        guild.roles.append(role)
        return role

    def add_member(self, guild: FakeGuild, user: FakeUser, *, roles: Iterable[FakeRole] = (),
                   nick: str | None = None) -> FakeMember:
        member = FakeMember(user, [r.id for r in roles], nick, joined_wall=self.clock.wall())
        guild.members[user.id] = member
        return member

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The bot's DM channel with ``user`` (created on first use, stable afterwards)."""
        for channel in self.channels.values():
            if channel.is_dm and channel.recipient is user:
                return channel
        channel = FakeChannel(self._ids.next(), "", 1, None, recipient=user)
        self.channels[channel.id] = channel
        return channel

    def set_commands(self, commands: Iterable[Mapping[str, Any]], *, guild_id: int | None = None) -> None:
        """Pretend these commands were registered by an earlier run (no ``CommandSync`` is recorded)."""
        self._store_commands(guild_id, [dict(c) for c in commands])

    # ------------------------------------------------------------------ inspection

    def calls_to(self, route: str) -> list[RestCall]:
        self._check_route_key(route)
        return [c for c in self.calls if c.route == route]

    def registered_commands(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        return list(self._commands.get(guild_id, {}).values())

    def messages(self, channel: FakeChannel | int | None = None, *, include_deleted: bool = True) -> list[FakeMessage]:
        channel_id = None if channel is None else _id_of(channel)
        return [m for m in self._messages.values()
                if (channel_id is None or m.channel_id == channel_id) and (include_deleted or not m.deleted)]

    def message(self, message_id: int) -> FakeMessage:
        try:
            return self._messages[message_id]
        except KeyError:
            raise LookupError(f"no message {message_id} was created") from None

    def interaction(self, interaction_id: int) -> FakeInteraction:
        return self._interactions_by_id[interaction_id]

    @property
    def connected(self) -> bool:
        return self._active is not None and self._active.conn is not None

    @property
    def identify_count(self) -> int:
        return sum(1 for f in self.gateway_received if f.get("op") == 2)

    @property
    def resume_count(self) -> int:
        return sum(1 for f in self.gateway_received if f.get("op") == 6)

    @property
    def heartbeat_count(self) -> int:
        return sum(1 for f in self.gateway_received if f.get("op") == 1)

    @property
    def intents(self) -> int | None:
        return None if self._active is None else self._active.intents

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward (e.g. 901 s to kill interaction tokens)."""
        self.clock.advance(seconds)
        self._notify()

    def watch_task(self, task: asyncio.Task[Any]) -> None:
        """``wait_for`` raises ``ClientCrashed`` once this task ends (``Client.start`` dies on parse errors)."""
        self._watched.append(task)

    def unwatch_task(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._watched.remove(task)

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy and return its value.

        Re-checked after every request, gateway frame and clock change, and every 20 ms (for client-side state).
        Raises ``FakeServerError``/``ClientCrashed`` at once if the fake failed or a watched client task ended.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            self._raise_server_errors()
            self._raise_crashed()
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n".join(f"  {c.method} {c.path} -> {c.status}" for c in self.calls[-10:])
                raise TimeoutError(f"condition not met within {timeout}s; last REST calls:\n{recent or '  (none)'}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.02))  # also polls client-side state

    def fail_next(self, route: str, times: int = 1, *, status: int = 429, retry_after: float = 0.05,
                  is_global: bool = False, message: str | None = None, code: int = 0) -> None:
        """The next ``times`` calls to ``route`` (a key from ``ROUTE_KEYS``) answer ``status`` without being handled."""
        self._check_route_key(route)
        fault = _Fault(status, retry_after, is_global, message, code)
        self._faults.setdefault(route, []).extend(fault for _ in range(times))

    # ------------------------------------------------------------------ gateway

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a DISPATCH frame to the connected bot (buffered for RESUME if the socket is down)."""
        await self._send_dispatch(self._require_session(), event, data)

    async def dispatch_guild_create(self, guild: FakeGuild) -> None:
        session = self._require_session()
        await self._send_dispatch(session, "GUILD_CREATE", self._guild_create_payload(guild, session.intents))

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT; discord.py reconnects and RESUMEs."""
        session = self._require_session()
        assert session.conn is not None
        await self._send_frame(session.conn, {"op": 7, "d": None, "s": None, "t": None})

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, timeout=1.0)  # timeout: how long close() waits for the peer
        await ws.prepare(request)
        conn = _Connection(ws, dict(request.query))
        self._connections.append(conn)
        try:
            await self._send_frame(conn, {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms},
                                          "s": None, "t": None})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_gateway_frame(conn, json.loads(msg.data))
                elif msg.type is WSMsgType.BINARY:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
        except Exception:  # a bug in the fake: keep it visible to the test
            self.server_errors.append(traceback.format_exc())
        finally:
            self._connections.remove(conn)
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            self._notify()
        return ws

    async def _on_gateway_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self.gateway_received.append(frame)
        op, data = frame.get("op"), frame.get("d")
        if op == 1:
            await self._send_frame(conn, {"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data or {})
        elif op == 6:
            await self._resume(conn, data or {})
        elif op == 8:
            await self._request_members(conn, data or {})
        elif op in (3, 4):
            pass  # presence / voice state updates: recorded only
        else:
            await conn.ws.close(code=4001, message=b"Unknown opcode.")
        self._notify()

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> None:
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents", 0))
        if intents & Intent.PRIVILEGED & ~self.allowed_privileged_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        session = _Session(secrets.token_hex(16), intents, conn=conn)
        conn.session = session
        self._sessions[session.id] = session
        self._active = session
        ready = {
            "v": 10, "user": self._client_user_payload(), "session_type": "normal", "session_id": session.id,
            "resume_gateway_url": self.gateway_url, "shard": data.get("shard", [0, 1]),
            "guilds": [{"id": str(g), "unavailable": True} for g in self.guilds],
            "application": {"id": str(self.application_id), "flags": self.application_flags},
            "private_channels": [], "relationships": [], "presences": [], "geo_ordered_rtc_regions": [],
        }
        await self._send_dispatch(session, "READY", ready)
        for guild in self.guilds.values():
            await self._send_dispatch(session, "GUILD_CREATE", self._guild_create_payload(guild, intents))

    async def _resume(self, conn: _Connection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        if session is None or self.resume_policy == "invalidate":
            # d=false: not resumable; the client must IDENTIFY again on a new connection.
            await self._send_frame(conn, {"op": 9, "d": False, "s": None, "t": None})
            return
        conn.session = session
        session.conn = conn
        self._active = session
        last_seen = int(data.get("seq") or 0)
        async with session.lock:
            for frame in session.sent:
                if frame["s"] > last_seen:
                    await self._send_frame(conn, frame)
        await self._send_dispatch(session, "RESUMED", {"_trace": ["fake-discord"]})

    async def _request_members(self, conn: _Connection, data: dict[str, Any]) -> None:
        guild = self.guilds.get(int(data.get("guild_id", 0)))
        if guild is None or conn.session is None:
            return
        members = [m.payload() for m in guild.members.values()]
        chunk: dict[str, Any] = {"guild_id": str(guild.id), "members": members, "chunk_index": 0, "chunk_count": 1,
                                 "not_found": [], "presences": []}
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        await self._send_dispatch(conn.session, "GUILD_MEMBERS_CHUNK", chunk)

    async def _send_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        self.gateway_sent.append(frame)
        if not conn.ws.closed:
            await conn.ws.send_str(json.dumps(frame))

    async def _send_dispatch(self, session: _Session, event: str, data: Any) -> None:
        async with session.lock:
            session.seq += 1
            frame = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.sent.append(frame)
            del session.sent[:-2000]
            if session.conn is not None:
                with contextlib.suppress(ConnectionResetError):
                    await self._send_frame(session.conn, frame)

    def _require_session(self) -> _Session:
        if self._active is None:
            raise RuntimeError("the bot has not identified with the fake gateway yet")
        return self._active

    async def _dispatch_message_event(self, event: str, message: FakeMessage) -> None:
        """MESSAGE_CREATE/UPDATE/DELETE for non-ephemeral messages, gated by intents as Discord does."""
        session = self._active
        if session is None or message.ephemeral:
            return
        needed = Intent.DIRECT_MESSAGES if message.guild_id is None else Intent.GUILD_MESSAGES
        if not session.intents & needed:
            return
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
            if message.guild_id is not None:
                data["guild_id"] = str(message.guild_id)
        else:
            data = self._message_payload(message)
            if message.guild_id is not None:
                data["member"] = self.guilds[message.guild_id].members[self.bot.id].payload(with_user=False)
        await self._send_dispatch(session, event, data)

    # ------------------------------------------------------------------ payloads

    def _client_user_payload(self) -> dict[str, Any]:
        return {**self.bot.payload(), "verified": True, "mfa_enabled": False, "locale": "en-US", "email": None,
                "flags": 0}

    def _guild_create_payload(self, guild: FakeGuild, intents: int) -> dict[str, Any]:
        # Without GUILD_MEMBERS, Discord only sends the bot's own member in GUILD_CREATE.
        members = [m for m in guild.members.values() if intents & Intent.GUILD_MEMBERS or m.user is self.bot]
        text = guild.text_channels
        return {
            "id": str(guild.id), "name": guild.name, "icon": None, "splash": None, "discovery_splash": None,
            "owner_id": str(guild.owner_id), "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": [r.payload() for r in guild.roles], "emojis": [], "stickers": [], "features": guild.features,
            "mfa_level": 0, "nsfw_level": 0, "application_id": None,
            "system_channel_id": str(text[0].id) if text else None, "system_channel_flags": 0,
            "rules_channel_id": None, "vanity_url_code": None, "banner": None, "description": None,
            "premium_tier": 0, "premium_subscription_count": 0, "preferred_locale": guild.locale,
            "public_updates_channel_id": None, "max_members": 500_000, "premium_progress_bar_enabled": False,
            "incidents_data": None, "joined_at": _iso(guild.joined_wall), "large": len(guild.members) > 250,
            "unavailable": False, "member_count": len(guild.members), "voice_states": [],
            "members": [m.payload() for m in members], "channels": [c.payload() for c in guild.channels],
            "threads": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _message_payload(self, msg: FakeMessage) -> dict[str, Any]:
        version = msg.current
        mentions = [self.users[u].payload() for u in sorted(version.pings.users) if u in self.users]
        data: dict[str, Any] = {
            "id": str(msg.id), "channel_id": str(msg.channel_id), "author": msg.author.payload(),
            "content": version.content, "timestamp": _iso(msg.created_wall),
            "edited_timestamp": _iso(version.wall) if msg.edit_count else None, "tts": False,
            "mention_everyone": version.pings.everyone, "mentions": mentions,
            "mention_roles": [str(r) for r in sorted(version.pings.roles)],
            "attachments": [a.payload() for a in version.attachments], "embeds": version.embeds, "pinned": False,
            "type": msg.type, "flags": version.flags, "components": version.components,
        }
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
        if msg.webhook_id is not None:
            data["webhook_id"] = str(msg.webhook_id)
            data["application_id"] = str(self.application_id)
        if msg.reference is not None:
            data["message_reference"] = msg.reference
        inter = self._interactions_by_id.get(msg.interaction_id) if msg.interaction_id else None
        if inter is not None:
            metadata: dict[str, Any] = {
                "id": str(inter.id), "type": inter.type, "user": inter.user.payload(),
                "authorizing_integration_owners": inter.payload["authorizing_integration_owners"],
            }
            if msg.kind == "followup" and inter.original_message_id is not None:
                metadata["original_response_message_id"] = str(inter.original_message_id)
            if inter.type == 3 and inter.message_id is not None:
                metadata["interacted_message_id"] = str(inter.message_id)
            data["interaction_metadata"] = metadata
            # The deprecated "interaction" object is still sent; discord.py uses its id to track views on edits.
            data["interaction"] = {"id": str(inter.id), "type": inter.type, "name": inter.data.get("name", ""),
                                   "user": inter.user.payload()}
        return data

    def _interaction_channel_payload(self, channel: FakeChannel, user: FakeUser) -> dict[str, Any]:
        data = channel.payload()
        if not channel.is_dm:
            data["permissions"] = str(self.guilds[channel.guild_id].permissions_for(user.id))  # type: ignore[index]
        return data

    # ------------------------------------------------------------------ user-side injectors

    async def slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: FakeUser,
        guild_id: FakeGuild | int | None = None,
        channel_id: FakeChannel | int | None = None,
        dm: bool = False,
        locale: str = "en-US",
        validate: bool = True,
    ) -> FakeInteraction:
        """A user runs ``/name`` (``"group sub"`` for subcommands); dispatches INTERACTION_CREATE type 2.

        With ``validate`` the command must be registered (synced) for that guild or globally, visible to the user
        (``default_member_permissions``, DM ``contexts``) and the options must pass the checks a Discord client
        applies (required, types, choices, min/max); option types come from the registered command. Values: str,
        int, float, bool, FakeUser (USER), FakeChannel (CHANNEL), FakeRole (ROLE), FakeUpload (ATTACHMENT).
        """
        channel, guild = self._where(guild_id, channel_id, dm, user)
        parts = name.split()
        command = self._find_command(parts[0], guild)
        if command is None and validate:
            scope = "globally" if guild is None else f"globally or in guild {guild.name!r}"
            raise LookupError(f"/{parts[0]} is not registered {scope}; sync the command tree first")
        if command is not None and validate:
            self._check_command_visible(command, user, guild)
        resolved: dict[str, dict[str, Any]] = {}
        schema = command.get("options") if command else None
        built = self._build_options(parts[1:], schema, dict(options or {}), guild, user, resolved, validate)
        data: dict[str, Any] = {"id": str(command["id"]) if command else str(self._ids.next()), "name": parts[0],
                                "type": 1, "options": built}
        if resolved:
            data["resolved"] = resolved
        if command is not None and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._create_interaction(2, user, guild, channel, data, locale=locale)

    async def press_button(self, message: FakeMessage | int, custom_id: str, *, user: FakeUser,
                           locale: str = "en-US") -> FakeInteraction:
        """A user clicks the button ``custom_id`` on a message; dispatches INTERACTION_CREATE type 3."""
        msg, comp = self._pressable(message, custom_id, user)
        if comp.get("type") != 2:
            raise ValueError(f"component {custom_id!r} is type {comp.get('type')}, not a button")
        return await self._component_interaction(msg, user, {"custom_id": custom_id, "component_type": 2}, locale)

    async def select_option(self, message: FakeMessage | int, custom_id: str, values: list[str], *,
                            user: FakeUser, locale: str = "en-US") -> FakeInteraction:
        """A user picks ``values`` in a string select (type 3); entity selects are not modelled."""
        msg, comp = self._pressable(message, custom_id, user)
        if comp.get("type") != 3:
            raise ValueError(f"component {custom_id!r} is type {comp.get('type')}; only string selects are supported")
        offered = {o["value"] for o in comp.get("options") or []}
        if not set(values) <= offered:
            raise ValueError(f"values {sorted(set(values) - offered)} are not options of {custom_id!r}")
        low, high = comp.get("min_values", 1), comp.get("max_values", 1)
        if not low <= len(values) <= high:
            raise ValueError(f"select {custom_id!r} takes {low}..{high} values, got {len(values)}")
        data = {"custom_id": custom_id, "component_type": 3, "values": list(values)}
        return await self._component_interaction(msg, user, data, locale)

    async def submit_modal(self, opened_by: FakeInteraction, values: Mapping[str, str], *,
                           user: FakeUser | None = None, locale: str = "en-US") -> FakeInteraction:
        """Submit the modal the bot opened (callback type 9) on ``opened_by``; dispatches INTERACTION_CREATE type 5."""
        modal = opened_by.modal
        if modal is None:
            raise ValueError("that interaction was not answered with a modal (callback type 9)")
        user = user or opened_by.user
        remaining = dict(values)

        def submitted(comp: dict[str, Any]) -> dict[str, Any]:
            cid = comp.get("custom_id")
            if comp.get("type") == 4:
                value = remaining.pop(cid, comp.get("value") or "")
                if comp.get("required", True) and not value:
                    raise ValueError(f"text input {cid!r} is required")
                if value and not comp.get("min_length", 0) <= len(value) <= comp.get("max_length", 4000):
                    raise ValueError(f"text input {cid!r} length {len(value)} is outside its limits")
                return {"type": 4, "custom_id": cid, "value": value}
            if comp.get("type") == 3:
                picked = remaining.pop(cid, [])
                return {"type": 3, "custom_id": cid, "values": [picked] if isinstance(picked, str) else list(picked)}
            return {"type": comp.get("type"), "id": comp.get("id")}

        rows: list[dict[str, Any]] = []
        for top in modal.get("components") or []:
            if top.get("type") == 1:
                rows.append({"type": 1, "components": [submitted(c) for c in top.get("components") or []]})
            elif top.get("type") == 18:
                rows.append({"type": 18, "id": top.get("id"), "component": submitted(top["component"])})
        if remaining:
            raise ValueError(f"the modal has no inputs named {sorted(remaining)}")
        channel = self.channels[opened_by.channel_id]
        guild = self.guilds.get(opened_by.guild_id) if opened_by.guild_id else None
        message = self._messages.get(opened_by.message_id) if opened_by.message_id else None
        data = {"custom_id": modal["custom_id"], "components": rows}
        return await self._create_interaction(5, user, guild, channel, data, message=message, locale=locale)

    def _where(self, guild_ref: FakeGuild | int | None, channel_ref: FakeChannel | int | None, dm: bool,
               user: FakeUser) -> tuple[FakeChannel, FakeGuild | None]:
        if dm:
            return self.dm_channel(user), None
        if channel_ref is not None:
            channel = self.channels[_id_of(channel_ref)]
            guild = self.guilds.get(channel.guild_id) if channel.guild_id else None
        else:
            if guild_ref is None:
                if len(self.guilds) != 1:
                    raise ValueError("pass guild_id/channel_id (or dm=True): the fake has more or fewer than one guild")
                guild = next(iter(self.guilds.values()))
            else:
                guild = self.guilds[_id_of(guild_ref)]
            if not guild.text_channels:
                raise ValueError(f"guild {guild.name!r} has no text channel")
            channel = guild.text_channels[0]
        if guild is not None and user.id not in guild.members:
            raise LookupError(f"{user.username} is not a member of {guild.name!r}; add_member first")
        return channel, guild

    def _find_command(self, name: str, guild: FakeGuild | None) -> dict[str, Any] | None:
        scopes = ([guild.id] if guild is not None else []) + [None]
        for scope in scopes:
            command = self._commands.get(scope, {}).get((1, name))
            if command is not None:
                return command
        return None

    def _check_command_visible(self, command: dict[str, Any], user: FakeUser, guild: FakeGuild | None) -> None:
        if guild is None:
            contexts = command.get("contexts")
            if (contexts is not None and 1 not in contexts) or command.get("dm_permission") is False:
                raise PermissionError(f"/{command['name']} is not available in DMs")
            return
        needed = command.get("default_member_permissions")
        if needed is not None and int(needed) & ~guild.permissions_for(user.id):
            raise PermissionError(f"{user.username} lacks default_member_permissions={needed} for /{command['name']}")
        contexts = command.get("contexts")
        if contexts is not None and 0 not in contexts:
            raise PermissionError(f"/{command['name']} is not available in guilds")

    def _build_options(self, path: list[str], schema: list[dict[str, Any]] | None, values: dict[str, Any],
                       guild: FakeGuild | None, user: FakeUser, resolved: dict[str, dict[str, Any]],
                       validate: bool) -> list[dict[str, Any]]:
        if path:  # subcommand (group): nest one level per name
            sub_name, rest = path[0], path[1:]
            sub = next((o for o in schema or [] if o.get("name") == sub_name and o.get("type") in (1, 2)), None)
            if sub is None and validate:
                raise LookupError(f"no subcommand {sub_name!r}")
            sub_type = sub["type"] if sub else (2 if rest else 1)
            inner = self._build_options(rest, sub.get("options") if sub else None, values, guild, user, resolved,
                                        validate)
            return [{"type": sub_type, "name": sub_name, "options": inner}]
        by_name = {o["name"]: o for o in schema or []}
        built: list[dict[str, Any]] = []
        if validate and schema is not None:
            unknown = set(values) - set(by_name)
            if unknown:
                raise ValueError(f"unknown options {sorted(unknown)}; the command has {sorted(by_name)}")
            missing = [n for n, o in by_name.items() if o.get("required") and n not in values]
            if missing:
                raise ValueError(f"required options missing: {missing}")
        for opt_name, value in values.items():
            spec = by_name.get(opt_name)
            opt_type = spec["type"] if spec else _python_option_type(value)
            if validate and spec is not None:
                _check_option_value(spec, value)
            built.append({"name": opt_name, "type": opt_type,
                          "value": self._option_value(opt_type, value, guild, user, resolved)})
        return built

    def _option_value(self, opt_type: int, value: Any, guild: FakeGuild | None, user: FakeUser,
                      resolved: dict[str, dict[str, Any]]) -> Any:
        if opt_type in (3, 4, 5, 10):
            return value
        if isinstance(value, FakeUser) or (opt_type == 6 and isinstance(value, int)):
            target = value if isinstance(value, FakeUser) else self.users[value]
            resolved.setdefault("users", {})[str(target.id)] = target.payload()
            if guild is not None and target.id in guild.members:
                resolved.setdefault("members", {})[str(target.id)] = guild.members[target.id].payload(
                    with_user=False, permissions=guild.permissions_for(target.id))
            return str(target.id)
        if isinstance(value, FakeChannel) or (opt_type == 7 and isinstance(value, int)):
            chan = value if isinstance(value, FakeChannel) else self.channels[value]
            resolved.setdefault("channels", {})[str(chan.id)] = self._interaction_channel_payload(chan, user)
            return str(chan.id)
        if isinstance(value, FakeRole):
            resolved.setdefault("roles", {})[str(value.id)] = value.payload()
            return str(value.id)
        if isinstance(value, FakeUpload):
            att = self._store_attachment(value.filename, value.data, value.content_type)
            resolved.setdefault("attachments", {})[str(att.id)] = att.payload()
            return str(att.id)
        raise TypeError(f"cannot send {value!r} as an option of type {opt_type}")

    def _pressable(self, message: FakeMessage | int, custom_id: str,
                   user: FakeUser) -> tuple[FakeMessage, dict[str, Any]]:
        msg = message if isinstance(message, FakeMessage) else self.message(message)
        if msg.deleted:
            raise LookupError("that message was deleted")
        comp = msg.component(custom_id)
        if comp is None:
            raise LookupError(f"message {msg.id} has no component {custom_id!r} (it has {msg.custom_ids})")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        if msg.ephemeral:
            owner = self._interactions_by_id.get(msg.interaction_id or 0)
            if owner is not None and owner.user is not user:
                raise PermissionError("only the user who received an ephemeral message can use it")
        return msg, comp

    async def _component_interaction(self, msg: FakeMessage, user: FakeUser, data: dict[str, Any],
                                     locale: str) -> FakeInteraction:
        channel = self.channels[msg.channel_id]
        guild = self.guilds.get(msg.guild_id) if msg.guild_id else None
        if guild is not None and user.id not in guild.members:
            raise LookupError(f"{user.username} is not a member of {guild.name!r}")
        if channel.is_dm and channel.recipient is not user:
            raise PermissionError("only the DM recipient can use components in a DM")
        return await self._create_interaction(3, user, guild, channel, data, message=msg, locale=locale)

    async def _create_interaction(self, type_: int, user: FakeUser, guild: FakeGuild | None, channel: FakeChannel,
                                  data: dict[str, Any], *, message: FakeMessage | None = None,
                                  locale: str = "en-US") -> FakeInteraction:
        session = self._require_session()
        interaction_id = self._ids.next()
        token = f"aW50ZXJhY3Rpb246{interaction_id}{secrets.token_urlsafe(24)}"
        payload: dict[str, Any] = {
            "id": str(interaction_id), "application_id": str(self.application_id), "type": type_, "data": data,
            "token": token, "version": 1, "locale": locale, "entitlements": [], "entitlement_sku_ids": [],
            "attachment_size_limit": self.attachment_size_limit,
            "channel": self._interaction_channel_payload(channel, user), "channel_id": str(channel.id),
        }
        if guild is not None:
            member = guild.members[user.id]
            payload.update({
                "guild_id": str(guild.id), "guild_locale": guild.locale, "context": 0,
                "guild": {"id": str(guild.id), "locale": guild.locale, "features": guild.features},
                "member": member.payload(permissions=guild.permissions_for(user.id)),
                "app_permissions": str(guild.permissions_for(self.bot.id)),
                "authorizing_integration_owners": {"0": str(guild.id)},
            })
        else:
            payload.update({"user": user.payload(), "context": 1, "app_permissions": str(DM_APP_PERMISSIONS),
                            "authorizing_integration_owners": {"0": "0"}})
        if message is not None:
            payload["message"] = self._message_payload(message)
        inter = FakeInteraction(interaction_id, token, type_, user, guild.id if guild else None, channel.id, data,
                                payload, self.clock.now(), self._messages,
                                message_id=message.id if message is not None else None)
        self.interactions.append(inter)
        self._interactions_by_id[inter.id] = inter
        self._interactions_by_token[token] = inter
        await self._send_dispatch(session, "INTERACTION_CREATE", payload)
        self._notify()
        return inter

    # ------------------------------------------------------------------ REST plumbing

    async def _rest_handler(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        call = RestCall(request.method, path, None, {}, dict(request.query), None, [], self.clock.now())
        self.calls.append(call)
        headers: dict[str, str] = {}
        try:
            call.json, call.files = await _read_body(request)
            handler_name, needs_auth = self._route(call)
            fault = self._faults.get(call.route or "")
            if fault:
                call.faulted = True
                status, body, headers = fault.pop(0).response()
            else:
                if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise DiscordAPIError(401, 0, "401: Unauthorized")
                status, body = await getattr(self, handler_name)(call)
        except DiscordAPIError as exc:
            status, body = exc.status, exc.body()
        except Exception:
            self.server_errors.append(f"{call.method} {call.path}\n{traceback.format_exc()}")
            status, body = 418, {"message": "fake discord failed; see FakeDiscord.server_errors", "code": 0}
        call.status, call.response = status, body
        self._notify()
        if body is None:
            return web.Response(status=204, headers=headers)
        # Exactly "application/json": discord.py compares the header string and would not parse "...; charset=utf-8".
        return web.Response(status=status, body=json.dumps(body).encode(),
                            headers={**headers, "Content-Type": "application/json"})

    def _route(self, call: RestCall) -> tuple[str, bool]:
        method_allowed = False
        for method, template, pattern, handler, auth in _COMPILED:
            match = pattern.match(call.path)
            if match is None:
                continue
            method_allowed = True
            if method == call.method:
                call.route, call.params = f"{method} {template}", match.groupdict()
                return handler, auth
        self.unhandled.append(call)
        if method_allowed:
            raise DiscordAPIError(405, 0, "405: Method Not Allowed")
        raise DiscordAPIError(404, 0, "404: Not Found")

    async def _cdn_handler(self, request: web.Request) -> web.Response:
        att = self._attachments.get(int(request.match_info["attachment_id"]))
        if att is None or att.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=att.data, headers={"Content-Type": att.content_type})

    def _check_route_key(self, route: str) -> None:
        if route not in ROUTE_KEYS:
            raise ValueError(f"unknown route {route!r}; known routes:\n  " + "\n  ".join(ROUTE_KEYS))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _raise_server_errors(self) -> None:
        if self.server_errors:
            raise FakeServerError("the fake Discord server failed:\n" + "\n".join(self.server_errors))

    def _raise_crashed(self) -> None:
        for task in self._watched:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise ClientCrashed(f"client task {task.get_name()} ended early: {exc!r}") from exc

    # ------------------------------------------------------------------ REST: users, app, gateway, commands

    async def _h_get_me(self, call: RestCall) -> tuple[int, Any]:
        return 200, self._client_user_payload()

    async def _h_get_user(self, call: RestCall) -> tuple[int, Any]:
        user = self.users.get(_int(call.params["user_id"]))
        if user is None:
            raise DiscordAPIError(404, 10013, "Unknown User")
        return 200, user.payload()

    async def _h_get_application(self, call: RestCall) -> tuple[int, Any]:
        return 200, {
            "id": str(self.application_id), "name": self.bot.username, "icon": None, "description": "",
            "summary": "", "type": None, "verify_key": "0" * 64, "flags": self.application_flags,
            "bot_public": True, "bot_require_code_grant": False, "owner": self.app_owner.payload(), "team": None,
            "bot": self.bot.payload(), "hook": True, "interactions_endpoint_url": None, "redirect_uris": [],
            "tags": [], "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        }

    async def _h_gateway(self, call: RestCall) -> tuple[int, Any]:
        body: dict[str, Any] = {"url": self.gateway_url}
        if call.path.endswith("/bot"):
            body.update(shards=1, session_start_limit={"total": 1000, "remaining": 999, "reset_after": 0,
                                                       "max_concurrency": 1})
        return 200, body

    def _command_scope(self, call: RestCall) -> int | None:
        if _int(call.params["application_id"]) != self.application_id:
            raise DiscordAPIError(403, 50001, "Missing Access")
        if "guild_id" not in call.params:
            return None
        guild_id = _int(call.params["guild_id"])
        if guild_id not in self.guilds:
            raise DiscordAPIError(403, 50001, "Missing Access")
        return guild_id

    async def _h_get_commands(self, call: RestCall) -> tuple[int, Any]:
        return 200, self.registered_commands(self._command_scope(call))

    async def _h_put_commands(self, call: RestCall) -> tuple[int, Any]:
        scope = self._command_scope(call)
        if not isinstance(call.json, list):
            raise _form_error("_root", "BASE_TYPE_LIST", "Must be an array.")
        if len(call.json) > 100:
            raise _form_error("_root", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        for i, cmd in enumerate(call.json):
            _validate_command(cmd, f"{i}")
        keys = [_command_key(c) for c in call.json]
        if len(set(keys)) != len(keys):
            raise _form_error("_root", "APPLICATION_COMMANDS_DUPLICATE_NAME",
                              "Application command names must be unique")
        before = self._commands.get(scope, {})
        sent = dict(zip(keys, call.json))
        created = [k[1] for k in keys if k not in before]
        updated = [k[1] for k in keys if k in before and _comparable_command(before[k]) != _comparable_command(sent[k])]
        unchanged = [k[1] for k in keys if k in before and k[1] not in updated]
        deleted = [k[1] for k in before if k not in sent]
        stored = self._store_commands(scope, call.json)
        self.command_syncs.append(CommandSync(scope, call.json, created, updated, unchanged, deleted, call.at))
        return 200, stored

    async def _h_post_command(self, call: RestCall) -> tuple[int, Any]:
        scope = self._command_scope(call)
        if not isinstance(call.json, dict):
            raise _form_error("_root", "MODEL_TYPE_CONVERT", "Must be an object.")
        _validate_command(call.json, "_root")
        existing = dict(self._commands.get(scope, {}))
        key = _command_key(call.json)
        existed = key in existing
        existing[key] = call.json
        stored = self._store_commands(scope, list(existing.values()))
        return (200 if existed else 201), next(c for c in stored if _command_key(c) == key)

    async def _h_delete_command(self, call: RestCall) -> tuple[int, Any]:
        scope = self._command_scope(call)
        commands = self._commands.get(scope, {})
        for key, cmd in list(commands.items()):
            if cmd["id"] == call.params["command_id"]:
                del commands[key]
                return 204, None
        raise DiscordAPIError(404, 10063, "Unknown application command")

    def _store_commands(self, scope: int | None, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        before = self._commands.get(scope, {})
        stored: dict[tuple[int, str], dict[str, Any]] = {}
        for cmd in commands:
            old = before.get(_command_key(cmd))
            # Discord keeps a command's id across overwrites with the same name; the version changes on edits.
            cmd_id = old["id"] if old else str(self._ids.next())
            unchanged = old is not None and _comparable_command(old) == _comparable_command(cmd)
            version = old["version"] if unchanged else str(self._ids.next())
            full = {"type": 1, "description": "", "options": [], **cmd, "id": cmd_id,
                    "application_id": str(self.application_id), "version": version}
            if scope is not None:
                full["guild_id"] = str(scope)
            stored[_command_key(cmd)] = full
        self._commands[scope] = stored
        return list(stored.values())

    # ------------------------------------------------------------------ REST: interactions

    async def _h_interaction_callback(self, call: RestCall) -> tuple[int, Any]:
        inter = self._interactions_by_id.get(_int(call.params["interaction_id"]))
        if inter is None or inter.token != call.params["token"]:
            raise _unknown_interaction()
        inter.calls.append(call)
        call.interaction_id = inter.id
        if inter.callback_type is not None:
            raise DiscordAPIError(400, 40060, "Interaction has already been acknowledged.")
        if call.at - inter.created_at > ACK_WINDOW_S:
            raise _unknown_interaction()
        body = call.json if isinstance(call.json, dict) else {}
        cb_type, data = body.get("type"), body.get("data") or {}
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 5: {4, 5, 6, 7}}.get(inter.type, set())
        if inter.type == 5 and inter.message_id is None:
            allowed = {4, 5}
        if cb_type not in allowed:
            raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID",
                              f"Interaction response type {cb_type} is not valid for interaction type {inter.type}.")
        channel = self.channels[inter.channel_id]
        message: FakeMessage | None = None
        event: str | None = None
        if cb_type == 4:
            message = self._create_message(channel, data, call.files, kind="interaction_response", interaction=inter,
                                           allowed_flags=_INTERACTION_SENDABLE_FLAGS)
            event = "MESSAGE_CREATE"
        elif cb_type == 5:
            flags = MSG_FLAG_LOADING | (int(data.get("flags") or 0) & MSG_FLAG_EPHEMERAL)
            message = self._create_message(channel, {"flags": flags}, [], kind="interaction_response",
                                           interaction=inter, allowed_flags=flags, allow_empty=True)
            event = "MESSAGE_CREATE"
        elif cb_type in (6, 7):
            message = self._messages[inter.message_id]  # type: ignore[index]
            if cb_type == 7:
                self._edit_message(message, data, call.files)
                event = "MESSAGE_UPDATE"
        elif cb_type == 9:
            _validate_modal(data)
        inter.callback_type, inter.callback_at, inter.callback_data = cb_type, call.at, data
        if message is not None:
            inter.original_message_id = message.id
        if message is not None and event is not None:
            await self._dispatch_message_event(event, message)
        if call.query.get("with_response") not in ("1", "true", "True"):
            return 204, None
        summary: dict[str, Any] = {"id": str(inter.id), "type": inter.type}
        if message is not None and cb_type in (4, 5, 7):
            summary.update(response_message_id=str(message.id), response_message_loading=message.loading,
                           response_message_ephemeral=message.ephemeral)
        resource: dict[str, Any] = {"type": cb_type}
        if message is not None and cb_type in (4, 7):
            resource["message"] = self._message_payload(message)
        return 200, {"interaction": summary, "resource": resource}

    def _webhook_interaction(self, call: RestCall) -> FakeInteraction:
        if _int(call.params["application_id"]) != self.application_id:
            raise _unknown_webhook()
        inter = self._interactions_by_token.get(call.params["token"])
        if inter is None:
            raise _invalid_webhook_token()
        inter.calls.append(call)
        call.interaction_id = inter.id
        if call.at - inter.created_at > TOKEN_LIFETIME_S:
            raise _invalid_webhook_token()
        if inter.callback_type is None:
            raise _unknown_webhook()
        return inter

    def _webhook_message(self, call: RestCall, inter: FakeInteraction) -> FakeMessage:
        raw = call.params["message_id"]
        message_id = inter.original_message_id if raw == "@original" else _int(raw)
        if message_id is None or (message_id != inter.original_message_id and message_id not in inter.followup_ids):
            raise _unknown_message()
        message = self._messages.get(message_id)
        if message is None or message.deleted:
            raise _unknown_message()
        return message

    async def _h_webhook_execute(self, call: RestCall) -> tuple[int, Any]:
        inter = self._webhook_interaction(call)
        data = call.json if isinstance(call.json, dict) else {}
        original = inter.original
        if inter.callback_type == 5 and original is not None and original.loading and not original.deleted:
            # The first follow-up after a "thinking" defer replaces the loading message; the defer decided ephemerality.
            self._edit_message(original, {k: v for k, v in data.items() if k != "flags"}, call.files)
            message, event = original, "MESSAGE_UPDATE"
        else:
            message = self._create_message(self.channels[inter.channel_id], data, call.files, kind="followup",
                                           interaction=inter, allowed_flags=_INTERACTION_SENDABLE_FLAGS)
            event = "MESSAGE_CREATE"
        inter.followup_ids.append(message.id)
        await self._dispatch_message_event(event, message)
        if call.query.get("wait") in ("1", "true", "True"):
            return 200, self._message_payload(message)
        return 204, None

    async def _h_webhook_get(self, call: RestCall) -> tuple[int, Any]:
        inter = self._webhook_interaction(call)
        return 200, self._message_payload(self._webhook_message(call, inter))

    async def _h_webhook_edit(self, call: RestCall) -> tuple[int, Any]:
        inter = self._webhook_interaction(call)
        message = self._webhook_message(call, inter)
        self._edit_message(message, call.json if isinstance(call.json, dict) else {}, call.files)
        await self._dispatch_message_event("MESSAGE_UPDATE", message)
        return 200, self._message_payload(message)

    async def _h_webhook_delete(self, call: RestCall) -> tuple[int, Any]:
        inter = self._webhook_interaction(call)
        message = self._webhook_message(call, inter)
        message.deleted = True
        await self._dispatch_message_event("MESSAGE_DELETE", message)
        return 204, None

    # ------------------------------------------------------------------ REST: channels

    def _channel(self, call: RestCall) -> FakeChannel:
        channel = self.channels.get(_int(call.params["channel_id"]))
        if channel is None:
            raise _unknown_channel()
        if not channel.is_dm and not self._bot_perms(channel) & Perm.VIEW_CHANNEL:
            raise DiscordAPIError(403, 50001, "Missing Access")
        return channel

    def _bot_perms(self, channel: FakeChannel) -> int:
        if channel.is_dm:
            return DM_APP_PERMISSIONS
        return self.guilds[channel.guild_id].permissions_for(self.bot.id)  # type: ignore[index]

    def _channel_message(self, call: RestCall, channel: FakeChannel) -> FakeMessage:
        message = self._messages.get(_int(call.params["message_id"]))
        if message is None or message.deleted or message.ephemeral or message.channel_id != channel.id:
            raise _unknown_message()
        return message

    async def _h_get_channel(self, call: RestCall) -> tuple[int, Any]:
        return 200, self._channel(call).payload()

    async def _h_typing(self, call: RestCall) -> tuple[int, Any]:
        self._channel(call)
        return 204, None

    async def _h_create_dm(self, call: RestCall) -> tuple[int, Any]:
        body = call.json if isinstance(call.json, dict) else {}
        user = self.users.get(_int(str(body.get("recipient_id", "0"))))
        if user is None:
            raise _form_error("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        return 200, self.dm_channel(user).payload()

    async def _h_channel_send(self, call: RestCall) -> tuple[int, Any]:
        channel = self._channel(call)
        perms = self._bot_perms(channel)
        if not perms & Perm.SEND_MESSAGES or (call.files and not perms & Perm.ATTACH_FILES):
            raise _missing_permissions()
        if channel.is_dm and channel.recipient is not None and not channel.recipient.dms_open:
            raise DiscordAPIError(403, 50007, "Cannot send messages to this user")
        body = call.json if isinstance(call.json, dict) else {}
        message = self._create_message(channel, body, call.files, kind="channel", interaction=None,
                                       allowed_flags=_SENDABLE_FLAGS)
        await self._dispatch_message_event("MESSAGE_CREATE", message)
        return 200, self._message_payload(message)

    async def _h_channel_get_message(self, call: RestCall) -> tuple[int, Any]:
        channel = self._channel(call)
        return 200, self._message_payload(self._channel_message(call, channel))

    async def _h_channel_edit(self, call: RestCall) -> tuple[int, Any]:
        channel = self._channel(call)
        message = self._channel_message(call, channel)
        if message.author is not self.bot:
            raise DiscordAPIError(403, 50005, "Cannot edit a message authored by another user")
        self._edit_message(message, call.json if isinstance(call.json, dict) else {}, call.files)
        await self._dispatch_message_event("MESSAGE_UPDATE", message)
        return 200, self._message_payload(message)

    async def _h_channel_delete(self, call: RestCall) -> tuple[int, Any]:
        channel = self._channel(call)
        message = self._channel_message(call, channel)
        if message.author is not self.bot and not self._bot_perms(channel) & Perm.MANAGE_MESSAGES:
            raise _missing_permissions()
        message.deleted = True
        await self._dispatch_message_event("MESSAGE_DELETE", message)
        return 204, None

    async def _h_get_member(self, call: RestCall) -> tuple[int, Any]:
        guild = self.guilds.get(_int(call.params["guild_id"]))
        if guild is None:
            raise DiscordAPIError(404, 10004, "Unknown Guild")
        member = guild.members.get(_int(call.params["user_id"]))
        if member is None:
            raise DiscordAPIError(404, 10007, "Unknown Member")
        return 200, member.payload()

    # ------------------------------------------------------------------ messages

    def _store_attachment(self, filename: str, data: bytes, content_type: str | None,
                          description: str | None = None) -> FakeAttachment:
        att_id = self._ids.next()
        att = FakeAttachment(att_id, filename, data, content_type or _content_type(filename, data),
                             f"http://127.0.0.1:{self.port}/attachments/{att_id}/{filename}", description)
        self._attachments[att_id] = att
        return att

    def _version(self, channel: FakeChannel, body: Mapping[str, Any], files: list[UploadedFile],
                 previous: MessageVersion | None, *, flags: int, reference_author: int | None,
                 require_body: bool) -> MessageVersion:
        """Validate a create/edit body and build the resulting message state (fields absent from an edit are kept)."""
        # A key absent from an edit keeps the old value; an explicit null clears it.
        content = (body["content"] or "") if "content" in body else (previous.content if previous else "")
        if not isinstance(content, str):
            raise _form_error("content", "BASE_TYPE_STRING", "Must be a string.")
        if len(content) > 2000:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = (body["embeds"] or []) if "embeds" in body else (previous.embeds if previous else [])
        _validate_embeds(embeds)
        components = (body["components"] or []) if "components" in body else (previous.components if previous else [])
        _validate_components(components, components_v2=bool(flags & MSG_FLAG_COMPONENTS_V2))
        allowed_mentions = body.get("allowed_mentions", previous.allowed_mentions if previous else None)
        _validate_allowed_mentions(allowed_mentions)
        attachments = self._attachments_for(body, files, previous.attachments if previous else ())
        if require_body and not (content or embeds or attachments or components or body.get("sticker_ids")
                                 or body.get("poll")):
            raise DiscordAPIError(400, 50006, "Cannot send an empty message")
        can_everyone = not channel.is_dm and bool(self._bot_perms(channel) & Perm.MENTION_EVERYONE)
        pings = compute_pings(content, allowed_mentions, can_mention_everyone=can_everyone,
                              replied_author=reference_author)
        return MessageVersion(content, list(embeds), list(components), tuple(attachments), flags, allowed_mentions,
                              pings, self.clock.now(), self.clock.wall())

    def _attachments_for(self, body: Mapping[str, Any], files: list[UploadedFile],
                         previous: tuple[FakeAttachment, ...]) -> list[FakeAttachment]:
        if sum(len(f.data) for f in files) > self.attachment_size_limit:
            raise DiscordAPIError(413, 40005, "Request entity too large")
        by_index: dict[int, UploadedFile] = {}
        for position, upload in enumerate(files):
            found = re.fullmatch(r"files\[(\d+)\]", upload.field)
            by_index[int(found.group(1)) if found else position] = upload
        listed = body.get("attachments")
        if listed is None:
            kept = list(previous)
            return kept + [self._store_attachment(f.filename, f.data, None) for f in by_index.values()]
        old = {a.id: a for a in previous}
        result: list[FakeAttachment] = []
        used: set[int] = set()
        for i, entry in enumerate(listed):
            ref = _int(str(entry.get("id")))
            if ref in old:
                result.append(old[ref])
            elif ref in by_index:
                upload = by_index[ref]
                used.add(ref)
                result.append(self._store_attachment(entry.get("filename") or upload.filename, upload.data, None,
                                                     entry.get("description")))
            else:
                raise _form_error(f"attachments.{i}.id", "ATTACHMENT_NOT_FOUND", "Unknown attachment reference.")
        result += [self._store_attachment(u.filename, u.data, None) for n, u in by_index.items() if n not in used]
        return result

    def _create_message(self, channel: FakeChannel, body: Mapping[str, Any], files: list[UploadedFile], *,
                        kind: str, interaction: FakeInteraction | None, allowed_flags: int,
                        allow_empty: bool = False) -> FakeMessage:
        flags = int(body.get("flags") or 0) & allowed_flags
        reference = body.get("message_reference")
        replied_author = None
        if reference:
            target = self._messages.get(_int(str(reference.get("message_id", "0"))))
            if target is None and reference.get("fail_if_not_exists", True):
                raise _form_error("message_reference", "REPLIES_UNKNOWN_MESSAGE", "Unknown message")
            replied_author = target.author.id if target is not None else None
        version = self._version(channel, body, files, None, flags=flags, reference_author=replied_author,
                                require_body=not allow_empty)
        msg_type = 20 if kind == "interaction_response" and interaction is not None and interaction.type == 2 else (
            19 if reference else 0)
        message = FakeMessage(
            self._ids.next(), channel.id, channel.guild_id, self.bot, kind, msg_type, [version], version.wall,
            interaction_id=interaction.id if interaction else None,
            webhook_id=self.application_id if interaction else None,
            reference={**reference, "channel_id": str(channel.id)} if reference else None,
        )
        self._messages[message.id] = message
        return message

    def _edit_message(self, message: FakeMessage, body: Mapping[str, Any], files: list[UploadedFile]) -> None:
        previous = message.current
        # Editing clears "loading" and may toggle SUPPRESS_EMBEDS; ephemerality never changes.
        flags = previous.flags & ~MSG_FLAG_LOADING
        if body.get("flags") is not None:
            flags = (flags & ~MSG_FLAG_SUPPRESS_EMBEDS) | (int(body["flags"]) & MSG_FLAG_SUPPRESS_EMBEDS)
        version = self._version(self.channels[message.channel_id], body, files, previous, flags=flags,
                                reference_author=None, require_body=True)
        message.versions.append(version)


# --------------------------------------------------------------------------------------------------- module helpers


def _id_of(obj: Any) -> int:
    return int(obj if isinstance(obj, int) else obj.id)


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise _form_error("_root", "NUMBER_TYPE_COERCE", f"Value {text!r} is not snowflake.") from None


def _python_option_type(value: Any) -> int:
    for py_type, opt_type in _OPTION_PY_TYPES:
        if isinstance(value, py_type):
            return opt_type
    return {FakeUser: 6, FakeChannel: 7, FakeRole: 8, FakeUpload: 11}.get(type(value), 3)


def _check_option_value(spec: Mapping[str, Any], value: Any) -> None:
    """What a Discord client enforces before sending an option value."""
    name, opt_type = spec["name"], spec["type"]
    expected: dict[int, tuple[type, ...]] = {3: (str,), 4: (int,), 5: (bool,), 10: (int, float), 6: (FakeUser, int),
                                             7: (FakeChannel, int), 8: (FakeRole,), 9: (FakeUser, FakeRole),
                                             11: (FakeUpload,)}
    kinds = expected.get(opt_type, (object,))
    if not isinstance(value, kinds) or (opt_type in (4, 10) and isinstance(value, bool)):
        raise TypeError(f"option {name!r} has type {opt_type}; {value!r} is not a {kinds}")
    choices = spec.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise ValueError(f"option {name!r}: {value!r} is not one of the choices {[c['value'] for c in choices]}")
    if opt_type in (4, 10):
        if spec.get("min_value") is not None and value < spec["min_value"]:
            raise ValueError(f"option {name!r}: {value} is below min_value {spec['min_value']}")
        if spec.get("max_value") is not None and value > spec["max_value"]:
            raise ValueError(f"option {name!r}: {value} is above max_value {spec['max_value']}")
    if opt_type == 3:
        if not spec.get("min_length", 0) <= len(value) <= spec.get("max_length", 6000):
            raise ValueError(f"option {name!r}: length {len(value)} is outside min_length/max_length")
    if opt_type == 7 and spec.get("channel_types") and isinstance(value, FakeChannel):
        if value.type not in spec["channel_types"]:
            raise ValueError(f"option {name!r}: channel type {value.type} not in {spec['channel_types']}")


def _validate_command(cmd: Any, path: str) -> None:
    if not isinstance(cmd, dict):
        raise _form_error(path, "MODEL_TYPE_CONVERT", "Must be an object.")
    name = cmd.get("name") or ""
    cmd_type = cmd.get("type", 1)
    if cmd_type == 1 and (not _COMMAND_NAME.match(name) or name != name.lower()):
        raise _form_error(f"{path}.name", "APPLICATION_COMMAND_INVALID_NAME", f"Command name {name!r} is invalid")
    if cmd_type == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
        raise _form_error(f"{path}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
    options = cmd.get("options") or []
    if len(options) > 25:
        raise _form_error(f"{path}.options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    seen_optional = False
    for j, opt in enumerate(options):
        if opt.get("type") in (1, 2):
            _validate_command({**opt, "type": 1}, f"{path}.options.{j}")
            continue
        if opt.get("required"):
            if seen_optional:
                raise _form_error(f"{path}.options.{j}", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                                  "Required options must be placed before non-required options")
        else:
            seen_optional = True
        if len(opt.get("choices") or []) > 25:
            raise _form_error(f"{path}.options.{j}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")


def _validate_modal(data: Mapping[str, Any]) -> None:
    if not data.get("custom_id") or len(data["custom_id"]) > 100:
        raise _form_error("data.custom_id", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
    if not data.get("title") or len(data["title"]) > 45:
        raise _form_error("data.title", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length.")
    if not 1 <= len(data.get("components") or []) <= 5:
        raise _form_error("data.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")


async def _read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """JSON body, or multipart with ``payload_json`` + ``files[n]`` parts (bytes kept exactly)."""
    if request.content_type == "multipart/form-data":
        payload: Any = None
        files: list[UploadedFile] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = await part.read(decode=False)  # type: ignore[union-attr]
            if part.name == "payload_json":
                payload = json.loads(data.decode("utf-8"))
            elif part.filename is not None:  # type: ignore[union-attr]
                files.append(UploadedFile(part.name or "", part.filename,  # type: ignore[union-attr]
                                          part.headers.get("Content-Type"), bytes(data)))
        return payload, files
    raw = await request.read()
    if not raw:
        return None, []
    try:
        return json.loads(raw), []
    except ValueError:
        raise DiscordAPIError(400, 50109, "The request body contains invalid JSON.") from None


# --------------------------------------------------------------------------------------------------- client helper


@contextlib.asynccontextmanager
async def running_client(client: discord.Client, fake: FakeDiscord, *,
                         ready_timeout: float = 5.0) -> AsyncIterator[discord.Client]:
    """Start ``client`` against ``fake`` (URLs must already point at it), wait for ``on_ready``, close it on exit.

    ``Client.start`` dies silently on a gateway parse error; this surfaces that as ``ClientCrashed`` (also from
    ``fake.wait_for`` while the block runs). Build the client with a small ``guild_ready_timeout`` (e.g. 0.05):
    discord.py waits that long after the last GUILD_CREATE before ``on_ready`` (default 2 s).
    """
    task = asyncio.create_task(client.start(fake.token), name="discord-client-start")
    fake.watch_task(task)
    body_failed = False
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        while not client.is_ready():
            if task.done():
                fake._raise_crashed()
            if loop.time() > deadline:
                raise TimeoutError(f"client not ready within {ready_timeout}s")
            await asyncio.sleep(0.01)
        yield client
        fake._raise_crashed()
    except BaseException:
        body_failed = True
        raise
    finally:
        fake.unwatch_task(task)
        await client.close()
        # Client.close() leaves a pending on_ready countdown (ConnectionState._ready_task) if READY came just before.
        ready_countdown = getattr(client._connection, "_ready_task", None)  # private discord.py 2.7 attribute
        if ready_countdown is not None and not ready_countdown.done():
            ready_countdown.cancel()
            await asyncio.wait({ready_countdown})
        await asyncio.wait({task}, timeout=5.0)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        if error is not None and not body_failed:
            raise ClientCrashed(f"Client.start failed: {error!r}") from error


__all__ = [
    "ACK_WINDOW_S", "ClientCrashed", "Clock", "CommandSync", "DEFAULT_BOT_PERMISSIONS", "DEFAULT_EVERYONE_PERMISSIONS",
    "DEFAULT_TOKEN", "DiscordAPIError", "FakeAttachment", "FakeChannel", "FakeClock", "FakeDiscord", "FakeGuild",
    "FakeInteraction", "FakeMember", "FakeMessage", "FakeRole", "FakeServerError", "FakeUpload", "FakeUser", "Intent",
    "MessageVersion", "Perm", "Pings", "ROUTE_KEYS", "RestCall", "TOKEN_LIFETIME_S", "UploadedFile", "compute_pings",
    "running_client",
]


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Autouse in the Discord test modules that import it: every client, server and follower task a test started
    must be finished when it ends."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not leaked, f"tasks left running: {leaked}"
