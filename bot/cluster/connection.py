"""A Redis client for the cluster, and the one retry policy for "Redis is unreachable": a clear log line, then
exponential backoff (tenacity), never a crash."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never, wait_exponential

from bot.cluster.settings import redacted

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
"""What a Redis that is down, restarting (LOADING) or cut off raises."""
SOCKET_TIMEOUT = 10.0


def client(url: str) -> aioredis.Redis:
    # Bytes in, bytes out: the PNG travels as bytes; text fields are decoded where read (protocol.text).
    # socket_timeout bounds every read (the longest BLOCK used is 1 s), so a Redis that is frozen or cut off by the
    # network raises TimeoutError, which is retried, instead of hanging a worker or the bot for ever.
    return aioredis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT,
                                   socket_keepalive=True, health_check_interval=15)


def describe(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    return message.splitlines()[0][:200]


def retrying(what: str, log: logging.Logger, url: str, *, max_wait: float = 30.0,
             attempts: Any = stop_never) -> AsyncRetrying:
    """`async for attempt in retrying(...): with attempt: ...` retries while Redis is unreachable: one warning line
    at the first failure, the later retries (backing off up to max_wait) at debug level."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
        log.log(level, "Redis at %s is unreachable (%s) while %s; retrying (every %.1f s at most %.0f s apart)",
                redacted(url), describe(exc) if exc else "?", what, wait, max_wait)

    return AsyncRetrying(retry=retry_if_exception_type(UNREACHABLE), wait=wait_exponential(multiplier=0.25, max=max_wait),
                         stop=attempts, before_sleep=before_sleep, reraise=True)
