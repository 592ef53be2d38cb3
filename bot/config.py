"""The whole config file: load `config.toml` with tomllib, validate with pydantic, fail with file + key + what is allowed.

Bot tokens never live in the TOML: they come from `DRAWBOT_TELEGRAM_TOKEN` / `DRAWBOT_DISCORD_TOKEN` or from a file named
by `token_file` (mode 0600, outside the repo). A `token` key in the file is an error that says so.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from bot.cluster.settings import ClusterSettings
from engine.settings import EngineSettings


class ConfigError(Exception):
    """A config problem, worded for the bot's owner (file, key, what is allowed)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(_Section):
    state_dir: Path = Path("state")
    """Database and images live here. The systemd unit points it at /var/lib/drawbot."""
    database: Path | None = None
    """Defaults to `<state_dir>/drawbot.sqlite3`."""
    keep_images_days: int = Field(default=30, ge=0)
    """Delete stored images older than this (0 = keep forever)."""
    keep_images_count: int = Field(default=2000, ge=0)
    """Keep at most this many stored images (0 = no limit)."""

    @property
    def database_path(self) -> Path:
        return self.database if self.database is not None else self.state_dir / "drawbot.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"


class LimitSettings(_Section):
    cooldown_seconds: float = Field(default=10, ge=0)
    max_active_per_user: int = Field(default=2, ge=1)
    """Jobs queued or running per user at once."""
    per_hour: int = Field(default=30, ge=0)
    """Accepted jobs per user per rolling hour (0 = no limit)."""
    per_day: int = Field(default=200, ge=0)
    """Accepted jobs per user per rolling day (0 = no limit)."""
    queue_cap: int = Field(default=50, ge=1)
    """Jobs queued or running for everyone together."""
    max_prompt_chars: int = Field(default=1000, ge=1, le=20_000)
    max_prompt_tokens: int = Field(default=512, ge=1, le=512)
    """T5 reads at most 512 tokens; a longer prompt is refused rather than cut silently."""
    admins: list[str] = []
    """Exempt from limits; may use admin commands. Written `platform:user_id`, e.g. "telegram:12345"."""
    banned: list[str] = []
    """Get one polite refusal. Same form as `admins`."""

    @field_validator("admins", "banned")
    @classmethod
    def _platform_ids(cls, values: list[str]) -> list[str]:
        for value in values:
            platform, _, user = value.partition(":")
            if platform not in ("telegram", "discord", "console", "web") or not user:
                raise ValueError(f"{value!r} should look like 'telegram:12345', 'discord:1234567890', 'console:you' "
                                 "or 'web:alice'")
        return values


class PolicySettings(_Section):
    allowed_users: list[str] = []
    """`platform:user_id`; empty = everyone."""
    allowed_chats: list[str] = []
    """`platform:chat_id` (Telegram chat, Discord guild); empty = everywhere."""
    blocked_words: list[str] = []
    """Case-insensitive regular expressions; a prompt matching one is refused."""
    nsfw_spoiler: bool = False
    """Send every picture behind a spoiler."""

    @field_validator("blocked_words")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


class TelegramSettings(_Section):
    enabled: bool | None = None
    """None = on when a token is found."""
    token_file: Path | None = None
    api_base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    progress_interval_private: float = Field(default=1.5, ge=0.5)
    progress_interval_group: float = Field(default=4.0, ge=1.0)


class DiscordSettings(_Section):
    enabled: bool | None = None
    """None = on when a token is found."""
    token_file: Path | None = None
    allowed_guilds: list[int] = []
    """Empty = every guild the bot is in."""
    allowed_channels: list[int] = []
    """Empty = every channel of the allowed guilds."""
    allow_dms: bool = True
    dev_guild: int | None = None
    """Sync commands to this guild only (instant, for development)."""
    progress_interval: float = Field(default=2.0, ge=1.0)
    api_base_url: str = "https://discord.com/api/v10"
    """Discord's REST API, version included (another only for a proxy, or a test's fake Discord)."""
    gateway_url: str = "wss://gateway.discord.gg/"
    """Discord's gateway (websocket) URL."""

    @field_validator("api_base_url", "gateway_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        schemes = ("https", "http") if info.field_name == "api_base_url" else ("wss", "ws")
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"{value!r} should be a URL starting with {schemes[0]}:// or {schemes[1]}://")
        return value


