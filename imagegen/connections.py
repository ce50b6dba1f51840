"""How every process reaches Redis: arq's connection settings, built from imagegen's settings.

A worker rides out Redis outages inside each call: connection errors, timeouts and a Redis that refuses
writes (maxmemory reached, a read-only replica after a failover) are retried with capped exponential backoff
for about two minutes, with one log line when the outage starts and one when Redis answers again. A CLI
command fails fast instead, with one readable line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from arq.connections import RedisSettings
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings

T = TypeVar("T")

# Errors that mean "Redis is unavailable for now", not "this command is wrong". OSError is what a refused
# connection raises before redis-py wraps it, inside its own connect retry.
REDIS_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    OSError,
)
# A password Redis refuses (or one it does not expect, or none where it wants one) is a settings error,
# not an outage: retrying can't fix it.
REDIS_AUTH_ERRORS = (AuthenticationError, AuthenticationWrongNumberOfArgsError)
RETRIES = 30
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0


def is_redis_outage(exc: BaseException) -> bool:
    return isinstance(exc, REDIS_OUTAGE_ERRORS) and not isinstance(exc, REDIS_AUTH_ERRORS)


def redis_auth_message(settings: Settings, exc: BaseException) -> str:
    given = "the password in REDIS_PASSWORD" if settings.redis_password else "no password (REDIS_PASSWORD is empty)"
    return (
        f"Redis at {settings.redis_host}:{settings.redis_port} refused {given} ({type(exc).__name__}) - "
        "fix REDIS_PASSWORD in the environment or .env"
    )


class OutageLoggingRetry(Retry):
    """redis-py's retry loop, saying once when Redis becomes unavailable and once when it is back."""

    def __init__(self) -> None:
        errors = cast(tuple[type[RedisError], ...], REDIS_OUTAGE_ERRORS)
        super().__init__(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), RETRIES, errors)
        self.down_since: float | None = None

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]) -> T:
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        while True:
            try:
                result = await do()
            except self._supported_errors as error:
                if isinstance(error, REDIS_AUTH_ERRORS):
                    raise
                failures += 1
                await fail(error)
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    logger.warning("Redis unavailable ({}: {}); retrying with backoff", type(error).__name__, error)
                if 0 <= self._retries < failures:
                    raise
                await asyncio.sleep(self._backoff.compute(failures))
                continue
            if self.down_since is not None:
                logger.info("Redis answers again after {:.1f} s", time.monotonic() - self.down_since)
                self.down_since = None
            return result


def redis_settings(settings: Settings, *, ride_out_outages: bool = True) -> RedisSettings:
    """arq's connection settings; a worker rides out Redis outages, a CLI command fails fast."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return RedisSettings(
        host=settings.redis_host,
        port=settings.redis_port,
        password=password or None,
        database=settings.redis_db,
        conn_timeout=3,
        conn_retries=3 if ride_out_outages else 0,
        conn_retry_delay=1,
        retry=OutageLoggingRetry() if ride_out_outages else None,
        retry_on_error=list(REDIS_OUTAGE_ERRORS) if ride_out_outages else None,
        retry_on_timeout=ride_out_outages,
    )
