"""`[cluster]` settings: pure pydantic, no redis (the config is validated by every command)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

REDIS_URL_ENV = "DRAWBOT_REDIS_URL"


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """`drawbot run` publishes accepted jobs to Redis for `drawbot worker` processes instead of drawing them."""
    redis_url_file: Path | None = None
    """A file (chmod 600) holding the Redis URL with its password, e.g. `redis://:PASSWORD@192.168.1.10:6379/0`.
    DRAWBOT_REDIS_URL in the environment wins. Never written in the TOML itself."""
    namespace: str = Field(default="drawbot", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    """Prefix of every Redis key: two bots can share one Redis with different namespaces."""
    local_worker: bool = False
    """`drawbot run` also draws on this machine's GPU (one worker in the bot process)."""
    lease_seconds: float = Field(default=60.0, ge=0.5, le=3600)
    """A worker renews the lease of the job it draws every lease_seconds/4; one silent for lease_seconds (killed,
    power cut, network gone) loses the job to another worker."""
    heartbeat_seconds: float = Field(default=5.0, ge=0.1, le=600)
    """Workers announce themselves this often; one not heard from for three heartbeats is no longer live."""
    result_keep_seconds: float = Field(default=3600.0, ge=10, le=7 * 86400)
    """How long a finished picture waits in Redis for the bot (a bot down longer than this has it drawn again)."""
    max_pixels: int = Field(default=2048 * 2048, ge=64 * 64, le=2048 * 2048)
    """`drawbot worker`: the largest picture (width x height) this worker draws; lower it for a small card."""
    step_sleep: float = Field(default=0.0, ge=0, le=60)
    """`drawbot worker`, benchmarks and tests only: sleep this many seconds per step, as if the GPU were slower."""


class RedisUrlError(Exception):
    """No usable Redis URL; the message says how to give one."""


def read_redis_url(settings: ClusterSettings) -> str:
    """The Redis URL from DRAWBOT_REDIS_URL, else from `redis_url_file`."""
    value = os.environ.get(REDIS_URL_ENV, "").strip()
    if not value and settings.redis_url_file is not None:
        try:
            value = Path(settings.redis_url_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RedisUrlError(f"[cluster].redis_url_file: cannot read {settings.redis_url_file}: "
                                f"{exc.strerror}") from None
        if not value:
            raise RedisUrlError(f"[cluster].redis_url_file: {settings.redis_url_file} is empty")
    if not value:
        raise RedisUrlError(f"no Redis URL: set {REDIS_URL_ENV}=redis://:PASSWORD@HOST:6379/0 in the environment, "
                            "or put the URL alone in a file (chmod 600) and name it with [cluster].redis_url_file")
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise RedisUrlError("the Redis URL must start with redis://, rediss:// or unix:// "
                            "(e.g. redis://:PASSWORD@192.168.1.10:6379/0)")
    return value


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"