class ConsoleSettings(_Section):
    enabled: bool | None = None
    """None = on when no chat platform is configured."""
    user: str = "you"


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class MetricsSettings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=1, le=65535)


class WebSettings(_Section):
    enabled: bool | None = None
    """None = on alongside an interactive console chat (`make run` in a terminal); true = always; false = never."""
    host: str = "127.0.0.1"
    """Loopback by default. Any other address needs a password (DRAWBOT_WEB_PASSWORD or `password_file`)."""
    port: int = Field(default=6006, ge=1, le=65535)
    password_file: Path | None = None
    """File holding the page's password (chmod 600). DRAWBOT_WEB_PASSWORD overrides it. None and no variable: on
    loopback, everyone who reaches the port draws, each browser as its own user."""
    admin_password_file: Path | None = None
    """File holding the owner dashboard's password; DRAWBOT_WEB_ADMIN_PASSWORD overrides it. None: no dashboard."""


class Config(_Section):
    engine: EngineSettings = EngineSettings()
    storage: StorageSettings = StorageSettings()
    limits: LimitSettings = LimitSettings()
    policy: PolicySettings = PolicySettings()
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    console: ConsoleSettings = ConsoleSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    cluster: ClusterSettings = ClusterSettings()


_TOKEN_HINT = (
    "bot tokens must not be written in the config file: set DRAWBOT_{platform}_TOKEN in the environment, "
    "or put the token alone in a file (chmod 600) and name it with `token_file`"
)


def load_config(path: Path | None) -> Config:
    """Read and validate `path` (None = all defaults). Raises ConfigError with a message for the owner."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (copy config.example.toml to start)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file: name the file itself, e.g. {path}/config.toml") \
            from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}): make it readable by the bot's user") \
            from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for platform in ("telegram", "discord"):
        if isinstance(data.get(platform), dict) and "token" in data[platform]:
            raise ConfigError(f"{path}: [{platform}].token: " + _TOKEN_HINT.format(platform=platform.upper()))
    for key, variable in (("password", "DRAWBOT_WEB_PASSWORD"), ("admin_password", "DRAWBOT_WEB_ADMIN_PASSWORD")):
        if isinstance(data.get("web"), dict) and key in data["web"]:
            raise ConfigError(f"{path}: [web].{key}: passwords must not be written in the config file: set {variable} "
                              f"in the environment, or put it alone in a file (chmod 600) named by `{key}_file`")
    cluster = data.get("cluster")
    for key in ("redis_url", "url", "password", "redis_password"):
        if isinstance(cluster, dict) and key in cluster:
            raise ConfigError(f"{path}: [cluster].{key}: the Redis URL and password must not be written in the config "
                              "file: set DRAWBOT_REDIS_URL in the environment, or put the URL alone in a file "
                              "(chmod 600) and name it with [cluster].redis_url_file")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: ErrorDetails) -> str:
    loc = [str(part) for part in err["loc"]]
    key = (f"[{loc[0]}]." + ".".join(loc[1:])) if len(loc) > 1 else loc[0] if loc else "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (see config.example.toml for the keys that exist)"
    message = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {message}{shown}"


def read_secret(variable: str, secret_file: Path | None, key: str) -> str | None:
    """A secret from the environment variable `variable`, else from `secret_file`; None when neither is set.
    `key` names the config key in errors ("[web].password_file")."""
    value = os.environ.get(variable, "").strip()
    if value:
        return value
    if secret_file is None:
        return None
    try:
        value = Path(secret_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {secret_file}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{key}: {secret_file} is empty")
    return value


def read_token(platform: Literal["telegram", "discord"], token_file: Path | None) -> str | None:
    """The bot token from DRAWBOT_<PLATFORM>_TOKEN, else from `token_file`; None when neither is set."""
    value = os.environ.get(f"DRAWBOT_{platform.upper()}_TOKEN", "").strip()
    if value:
        return value
    if token_file is None:
        return None
    try:
        value = Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"[{platform}].token_file: cannot read {token_file}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"[{platform}].token_file: {token_file} is empty")
    return value
