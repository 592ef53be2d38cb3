"""A Redis client for the cluster, and the one retry policy for "Redis is unreachable or refuses writes for a
while": a clear log line, then exponential backoff (tenacity), never a crash."""

from __future__ import annotations

import logging
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never, wait_exponential

from bot.cluster.settings import redacted

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
"""What a Redis that is down, restarting (LOADING) or cut off raises."""
REFUSALS = ("MISCONF", "NOREPLICAS", "MASTERDOWN", "BUSY", "TRYAGAIN")
"""Error codes of a Redis that answers but refuses writes for a while: its disk is full or failing (MISCONF), it
waits for replicas or its master, a script runs too long. With READONLY and OOM (their own exception classes)."""
SOCKET_TIMEOUT = 10.0


def is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, (ReadOnlyError, OutOfMemoryError)):
        return True
    if not isinstance(exc, ResponseError):
        return False
    # A pipeline names the command first: "Command # 1 (SET ...) of pipeline caused error: NOREPLICAS ..."
    message = str(exc).rsplit("caused error: ", 1)[-1].lstrip("('\"")
    return message.split(" ", 1)[0] in REFUSALS


def is_transient(exc: BaseException) -> bool:
    """Unreachable or refusing for now: retried, said once. Anything else is a bug or a setup error."""
    return isinstance(exc, UNREACHABLE) or is_refusal(exc)


def trouble(exc: BaseException) -> str:
    """What is wrong with Redis, for "Redis at <url> ..." lines."""
    if isinstance(exc, AuthenticationError):
        return f"refuses the password ({describe(exc)})"
    return f"refuses writes ({describe(exc)})" if is_refusal(exc) else f"is unreachable ({describe(exc)})"


def start_refused(url: str, exc: BaseException) -> str | None:
    """At start, Redis answering no (a password it refuses, an ACL without a command drawbot needs, a key of another
    type in the way) is a set-up error: the line that says so, with the fix, for an exit 2. An outage is not (None):
    it is waited out. Later in a run the same answers are retried (the owner may be fixing them)."""
    if isinstance(exc, AuthenticationError):
        return (f"Redis at {redacted(url)} refuses the password ({describe(exc)}): set the one in its requirepass in "
                "DRAWBOT_REDIS_URL or [cluster].redis_url_file (redis://:PASSWORD@host:6379/0)")
    if is_transient(exc) or not isinstance(exc, RedisError):
        return None
    return (f"Redis at {redacted(url)} answered {describe(exc)}: give drawbot's Redis user every command it uses "
            "(an ACL with +@all on its [cluster].namespace keys) and keep other programs' keys out of that namespace")


def log_unexpected(log: logging.Logger, exc: BaseException, message: str, *args: object) -> None:
    """An error that is neither an outage nor a refusal. Redis's own answer (an ACL refusing a command, a key of the
    wrong type) is one line in its words, which say what to fix; anything else is a bug, logged with its traceback."""
    if isinstance(exc, RedisError):
        log.error(message + ": Redis answered %s", *args, describe(exc))
    else:
        log.error(message, *args, exc_info=exc)


def client(url: str) -> aioredis.Redis:
    # Bytes in, bytes out: the PNG travels as bytes; text fields are decoded where read (protocol.text).
    # socket_timeout bounds every read (the longest BLOCK used is 1 s), so a Redis that is frozen or cut off by the
    # network raises TimeoutError, which is retried, instead of hanging a worker or the bot for ever.
    # retry: a pooled connection opened before Redis restarted answers its first command with "Connection closed by
    # server"; the command is sent once more on a new connection (a Redis still down fails that too, and the callers'
    # retry policy below takes over). The scripts are fenced by tokens: a second send cannot duplicate a picture.
    return aioredis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT,
                                   socket_keepalive=True, health_check_interval=15, retry=Retry(NoBackoff(), 1))


def describe(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    return message.splitlines()[0][:200]


def retrying(what: str, log: logging.Logger, url: str, *, max_wait: float = 30.0,
             attempts: Any = stop_never, retry_if: Callable[[BaseException], bool] = is_transient) -> AsyncRetrying:
    """`async for attempt in retrying(...): with attempt: ...` retries while Redis is unreachable or refuses writes:
    one warning line at the first failure, the later retries (backing off up to max_wait) at debug level."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
        log.log(level, "Redis at %s %s while %s; retrying (every %.1f s at most %.0f s apart)",
                redacted(url), trouble(exc) if exc else "is unreachable (?)", what, wait, max_wait)

    return AsyncRetrying(retry=retry_if_exception(retry_if), wait=wait_exponential(multiplier=0.25, max=max_wait),
                         stop=attempts, before_sleep=before_sleep, reraise=True)
