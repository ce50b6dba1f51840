"""The arq worker: the job function, its retry policy and the process's long-lived clients.

`arq imagegen.WorkerSettings` reads `WorkerSettings` as a mapping; its settings are built from the
environment the first time arq reads it (at start, not at import), and a bad setting stops the worker
with one line.

On SIGTERM or SIGINT the worker stops taking jobs, sends the jobs that have not reached their paid call back
to the queue at once, waits for paid calls in flight and lets jobs storing images finish, for at most
WORKER_SHUTDOWN_GRACE seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any, NoReturn

import aiohttp
from arq.worker import Worker, func
from loguru import logger
from redis.exceptions import RedisError

from .access import check_bind
from .connections import REDIS_AUTH_ERRORS, redis_auth_message, redis_settings, sync_client
from .control import Control
from .errors import ConfigError, ImagegenError, PromptFailed
from .exporter import Exporter, metrics_port
from .heartbeat import Heartbeat
from .intake import Intake
from .jimeng import JimengClient
from .jobs import JobRunner
from .keys import RedisKeys
from .ledger import GenerationLedger
from .logs import setup_logging
from .marks import RecordMarks
from .metrics import WorkerMetrics
from .models import JOB_NAME, OutcomeStatus
from .outages import POCKETBASE, STORAGE, Outages
from .permits import CallPermits
from .pipeline import Pipeline, Services
from .pocketbase import PocketBaseClient
from .priority import due_ms
from .reconcile import Reconciler
from .runs import Runs
from .settings import Settings, load_settings, require
from .slots import Slots
from .spend import Clock, Spend
from .state import PauseGate, QueueState
from .storage import Storage, open_s3_client
from .watch import Watcher

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


def _running_worker() -> Worker | None:
    """The arq Worker whose on_startup is running: arq hands its hooks only `ctx`, but a stop must reach it."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Worker):
            return candidate
        frame = frame.f_back
    return None


