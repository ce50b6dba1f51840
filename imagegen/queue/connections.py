"""How every process reaches Redis: arq's connection settings, built from imagegen's settings.

A worker rides out Redis outages inside each call: connection errors, timeouts and a Redis that refuses
writes (maxmemory reached, a read-only replica after a failover) are retried with capped exponential backoff
for about two minutes, with one log line when the outage starts and one when Redis answers again. A CLI
command fails fast instead, with one readable line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from arq.connections import RedisSettings
from loguru import logger
from redis import Redis as SyncRedis
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
from redis.sentinel import Sentinel as SyncSentinel

from imagegen.settings import Settings

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
    if settings.redis_url is not None and not settings.redis_sentinels:
        given, fix = "the password in REDIS_URL", "REDIS_URL"
    elif settings.redis_password:
        given, fix = "the password in REDIS_PASSWORD", "REDIS_PASSWORD"
    else:
        given, fix = "no password (REDIS_PASSWORD is empty)", "REDIS_PASSWORD"
    return f"{settings.redis_location()} refused {given} ({type(exc).__name__}) - fix {fix} in the environment or .env"


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
    """arq's connection settings: REDIS_SENTINELS, else REDIS_URL, else REDIS_HOST/PORT/PASSWORD/DB.

    A worker rides out Redis outages, a CLI command fails fast."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    if settings.redis_sentinels:
        where = RedisSettings(
            host=settings.sentinel_hosts(),  # arq takes the list of sentinels as `host`
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
            password=password or None,
            database=settings.redis_db,
        )
    elif settings.redis_url is not None:
        where = RedisSettings.from_dsn(settings.redis_url.get_secret_value())
    else:
        where = RedisSettings(host=settings.redis_host, port=settings.redis_port, database=settings.redis_db)
        where.password = password or None
    return dataclasses.replace(
        where,
        ssl_ca_certs=settings.redis_tls_ca_file or None,
        conn_timeout=3,
        conn_retries=3 if ride_out_outages else 0,
        conn_retry_delay=1,
        retry=OutageLoggingRetry() if ride_out_outages else None,
        retry_on_error=list(REDIS_OUTAGE_ERRORS) if ride_out_outages else None,
        retry_on_timeout=ride_out_outages,
    )


def sync_client(connection: RedisSettings) -> SyncRedis:
    """A plain blocking client for the same Redis (the worker's wait for Redis at start-up)."""
    if connection.sentinel:
        sentinels = cast(list[tuple[str, int]], connection.host)
        sentinel = SyncSentinel(sentinels, socket_timeout=connection.conn_timeout)  # type: ignore[no-untyped-call]
        master: SyncRedis = sentinel.master_for(  # type: ignore[no-untyped-call]
            connection.sentinel_master, password=connection.password, db=connection.database
        )
        return master
    return SyncRedis(
        host=str(connection.host),
        port=connection.port,
        db=connection.database,
        username=connection.username,
        password=connection.password,
        ssl=connection.ssl,
        ssl_ca_certs=connection.ssl_ca_certs,
        socket_connect_timeout=connection.conn_timeout,
        socket_timeout=connection.conn_timeout,
    )
