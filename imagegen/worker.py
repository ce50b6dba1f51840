"""The arq worker: the job function, its retry policy and the process's long-lived clients.

`arq imagegen.WorkerSettings` reads `WorkerSettings` as a mapping; its settings are built from the
environment the first time arq reads it (at start, not at import), and a bad setting stops the worker
with one line.
"""

from __future__ import annotations

import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from arq.connections import RedisSettings
from arq.worker import func
from loguru import logger
from redis import Redis as SyncRedis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigError
from .heartbeat import Heartbeat
from .jimeng import JimengClient
from .jobs import JobRunner
from .ledger import GenerationLedger
from .logs import setup_logging
from .pipeline import Pipeline, Services
from .pocketbase import PocketBaseClient
from .settings import Settings, load_settings, require
from .state import PauseGate, QueueState
from .storage import Storage, open_s3_client

JOB_NAME = "generate_images"
ARQ_MAX_TRIES = 100_000
WORKER_REQUIRED = (
    "jimeng_api_key",
    "jimeng_api_url",
    "tos_bucket",
    "tos_endpoint",
    "pocketbase_url",
    "pocketbase_email",
    "pocketbase_password",
)


def redis_settings(settings: Settings, *, retries: int = 3) -> RedisSettings:
    """arq's connection settings; a worker rides out a Redis restart, a CLI command fails fast."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return RedisSettings(
        host=settings.redis_host,
        port=settings.redis_port,
        password=password or None,
        database=settings.redis_db,
        conn_timeout=3,
        conn_retries=retries,
        conn_retry_delay=1,
        retry=RedisRetry(ExponentialBackoff(cap=5.0, base=0.2), retries=30) if retries else None,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError] if retries else None,
        retry_on_timeout=bool(retries),
    )


async def startup(ctx: dict[str, Any]) -> None:
    """Create the process's clients once: one HTTP session, one S3 client, one PocketBase login."""
    settings: Settings = ctx["settings"]
    stack = AsyncExitStack()
    http = await stack.enter_async_context(
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=15))
    )
    s3 = await stack.enter_async_context(open_s3_client(settings))
    state = QueueState(ctx["redis"], settings.queue_max_failed)
    services = Services(
        settings=settings,
        http=http,
        pocketbase=PocketBaseClient(http, settings),
        jimeng=JimengClient(http, settings),
        storage=Storage(s3, settings),
        ledger=GenerationLedger(ctx["redis"], settings.queue_keep_result),
        gate=PauseGate(state),
    )
    heartbeat = Heartbeat(ctx["redis"], state, settings.queue_name)
    heartbeat.start()
    stack.push_async_callback(heartbeat.stop)
    ctx["exit_stack"] = stack
    ctx["services"] = services
    ctx["runner"] = JobRunner(services, Pipeline(services), state, heartbeat)
    paused = await state.paused()
    if paused is not None:
        logger.warning("the queue is paused since {}: {}; `imagegen resume` continues", paused.since, paused.reason)
    logger.info(
        "worker ready: queue {}, concurrency {}, jimeng {} ({} {}), bucket {}, pocketbase {}/{}",
        settings.queue_name,
        settings.queue_concurrency,
        settings.jimeng_api_url,
        settings.jimeng_ratio,
        settings.jimeng_resolution,
        settings.tos_bucket,
        settings.pocketbase_url,
        settings.pocketbase_collection,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    stack: AsyncExitStack | None = ctx.pop("exit_stack", None)
    if stack is not None:
        await stack.aclose()
    logger.info("worker stopped")


async def generate_images(ctx: dict[str, Any], prompt_id: str, force: bool = False) -> dict[str, Any]:
    """The job: bring one prompt record to `done` (see `jobs` for the failure policy)."""
    runner: JobRunner = ctx["runner"]
    return await runner.run(prompt_id, force)


def worker_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of arq's Worker for these settings."""
    return {
        # Attempts are counted by the job itself (waiting while paused must not use them), so arq's own
        # limit only guards against a job bouncing forever.
        "functions": [func(generate_images, name=JOB_NAME, max_tries=ARQ_MAX_TRIES)],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.queue_concurrency,
        "job_timeout": settings.queue_job_timeout,
        "keep_result": settings.queue_keep_result,
        "ctx": {"settings": settings},
        "health_check_interval": 30,
        "job_completion_wait": settings.worker_shutdown_grace,
    }


def wait_for_redis(settings: Settings, cap: float = 30.0) -> None:
    """Block until Redis answers, one log line per failed try: a worker outlives a Redis that is down."""
    connection = redis_settings(settings, retries=0)
    delay = 1.0
    while True:
        client = SyncRedis(
            host=str(connection.host),
            port=connection.port,
            db=connection.database,
            password=connection.password,
            socket_connect_timeout=connection.conn_timeout,
        )
        try:
            client.ping()
            return
        except (RedisError, OSError) as exc:
            logger.warning(
                "cannot reach Redis at {}:{} ({}); check REDIS_HOST/REDIS_PORT/REDIS_PASSWORD; retrying in {:.0f}s",
                settings.redis_host,
                settings.redis_port,
                type(exc).__name__,
                delay,
            )
        finally:
            client.close()
        time.sleep(delay)
        delay = min(cap, delay * 2)


def settings_for_worker() -> Settings:
    """Settings for a worker process, with logging set up; a bad setting ends the process with one line."""
    try:
        settings = load_settings()
        require(settings, *WORKER_REQUIRED)
    except ConfigError as exc:
        sys.stderr.write(f"imagegen worker: {exc}\n")
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.secrets())
    wait_for_redis(settings)
    return settings


class LazyWorkerSettings(dict[str, Any]):
    """arq reads worker settings from a class or a mapping; as a mapping they can be built at start-up."""

    def _load(self) -> None:
        if not self:
            self.update(worker_options(settings_for_worker()))

    def items(self) -> Any:
        self._load()
        return super().items()

    def get(self, key: str, default: Any = None) -> Any:
        self._load()
        return super().get(key, default)