def install_stop_handlers(worker: Worker, runs: Runs, grace: int) -> None:
    """Replace arq's signal handlers with ones that first send interruptible jobs back to the queue."""

    def on_signal(signum: signal.Signals) -> None:
        sent_back, running = runs.stop()
        logger.info(
            "stopping on {}: {} jobs back to the queue at once, {} finishing (paid call or storing, at most {} s)",
            signum.name,
            sent_back,
            running,
            grace,
        )
        if grace:
            worker.handle_sig_wait_for_completion(signum)
        else:
            worker.handle_sig(signum)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def startup(ctx: dict[str, Any]) -> None:
    """Create the process's clients once: one HTTP session, one S3 client, one PocketBase login."""
    settings: Settings = ctx["settings"]
    stack = AsyncExitStack()
    http = await stack.enter_async_context(
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15),
            # The worker's slots bound its connections (calls, transfers, record reads); aiohttp's default cap
            # of 100 would make calls wait for connections at a high QUEUE_CONCURRENCY.
            connector=aiohttp.TCPConnector(limit=0),
        )
    )
    s3 = await stack.enter_async_context(open_s3_client(settings))
    keys = RedisKeys(settings.queue_name)
    state = QueueState(ctx["redis"], settings.queue_max_failed, keys)
    gate = PauseGate(state)
    pocketbase = PocketBaseClient(http, settings, RecordMarks(ctx["redis"], keys))
    await refuse_broken_collection(pocketbase, stack)
    storage = Storage(s3, settings)
    outages = Outages(
        state, gate, settings.outage_pause_after, probes={POCKETBASE: pocketbase.check, STORAGE: storage.check}
    )
    clock: Clock = ctx.get("clock") or time.time
    spend = Spend(ctx["redis"], keys, settings.jimeng_daily_limit, settings.daily_limit_zone, clock)
    permits = CallPermits(
        ctx["redis"], keys, settings.jimeng_max_inflight, settings.jimeng_rate_limit, settings.worker_lease, spend
    )
    slots = Slots(settings.queue_concurrency, settings.store_concurrency, settings.store_backlog)
    intake = Intake(ctx["redis"], keys, settings.queue_name, settings.queue_poll_interval)
    metrics = WorkerMetrics()
    services = Services(
        settings=settings,
        http=http,
        pocketbase=pocketbase,
        jimeng=JimengClient(http, settings),
        storage=storage,
        ledger=GenerationLedger(ctx["redis"], settings.queue_keep_result, keys),
        gate=gate,
        outages=outages,
        permits=permits,
        slots=slots,
        metrics=metrics,
    )
    runs = Runs()
    metrics.watch(lambda: [run.clock.stage for run in runs])
    heartbeat = Heartbeat(state, runs, outages, permits, settings.queue_name, settings.worker_lease, clock)
    heartbeat.start()
    stack.push_async_callback(heartbeat.stop)
    port = metrics_port(settings)
    if port is not None:
        exporter = Exporter(settings, metrics, heartbeat, runs)
        try:
            await exporter.start(port)
        except ConfigError as exc:
            await stack.aclose()
            startup_failure(str(exc))
        stack.push_async_callback(exporter.stop)
    reconciler = Reconciler(
        Control(settings, ctx["redis"], pocketbase),
        settings.reconcile_interval,
        settings.worker_lease,
        heartbeat.worker_id,
    )
    reconciler.start()
    stack.push_async_callback(reconciler.stop)
    if settings.pocketbase_watch:
        watcher = Watcher(
            Control(settings, ctx["redis"], pocketbase),
            http,
            lease=settings.worker_lease,
            sweep_interval=settings.reconcile_interval,
            worker_id=heartbeat.worker_id,
        )
        watcher.start()
        stack.push_async_callback(watcher.stop)
    ctx["exit_stack"] = stack
    ctx["services"] = services
    ctx["runner"] = JobRunner(services, Pipeline(services), state, runs, metrics)
    worker = _running_worker()
    if worker is not None:
        intake.install(worker)
        slots.attach(worker, intake.wake)
        intake.start()
        stack.push_async_callback(intake.stop)
        if worker._handle_signals:  # arq keeps no public flag for it
            install_stop_handlers(worker, runs, settings.worker_shutdown_grace)
    paused = await state.paused()
    if paused is not None:
        since = datetime.fromtimestamp(paused.since).astimezone().isoformat(timespec="seconds")
        logger.warning("the queue is paused since {}: {}; `imagegen resume` continues", since, paused.reason)
    logger.info(
        "worker ready: queue {}, concurrency {} (jimeng calls across workers: {}, a day: {}), jimeng {} ({} {}), "
        "bucket {}, pocketbase {}/{}{}",
        settings.queue_name,
        settings.queue_concurrency,
        settings.jimeng_max_inflight or "no cap",
        settings.jimeng_daily_limit or "no limit",
        settings.jimeng_api_url,
        settings.jimeng_ratio,
        settings.jimeng_resolution,
        settings.tos_bucket,
        settings.pocketbase_url,
        settings.pocketbase_collection,
        " (watching for new records)" if settings.pocketbase_watch else "",
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    stack: AsyncExitStack | None = ctx.pop("exit_stack", None)
    if stack is not None:
        await stack.aclose()
    logger.info("worker stopped")


async def generate_images(ctx: dict[str, Any], prompt_id: str, force: bool = False) -> dict[str, Any]:
    """The job: bring one prompt record to `done` (see `jobs` for the failure policy).

    A failed prompt is raised to arq as PromptFailed, so arq's counters and result say it failed."""
    runner: JobRunner = ctx["runner"]
    # A first run has waited since the job was queued; a later one since it became due (after its backoff).
    # The score carries the job's priority; `due_ms` reads the time out of it.
    enqueued: datetime | None = ctx.get("enqueue_time")
    score: int | None = ctx.get("score")
    due = due_ms(score) / 1000 if score else None
    marks = [mark for mark in (enqueued.timestamp() if enqueued else None, due) if mark]
    outcome = await runner.run(
        str(ctx["job_id"]),
        prompt_id,
        force,
        queued_since=max(marks) if marks else None,
        fresh=int(ctx.get("job_try") or 1) == 1,
    )
    if outcome["status"] == OutcomeStatus.FAILED.value:
        raise PromptFailed(outcome)
    return outcome


def worker_options(settings: Settings, clock: Clock | None = None) -> dict[str, Any]:
    """The keyword arguments of arq's Worker for these settings; `clock` (epoch seconds, default the real
    time) decides the day of JIMENG_DAILY_LIMIT and when its pause lifts."""
    return {
        # Attempts are counted by the job itself (waiting while paused must not use them), so arq's own
        # limit only guards against a job bouncing forever.
        "functions": [func(generate_images, name=JOB_NAME, max_tries=ARQ_MAX_TRIES)],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": Slots.arq_jobs(settings.queue_concurrency),
        "job_timeout": settings.queue_job_timeout,
        "keep_result": settings.queue_keep_result,
        "ctx": {"settings": settings, "clock": clock},
        "health_check_interval": 30,
        "job_completion_wait": settings.worker_shutdown_grace,
    }


def wait_for_redis(settings: Settings, cap: float = 30.0) -> None:
    """Block until Redis answers, one log line per failed try: a worker outlives a Redis that is down.
    A refused password is a settings error (ConfigError), not an outage."""
    connection = redis_settings(settings, ride_out_outages=False)
    delay = 1.0
    while True:
        client = sync_client(connection)
        try:
            client.ping()
            return
        except REDIS_AUTH_ERRORS as exc:
            raise ConfigError(redis_auth_message(settings, exc)) from None
        except (RedisError, OSError) as exc:
            logger.warning(
                "cannot reach {} ({}); check the REDIS_* settings; retrying in {:.0f}s",
                settings.redis_location(),
                type(exc).__name__,
                delay,
            )
        finally:
            client.close()
        time.sleep(delay)
        delay = min(cap, delay * 2)


def startup_failure(message: str, *more: str) -> NoReturn:
    """One line in the worker log's format (time, level, pid) per message, then exit code 2: supervisord's error
    log shows them."""
    now = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    for line in (message, *more):
        sys.stderr.write(f"{now} | ERROR   | {os.getpid()} | -               | imagegen worker: {line}\n")
    raise SystemExit(2)


async def refuse_broken_collection(pocketbase: PocketBaseClient, stack: AsyncExitStack) -> None:
    """Stop the worker (exit 2, one line per problem) on a collection whose schema would refuse imagegen's writes
    after a paid call. A PocketBase that can't be read now is checked again before the first write."""
    try:
        report = await pocketbase.schema_report()
    except ImagegenError as exc:
        logger.warning("could not check the collection's fields yet ({}); checked again before the first write", exc)
        return
    if report.blocking:
        await stack.aclose()
        startup_failure(
            f"collection {pocketbase.collection} would refuse imagegen's writes after a paid call:",
            *(problem.line() for problem in report.blocking),
        )
    for problem in report.problems:
        if not problem.blocking:
            logger.warning("collection {}: {}", pocketbase.collection, problem.line())
    for note in report.notes:
        logger.info("collection {}: {}", pocketbase.collection, note)


def settings_for_worker() -> Settings:
    """Settings for a worker process, with logging set up; a bad setting ends the process with one line."""
    try:
        settings = load_settings()
        require(settings, *WORKER_REQUIRED)
    except ConfigError as exc:
        startup_failure(str(exc))
    setup_logging(settings.log_level, settings.secrets())
    for warning in settings.warnings():
        logger.warning("settings: {}", warning)
    try:
        if metrics_port(settings) is not None:
            check_bind(settings, settings.worker_metrics_host, "WORKER_METRICS_HOST")
        wait_for_redis(settings)
    except ConfigError as exc:
        startup_failure(str(exc))
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
