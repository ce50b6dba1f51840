"""The arq worker: the job function, its retry policy and the process's long-lived clients.

`arq imagegen.WorkerSettings` reads `WorkerSettings` as a mapping; its settings are built from the
environment the first time arq reads it (at start, not at import), and a bad setting stops the worker
with one line.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from contextlib import AsyncExitStack
from typing import Any, TypedDict

import aiohttp
from arq import Retry
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func
from loguru import logger

from .errors import ConfigError, FailureKind, ImagegenError, RecordNotFound
from .jimeng import JimengClient
from .ledger import GenerationLedger
from .logs import setup_logging
from .models import RecordStatus
from .pipeline import Pipeline, Services
from .pocketbase import PocketBaseClient
from .settings import Settings, load_settings, require
from .storage import Storage, open_s3_client

JOB_NAME = "generate_images"
WORKER_REQUIRED = (
    "jimeng_api_key",
    "jimeng_api_url",
    "tos_bucket",
    "tos_endpoint",
    "pocketbase_url",
    "pocketbase_email",
    "pocketbase_password",
)


class WorkerContext(TypedDict, total=False):
    """What arq's `ctx` holds for our job: arq's own keys and the clients made at start-up."""

    redis: ArqRedis
    job_id: str
    job_try: int
    settings: Settings
    services: Services
    pipeline: Pipeline
    exit_stack: AsyncExitStack


def redis_settings(settings: Settings, *, retries: int = 3) -> RedisSettings:
    """arq's connection settings; a worker retries a lost Redis, a CLI command fails fast."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return RedisSettings(
        host=settings.redis_host,
        port=settings.redis_port,
        password=password or None,
        database=settings.redis_db,
        conn_timeout=3,
        conn_retries=retries,
        conn_retry_delay=1,
    )


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff from QUEUE_BACKOFF with up to 25% jitter; a longer Retry-After wins."""
    delay: float = settings.queue_backoff * (2 ** (attempt - 1)) * random.uniform(1.0, 1.25)
    return max(delay, retry_after or 0.0)


async def startup(ctx: dict[str, Any]) -> None:
    """Create the process's clients once: one HTTP session, one S3 client, one PocketBase login."""
    settings: Settings = ctx["settings"]
    stack = AsyncExitStack()
    http = await stack.enter_async_context(
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=15))
    )
    s3 = await stack.enter_async_context(open_s3_client(settings))
    services = Services(
        settings=settings,
        http=http,
        pocketbase=PocketBaseClient(http, settings),
        jimeng=JimengClient(http, settings),
        storage=Storage(s3, settings),
        ledger=GenerationLedger(ctx["redis"], settings.queue_keep_result),
    )
    ctx["exit_stack"] = stack
    ctx["services"] = services
    ctx["pipeline"] = Pipeline(services)
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


async def _record_failure(services: Services, prompt_id: str, status: RecordStatus, error: str) -> None:
    """Write the failure onto the record; a record store that is down too must not hide the first error."""
    try:
        await services.pocketbase.set_status(prompt_id, status, error[:4000])
    except RecordNotFound:
        logger.bind(prompt_id=prompt_id).warning("record was deleted; nothing to mark")
    except ImagegenError as exc:
        logger.bind(prompt_id=prompt_id).warning("could not mark the record {}: {}", status.value, exc)


async def generate_images(ctx: dict[str, Any], prompt_id: str, force: bool = False) -> dict[str, Any]:
    """The job: bring one prompt record to `done`, retrying transient failures with backoff."""
    settings: Settings = ctx["settings"]
    services: Services = ctx["services"]
    attempt: int = ctx.get("job_try", 1)
    log = logger.bind(prompt_id=prompt_id)
    started = time.monotonic()
    log.info("job started (attempt {}/{})", attempt, settings.queue_attempts)
    try:
        result = await ctx["pipeline"].run(prompt_id, force=force)
    except asyncio.CancelledError:
        # Shutdown past the grace period: arq puts the job back in the queue; the record says so too.
        note = "the worker stopped during this job; it is queued again"
        await asyncio.shield(_record_failure(services, prompt_id, RecordStatus.QUEUED, note))
        raise
    except ImagegenError as exc:
        if exc.kind is FailureKind.TRANSIENT and attempt < settings.queue_attempts:
            delay = retry_delay(settings, attempt, getattr(exc, "retry_after", None))
            note = f"attempt {attempt} of {settings.queue_attempts} failed: {exc}; retrying in {delay:.0f}s"
            log.warning(note)
            await _record_failure(services, prompt_id, RecordStatus.QUEUED, note)
            raise Retry(defer=delay) from None
        elapsed = time.monotonic() - started
        log.error("job failed after {:.1f}s ({} failure, attempt {}): {}", elapsed, exc.kind.value, attempt, exc)
        if not isinstance(exc, RecordNotFound):
            await _record_failure(services, prompt_id, RecordStatus.FAILED, str(exc))
        return {"status": "failed", "kind": exc.kind.value, "error": str(exc), "attempt": attempt}
    if result.skipped:
        return {"status": "done", "skipped": True, "images": [], "attempt": attempt}
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    log.info("job done: {} images ({})", len(result.images), timings)
    return {
        "status": "done",
        "images": [image.public_url for image in result.images],
        "generated": result.generated,
        "timings": result.timings,
        "attempt": attempt,
    }


def worker_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of arq's Worker for these settings."""
    return {
        "functions": [func(generate_images, name=JOB_NAME, max_tries=settings.queue_attempts + 2)],
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


def settings_for_worker() -> Settings:
    """Settings for a worker process, with logging set up; a bad setting ends the process with one line."""
    try:
        settings = load_settings()
        require(settings, *WORKER_REQUIRED)
    except ConfigError as exc:
        sys.stderr.write(f"imagegen worker: {exc}\n")
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.secrets())
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
