"""What a worker process runs: the job function, its retry policy and the process's long-lived clients.

`arqworker.ImagegenWorker` runs these under arq: `startup` builds the clients once and hands back the parts
the worker itself drives (intake, slots, the runs to stop); a bad setting stops the process with one line
(`startup_failure`) before anything starts.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import aiohttp
from arq.constants import health_check_key_suffix
from arq.worker import func
from loguru import logger
from redis.exceptions import RedisError

from imagegen.access import check_bind
from imagegen.clients.ark import ArkClient
from imagegen.clients.jimeng import AccountRoutes, JimengClient
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.storage import Storage, open_s3_client
from imagegen.errors import ConfigError, ImagegenError, PromptFailed
from imagegen.logs import setup_logging
from imagegen.models import JOB_NAME, OutcomeStatus
from imagegen.ops.control import Control
from imagegen.ops.metrics import WorkerMetrics
from imagegen.queue.accounts import AccountState, account_pool
from imagegen.queue.connections import REDIS_AUTH_ERRORS, redis_auth_message, redis_settings, sync_client
from imagegen.queue.keys import RedisKeys
from imagegen.queue.ledger import GenerationLedger
from imagegen.queue.marks import RecordMarks
from imagegen.queue.permits import CallPermits
from imagegen.queue.priority import due_ms
from imagegen.queue.spend import Clock, Spend
from imagegen.queue.state import PauseGate, QueueState
from imagegen.settings import Settings, require

from .credits import CreditWatch
from .exporter import Exporter, metrics_port
from .heartbeat import Heartbeat
from .intake import Intake
from .jobs import JobRunner
from .outages import POCKETBASE, STORAGE, Outages
from .pipeline import Pipeline, Services
from .reconcile import Reconciler
from .runs import Runs
from .slots import Slots
from .watch import Watcher

ARQ_MAX_TRIES = 100_000
# How often a worker writes arq's health-check key (it lives a second longer): `imagegen worker --check`.
HEALTH_CHECK_INTERVAL = 30
WORKER_REQUIRED = (
    "jimeng_api_key",
    "jimeng_api_url",
    "tos_bucket",
    "tos_endpoint",
    "pocketbase_url",
    "pocketbase_email",
    "pocketbase_password",
)


@dataclass(frozen=True)
class Started:
    """What `startup` built that the worker drives itself: when to poll, how many jobs, what a stop sends back."""

    intake: Intake
    slots: Slots
    runs: Runs


async def startup(ctx: dict[str, Any]) -> Started:
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
    accounts = account_pool(ctx["redis"], keys, settings, spend)
    slots = Slots(settings.queue_concurrency, settings.store_concurrency, settings.store_backlog)
    intake = Intake(ctx["redis"], keys, settings.queue_name, settings.queue_poll_interval)
    metrics = WorkerMetrics()
    services = Services(
        settings=settings,
        http=http,
        pocketbase=pocketbase,
        jimeng=JimengClient(http, settings),
        accounts=accounts,
        ark=ArkClient(http, settings) if "ark" in settings.providers() else None,
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
    credit_watch = CreditWatch(
        ctx["redis"], accounts, AccountRoutes(http, settings), state, clock, claim_daily=settings.jimeng_claim_daily
    )
    credit_watch.start()
    stack.push_async_callback(credit_watch.stop)
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
    intake.start()
    stack.push_async_callback(intake.stop)
    # A worker that starts with a usable account (a key replaced since the pause) lifts an accounts pause.
    if await state.lift_limit_pause(clock(), accounts_usable=await accounts.usable()):
        logger.info("queue resumed: a jimeng account can take calls again")
    for health in await accounts.health():
        if health.state is not AccountState.HEALTHY:
            logger.warning("jimeng {}: {} {}", health.account.label, health.state.value, health.reason)
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
    return Started(intake, slots, runs)


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
    """arq's Worker arguments for these settings (`ImagegenWorker` adds its start-up hook and polling);
    `clock` (epoch seconds, default the real time) decides the day of JIMENG_DAILY_LIMIT and when its pause
    lifts."""
    return {
        # Attempts are counted by the job itself (waiting while paused must not use them), so arq's own
        # limit only guards against a job bouncing forever.
        "functions": [func(generate_images, name=JOB_NAME, max_tries=ARQ_MAX_TRIES)],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "on_shutdown": shutdown,
        "max_jobs": Slots.arq_jobs(settings.queue_concurrency),
        "job_timeout": settings.queue_job_timeout,
        "keep_result": settings.queue_keep_result,
        "ctx": {"settings": settings, "clock": clock},
        "health_check_interval": HEALTH_CHECK_INTERVAL,
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


def prepare_worker(settings: Settings) -> None:
    """Everything a worker process checks before it starts, with logging set up: the settings it needs, its
    metrics address, and Redis (waited for while it is down); a problem ends the process with one line."""
    uses_jimeng = "jimeng" in settings.providers()
    needed = [name for name in WORKER_REQUIRED if uses_jimeng or not name.startswith("jimeng_")]
    try:
        require(settings, *needed)
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


def worker_health(settings: Settings) -> tuple[bool, str]:
    """Whether a live worker of this queue wrote its health key in the last HEALTH_CHECK_INTERVAL seconds,
    and a line saying so; only the Redis settings are read, and a Redis that is down answers within seconds."""
    client = sync_client(redis_settings(settings, ride_out_outages=False))
    key = settings.queue_name + health_check_key_suffix
    where = f"{settings.redis_location()}, queue {settings.queue_name}"
    try:
        found = client.get(key)
    except REDIS_AUTH_ERRORS as exc:
        return False, redis_auth_message(settings, exc)
    except (RedisError, OSError) as exc:
        return False, f"cannot reach {settings.redis_location()} ({type(exc).__name__}); no worker health known"
    finally:
        client.close()
    if not found:
        return False, f"no live worker: no health report in the last {HEALTH_CHECK_INTERVAL + 1} s ({where})"
    report = found.decode(errors="replace") if isinstance(found, bytes) else str(found)
    return True, f"worker alive ({where}): {report}"
