"""Operations on the queue shared by every front end: enqueue, enqueue pending, inspect.

The CLI is a thin shell over these; none of them touches the jimeng API, so nothing here costs credits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from arq import create_pool
from arq.connections import ArqRedis
from arq.jobs import Job, JobResult, JobStatus
from loguru import logger
from redis.exceptions import RedisError

from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.errors import ConfigError, ImagegenError, InvalidPromptId, QueueError, RecordNotFound
from imagegen.models import (
    JobOutcome,
    JobState,
    OutcomeStatus,
    PromptRecord,
    RecordStatus,
    iso_time,
    validate_prompt_id,
)
from imagegen.queue.accounts import AccountHealth, account_pool, ark_health
from imagegen.queue.beats import WorkerBeat
from imagegen.queue.connections import REDIS_AUTH_ERRORS, redis_auth_message, redis_settings
from imagegen.queue.enqueue import EnqueueOutcome, EnqueueReport, EnqueueTally, JobQueue
from imagegen.queue.keys import RedisKeys
from imagegen.queue.marks import RecordMarks
from imagegen.queue.priority import check_priority, priority_of
from imagegen.queue.spend import DaySpend, Spend, limit_json
from imagegen.queue.stages import FINAL, Stage, StageLog, StageView, combine
from imagegen.queue.state import PauseInfo, QueueState
from imagegen.queue.throughput import OutcomeCounter, Throughput
from imagegen.settings import Settings

from .metrics import QueueFigures
from .record_counts import RecordCounts
from .record_states import iter_status


@dataclass
class JobReport:
    """Everything `imagegen inspect` shows about one prompt."""

    prompt_id: str
    state: JobState
    tries: int = 0
    prompt: str = ""
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    scheduled_for: datetime | None = None
    error: str = ""
    record_status: str | None = None
    image_url: str = ""
    images: list[str] = field(default_factory=list)
    record_error: str = ""
    record_unavailable: str = ""  # why the record could not be read (PocketBase down)
    stage: StageView | None = None  # where the job is and how long each stage took (`stages`)
    priority: int | None = None  # the priority its job was queued with, while the job is in the queue


@contextmanager
def redis_errors(settings: Settings) -> Iterator[None]:
    """Turn a Redis failure inside the block into one readable QueueError (ConfigError for a refused password)."""
    try:
        yield
    except REDIS_AUTH_ERRORS as exc:
        raise ConfigError(redis_auth_message(settings, exc)) from None
    except (RedisError, OSError) as exc:
        raise QueueError(
            f"cannot reach {settings.redis_location()} ({type(exc).__name__}); "
            "is it running and are REDIS_HOST/REDIS_PORT/REDIS_PASSWORD right?"
        ) from None


@dataclass(frozen=True)
class JobCounts:
    """The queue's jobs by state: due and not taken, deferred (a retry's backoff), running, waiting for a resume."""

    queued: int
    deferred: int
    in_progress: int
    waiting: int

    @classmethod
    def of(cls, due: int, deferred: int, workers: list[WorkerBeat]) -> JobCounts:
        """From the due and deferred jobs in the queue and what the live workers run (running jobs stay in
        the queue, due, until they end)."""
        in_progress = sum(len(worker.running) for worker in workers)
        waiting = sum(len(worker.waiting) for worker in workers)
        return cls(max(0, due - in_progress - waiting), deferred, in_progress, waiting)


@dataclass
class StatusReport:
    """Everything `imagegen status` shows; `records_error` says why the record counts are missing."""

    jobs: JobCounts
    paused: PauseInfo | None
    consecutive_failures: int
    max_failed: int
    workers: list[WorkerBeat]
    spend: dict[str, Any] = field(default_factory=dict)  # today's jimeng calls against JIMENG_DAILY_LIMIT
    records: dict[str, int] | None = None
    records_as_of: float | None = None  # when the record counts were counted (they are shared a few seconds)
    records_error: str = ""
    accounts: list[AccountHealth] = field(default_factory=list)  # the jimeng accounts, in JIMENG_API_KEY's order
    last_worker_seen: float | None = None  # when a worker of this queue last beat; None: never on this Redis
    queue_name: str = ""

    def worker_warning(self) -> str:
        """Why the figures may come from the wrong place: no worker is live and none ever used this queue."""
        if self.workers or self.last_worker_seen is not None:
            return ""
        return (
            f"no worker has ever used queue {self.queue_name} on this Redis: is this the Redis and QUEUE_NAME "
            "your workers use (REDIS_*, QUEUE_NAME, --env-file)?"
        )

    def age_of_records(self) -> float | None:
        """Seconds since the record counts were counted (None without counts)."""
        return None if self.records_as_of is None else round(max(0.0, time.time() - self.records_as_of), 1)

    def outages(self) -> list[dict[str, Any]]:
        """Each service some worker waits for, with since when and how many workers see it."""
        found: dict[str, dict[str, Any]] = {}
        for worker in self.workers:
            for service, outage in worker.outages.items():
                entry = found.setdefault(service, {"service": service, "since": outage.since, "workers": 0})
                entry["since"] = min(entry["since"], outage.since)
                entry["error"] = outage.error
                entry["workers"] += 1
        return [{**o, "since": iso_time(o["since"])} for o in found.values()]


class Control:
    """Queue operations over one Redis pool and one PocketBase client."""

    def __init__(self, settings: Settings, redis: ArqRedis, pocketbase: PocketBaseClient) -> None:
        self.settings = settings
        self.redis = redis
        self.pocketbase = pocketbase
        self.keys = RedisKeys(settings.queue_name)
        self.state = QueueState(redis, settings.queue_max_failed, self.keys)
        self.jobs = JobQueue(redis, settings.queue_name, self.keys)
        self.outcomes = OutcomeCounter(redis, self.keys)
        self.stages = StageLog(redis, self.keys, settings.queue_keep_result)
        self.spending = Spend(redis, self.keys, settings.daily_limits(), settings.daily_limit_zone)
        self.accounts = account_pool(redis, self.keys, settings, self.spending)
        self.record_counts = RecordCounts(redis, self.keys, pocketbase, settings.record_counts_max_age)

    async def pause(self, reason: str) -> PauseInfo:
        with redis_errors(self.settings):
            return await self.state.pause(reason, source="manual")

    async def resume(self) -> PauseInfo | None:
        """Lift the pause and give every set-aside jimeng account another chance (an operator who resumes
        says so: credits were bought, a session renewed); the pause that was lifted, if any."""
        with redis_errors(self.settings):
            await self.accounts.reinstate()
            return await self.state.resume()

    async def accounts_health(self) -> list[AccountHealth]:
        """Each jimeng account of JIMENG_API_KEY with its state (see `accounts`), then Ark's when it is a
        provider."""
        with redis_errors(self.settings):
            return await self._accounts_health()

    async def _accounts_health(self) -> list[AccountHealth]:
        found = await self.accounts.health()
        key = self.settings.ark_api_key
        if key is not None and "ark" in self.settings.providers():
            found.append(ark_health(key, (await self.spending.today()).provider("ark")))
        return found

    async def throughput(self) -> Throughput:
        """Jobs done and failed in each minute of the last hour."""
        with redis_errors(self.settings):
            return await self.outcomes.last()

    async def spend(self, days: int) -> list[DaySpend]:
        """Paid jimeng calls by outcome for the last `days` days, today first."""
        with redis_errors(self.settings):
            return await self.spending.days(days)

    async def count_jobs(self, workers: list[WorkerBeat]) -> JobCounts:
        """Jobs by state in O(log n) Redis work however long the queue: due and deferred are two ZCOUNTs by
        score (a job is due when its score is at most now: a priority's band, or a plain time come due), and
        the jobs running or waiting are the ones the live workers' heartbeats list (they stay in the queue,
        due, until they end)."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self.settings.queue_name, "-inf", now_ms)
            pipe.zcount(self.settings.queue_name, f"({now_ms}", "+inf")
            due, deferred = await pipe.execute()
        return JobCounts.of(int(due), int(deferred), workers)

    async def status(self, *, records: bool = True) -> StatusReport:
        """Jobs by state, records by status, the pause, outages, the failure streak and the live workers.

        What lives in Redis is always shown; when PocketBase can't be read, `records_error` says so. The record
        counts are shared by every viewer for RECORD_COUNTS_MAX_AGE seconds (`records_as_of` says when they were
        counted)."""
        with redis_errors(self.settings):
            workers = await self.state.workers()
            jobs = await self.count_jobs(workers)
            report = StatusReport(
                jobs=jobs,
                paused=await self.state.paused(),
                consecutive_failures=await self.state.consecutive_failures(),
                max_failed=self.settings.queue_max_failed,
                workers=workers,
                spend=limit_json(self.spending, await self.spending.today()),
                accounts=await self._accounts_health(),
                last_worker_seen=await self.state.last_worker_seen(),
                queue_name=self.settings.queue_name,
            )
        if not records:
            return report
        try:
            with redis_errors(self.settings):
                seen = await self.record_counts.read()
        except ImagegenError as exc:
            report.records_error = str(exc)
        else:
            report.records, report.records_as_of = seen.counts, seen.as_of
        return report

    async def queue_figures(self) -> QueueFigures:
        """The queue as the Prometheus metrics of `imagegen serve` show it (records only if PocketBase answers)."""
        report = await self.status()
        with redis_errors(self.settings):
            finished = await self.outcomes.totals()
        return QueueFigures(
            jobs=asdict(report.jobs),
            paused=report.paused is not None,
            paused_source=report.paused.source if report.paused is not None else "",
            consecutive_failures=report.consecutive_failures,
            max_failed=report.max_failed,
            workers=len(report.workers),
            finished=finished,
            records=report.records,
            records_age=None if report.records_as_of is None else report.age_of_records(),
        )

    async def stage(self, prompt_id: str) -> StageView | None:
        """Where a prompt's job is: the running worker's view (its heartbeat) over the timings of ended runs."""
        with redis_errors(self.settings):
            recorded = await self.stages.read(prompt_id)
            workers = await self.state.workers()
        live = None
        for worker in workers:
            for job in worker.jobs:
                if job.job == prompt_id:
                    live = job.stage_view(worker.seen)
        return combine(recorded, live)

    def job(self, prompt_id: str) -> Job:
        return Job(prompt_id, self.redis, _queue_name=self.settings.queue_name)

    async def live_ids(self, prompt_ids: list[str]) -> set[str]:
        """The prompts that have a live job: queued or deferred in arq, running there, or leased by a run."""
        with redis_errors(self.settings):
            return await self.jobs.live(prompt_ids)

    async def _enqueue_record(self, record: PromptRecord, force: bool, priority: int | None) -> EnqueueReport:
        if record.is_done and not force:
            return EnqueueReport(record.id, EnqueueOutcome.ALREADY_DONE, record.image_url)
        if record.id in await self.live_ids([record.id]):
            return EnqueueReport(record.id, EnqueueOutcome.ALREADY_QUEUED)
        # Marked before the job exists, so a job that fails fast can't be overwritten back to `queued`.
        if record.status != RecordStatus.QUEUED.value or record.error:
            await self.pocketbase.set_status(record.id, RecordStatus.QUEUED)
        problem = "" if priority is not None else record.priority_problem
        chosen = {record.id: record.priority if priority is None else priority}
        with redis_errors(self.settings):
            [queued] = await self.jobs.put([record.id], force=force, priorities=chosen)
        if not queued:
            return EnqueueReport(record.id, EnqueueOutcome.ALREADY_QUEUED)
        if problem:
            logger.bind(prompt_id=record.id).warning("{}", problem)
        return EnqueueReport(record.id, EnqueueOutcome.QUEUED, problem)

    async def enqueue(
        self, prompt_id: str, *, force: bool = False, priority: int | None = None, only_pending: bool = False
    ) -> EnqueueReport:
        """Queue one prompt; says whether it was queued, already queued or already done.

        `priority` (checked by the caller, see `priority.check_priority`) overrides the record's own; a prompt
        already queued keeps its job and the priority that job has. The record is marked `queued` first: one
        request is nothing for a handful of ids, and the reconcile sweep then brings the job back by itself
        should Redis lose it (it looks only at records a worker or `add` marked). With `only_pending` (the
        watch), a record read again that is no longer pending is left alone (`not pending`)."""
        if priority is not None:
            check_priority(priority)  # the front ends refuse a bad one first; this guards the encoding
        try:
            validate_prompt_id(prompt_id)
            record = await self.pocketbase.get_record(prompt_id)
        except InvalidPromptId as exc:
            return EnqueueReport(prompt_id, EnqueueOutcome.INVALID, str(exc))
        except RecordNotFound as exc:
            return EnqueueReport(prompt_id, EnqueueOutcome.NOT_FOUND, str(exc))
        if only_pending and not self.pocketbase.layout.pending().matches(record):
            return EnqueueReport(
                prompt_id, EnqueueOutcome.ALREADY_DONE if record.is_done else EnqueueOutcome.NOT_PENDING
            )
        return await self._enqueue_record(record, force, priority)

    async def enqueue_where(
        self, record_filter: str, *, force: bool = False, dry_run: bool = False
    ) -> AsyncIterator[list[EnqueueReport]]:
        """Queue every record matching a PocketBase filter, yielding the reports of one page at a time (with
        `dry_run`, only say which would be queued, changing nothing).

        Bulk queueing writes nothing to PocketBase: the queue in Redis is what says a record is queued, and
        the record shows its status (`pending`, or `failed` for a retry) until a worker marks it
        `processing`. So a page costs one PocketBase read (the next one is read meanwhile) and one Redis
        round trip, and memory stays that of a page or two however many records match. Each record is queued
        with its own priority (a value that is none counts as 0, with a warning in its report and the log)."""
        async for page in self.enqueue_pages(self.pocketbase.iter_pages(record_filter), force=force, dry_run=dry_run):
            yield page

    async def enqueue_pages(
        self, pages: AsyncIterator[list[PromptRecord]], *, force: bool = False, dry_run: bool = False
    ) -> AsyncIterator[list[EnqueueReport]]:
        """Queue the records of each page (see `enqueue_where`), yielding each page's reports."""
        async for page in pages:
            yield await self._enqueue_page(page, force, dry_run)

    async def _enqueue_page(self, records: list[PromptRecord], force: bool, dry_run: bool) -> list[EnqueueReport]:
        reports = {
            record.id: EnqueueReport(record.id, EnqueueOutcome.ALREADY_DONE, record.image_url)
            for record in records
            if record.is_done and not force
        }
        wanted = [record.id for record in records if record.id not in reports]
        priorities = {record.id: record.priority for record in records if record.priority}
        problems = {record.id: record.priority_problem for record in records if record.priority_problem}
        with redis_errors(self.settings):
            if dry_run:
                live = await self.jobs.live(wanted)
                queued = [prompt_id not in live for prompt_id in wanted]
            else:
                queued = await self.jobs.put(wanted, force=force, priorities=priorities)
        fresh = EnqueueOutcome.WOULD_QUEUE if dry_run else EnqueueOutcome.QUEUED
        warned = []
        for prompt_id, was_queued in zip(wanted, queued, strict=True):
            problem = problems.get(prompt_id, "") if was_queued else ""
            reports[prompt_id] = EnqueueReport(
                prompt_id, fresh if was_queued else EnqueueOutcome.ALREADY_QUEUED, problem
            )
            if problem:
                warned.append(problem)
        if warned:
            more = f" (and {len(warned) - 1} more)" if len(warned) > 1 else ""
            logger.warning("{}{}", warned[0], more)
        return [reports[record.id] for record in records]

    async def enqueue_pending(self, *, dry_run: bool = False) -> AsyncIterator[list[EnqueueReport]]:
        """Queue every pending record (see `FieldLayout.pending`; also those whose queue state was lost)."""
        layout = await self.pocketbase.fields()
        async for page in self.enqueue_pages(self.pocketbase.iter_rule(layout.pending()), dry_run=dry_run):
            yield page

    async def retry_failed(self, *, dry_run: bool = False) -> AsyncIterator[list[EnqueueReport]]:
        """Queue every failed record again, each with all its attempts."""
        async for page in self.enqueue_pages(iter_status(self.pocketbase, RecordStatus.FAILED), dry_run=dry_run):
            yield page

    async def _queued_priority(self, prompt_id: str, score: float) -> int:
        """The priority of a job in the queue: in its score, or (a deferred retry's plain time) in its key."""
        carried = priority_of(score)
        if carried is not None:
            return carried
        with redis_errors(self.settings):
            stored = await self.redis.get(self.keys.priority(prompt_id))
        return int(stored) if stored is not None else 0

    async def inspect(self, prompt_id: str) -> JobReport:
        """The job's state in the queue and the record's state in PocketBase."""
        validate_prompt_id(prompt_id)
        job = self.job(prompt_id)
        with redis_errors(self.settings):
            status = await job.status()
            info = await job.info()
        report = JobReport(prompt_id, JobState.UNKNOWN)
        if info is not None:
            report.enqueued_at = info.enqueue_time
            if info.score and status is JobStatus.deferred:
                report.scheduled_for = datetime.fromtimestamp(info.score / 1000, tz=info.enqueue_time.tzinfo)
            if info.score is not None:
                report.priority = await self._queued_priority(prompt_id, info.score)
        with redis_errors(self.settings):
            report.tries = await self.state.attempts(prompt_id)
        report.stage = await self.stage(prompt_id)
        if status is JobStatus.complete and isinstance(info, JobResult):
            report.started_at, report.finished_at = info.start_time, info.finish_time
            outcome = JobOutcome.from_result(info.result)
            report.tries = outcome.attempt if outcome is not None else report.tries
            if info.success and outcome is not None and outcome.status is OutcomeStatus.DONE:
                report.state = JobState.DONE
            elif outcome is not None and outcome.status is OutcomeStatus.SUPERSEDED:
                report.state = JobState.UNKNOWN  # another run of the prompt decided; the record tells
            else:
                report.state = JobState.FAILED
                report.error = outcome.error if outcome is not None and outcome.error else str(info.result)
        else:
            report.state = {
                JobStatus.queued: JobState.QUEUED,
                JobStatus.deferred: JobState.DEFERRED,
                JobStatus.in_progress: JobState.IN_PROGRESS,
            }.get(status, JobState.UNKNOWN)
        stale = report.stage is None or report.stage.stage in FINAL
        if report.state in (JobState.QUEUED, JobState.DEFERRED) and report.enqueued_at is not None and stale:
            # Not yet taken by a worker: what is recorded belongs to an earlier job of the prompt.
            report.stage = StageView(Stage.QUEUED, report.enqueued_at.timestamp())
        try:
            record = await self.pocketbase.get_record(prompt_id)
        except RecordNotFound:
            return report
        except ImagegenError as exc:
            report.record_unavailable = str(exc)
            return report
        report.record_status = record.shown_status
        report.prompt = record.prompt
        report.image_url = record.image_url
        report.images = record.images
        report.record_error = record.error
        if not report.error and report.state is not JobState.DONE:
            report.error = record.error
        return report


def pocketbase_client(http: aiohttp.ClientSession, settings: Settings, redis: ArqRedis) -> PocketBaseClient:
    """The PocketBase client of a deployment, keeping record states in its Redis when the collection can't."""
    return PocketBaseClient(http, settings, RecordMarks(redis, RedisKeys(settings.queue_name)))


async def connect_queue(settings: Settings) -> ArqRedis:
    """A Redis pool for front ends: it fails fast (one QueueError) instead of riding out an outage."""
    with redis_errors(settings):
        return await create_pool(
            redis_settings(settings, ride_out_outages=False), default_queue_name=settings.queue_name
        )


@asynccontextmanager
async def open_control(settings: Settings) -> AsyncIterator[Control]:
    """Connect to Redis and PocketBase for the length of one command."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        redis = await connect_queue(settings)
        stack.push_async_callback(redis.aclose)
        yield Control(settings, redis, pocketbase_client(http, settings, redis))


__all__ = [
    "Control",
    "EnqueueOutcome",
    "EnqueueReport",
    "EnqueueTally",
    "ImagegenError",
    "JobCounts",
    "JobReport",
    "StatusReport",
    "connect_queue",
    "open_control",
    "pocketbase_client",
]
