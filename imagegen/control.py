"""Operations on the queue shared by every front end: enqueue, enqueue pending, inspect.

The CLI is a thin shell over these; none of them touches the jimeng API, so nothing here costs credits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aiohttp
from arq import create_pool
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.jobs import Job, JobResult, JobStatus
from redis.exceptions import RedisError

from . import keys
from .errors import ImagegenError, InvalidPromptId, QueueError, RecordNotFound
from .models import JobState, PromptRecord, RecordStatus, validate_prompt_id
from .pocketbase import PocketBaseClient
from .settings import Settings
from .state import PauseInfo, QueueState
from .worker import JOB_NAME, redis_settings


class EnqueueOutcome(StrEnum):
    QUEUED = "queued"
    ALREADY_QUEUED = "already queued"
    ALREADY_DONE = "already done"
    NOT_FOUND = "not found"
    INVALID = "invalid id"
    ERROR = "error"


@dataclass(frozen=True)
class EnqueueReport:
    prompt_id: str
    outcome: EnqueueOutcome
    detail: str = ""


@dataclass
class JobReport:
    """Everything `imagegen inspect` shows about one prompt."""

    prompt_id: str
    state: JobState
    tries: int = 0
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    scheduled_for: datetime | None = None
    error: str = ""
    record_status: str | None = None
    image_url: str = ""
    images: list[str] = field(default_factory=list)
    record_error: str = ""

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.prompt_id,
            "state": self.state.value,
            "tries": self.tries,
            "enqueued_at": iso(self.enqueued_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "scheduled_for": iso(self.scheduled_for),
            "duration_seconds": (
                (self.finished_at - self.started_at).total_seconds() if self.finished_at and self.started_at else None
            ),
            "error": self.error,
            "record": None
            if self.record_status is None
            else {
                "status": self.record_status or "pending",
                "imageUrl": self.image_url,
                "images": self.images,
                "error": self.record_error,
            },
        }


@contextmanager
def redis_errors(settings: Settings) -> Iterator[None]:
    """Turn a Redis failure inside the block into one readable QueueError."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise QueueError(
            f"cannot reach Redis at {settings.redis_host}:{settings.redis_port} ({type(exc).__name__}); "
            "is it running and are REDIS_HOST/REDIS_PORT/REDIS_PASSWORD right?"
        ) from None


@dataclass
class StatusReport:
    """Everything `imagegen status` shows."""

    queued: int
    deferred: int
    in_progress: int
    records: dict[str, int]
    paused: PauseInfo | None
    consecutive_failures: int
    max_failed: int
    workers: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": {"queued": self.queued, "deferred": self.deferred, "in_progress": self.in_progress},
            "records": self.records,
            "paused": None
            if self.paused is None
            else {
                "reason": self.paused.reason,
                "since": datetime.fromtimestamp(self.paused.since, tz=UTC).isoformat(),
                "source": self.paused.source,
            },
            "consecutive_failures": self.consecutive_failures,
            "max_failed": self.max_failed,
            "workers": self.workers,
        }


class Control:
    """Queue operations over one Redis pool and one PocketBase client."""

    def __init__(self, settings: Settings, redis: ArqRedis, pocketbase: PocketBaseClient) -> None:
        self.settings = settings
        self.redis = redis
        self.pocketbase = pocketbase
        self.state = QueueState(redis, settings.queue_max_failed)

    async def pause(self, reason: str) -> PauseInfo:
        with redis_errors(self.settings):
            return await self.state.pause(reason, source="manual")

    async def resume(self) -> PauseInfo | None:
        with redis_errors(self.settings):
            return await self.state.resume()

    async def status(self) -> StatusReport:
        """Jobs by state, records by status, the pause, the failure streak and the live workers."""
        now_ms = time.time() * 1000
        with redis_errors(self.settings):
            members = await self.redis.zrange(self.settings.queue_name, 0, -1, withscores=True)
            running = 0
            if members:
                flags = await self.redis.exists(*(in_progress_key_prefix + m.decode() for m, _ in members))
                running = int(flags)
            due = sum(1 for _, score in members if score <= now_ms)
            report = StatusReport(
                queued=due - running,
                deferred=len(members) - due,
                in_progress=running,
                records={},
                paused=await self.state.paused(),
                consecutive_failures=await self.state.consecutive_failures(),
                max_failed=self.settings.queue_max_failed,
                workers=await self.state.workers(),
            )
        report.records = await self.pocketbase.count_by_status()
        return report

    def job(self, prompt_id: str) -> Job:
        return Job(prompt_id, self.redis, _queue_name=self.settings.queue_name)

    async def _live_job(self, prompt_id: str) -> bool:
        status = await self.job(prompt_id).status()
        return status in (JobStatus.queued, JobStatus.deferred, JobStatus.in_progress)

    async def _enqueue_record(self, record: PromptRecord, force: bool) -> EnqueueReport:
        if record.is_done and not force:
            return EnqueueReport(record.id, EnqueueOutcome.ALREADY_DONE, record.image_url)
        with redis_errors(self.settings):
            if await self._live_job(record.id):
                return EnqueueReport(record.id, EnqueueOutcome.ALREADY_QUEUED)
            # A finished job's result would make arq refuse the same job id: this is a new run,
            # with all its attempts.
            await self.redis.delete(result_key_prefix + record.id, keys.attempts(record.id))
            job = await self.redis.enqueue_job(
                JOB_NAME, record.id, force, _job_id=record.id, _queue_name=self.settings.queue_name
            )
        if job is None:
            return EnqueueReport(record.id, EnqueueOutcome.ALREADY_QUEUED)
        if record.status != RecordStatus.QUEUED.value or record.error:
            await self.pocketbase.set_status(record.id, RecordStatus.QUEUED)
        return EnqueueReport(record.id, EnqueueOutcome.QUEUED)

    async def enqueue(self, prompt_id: str, *, force: bool = False) -> EnqueueReport:
        """Queue one prompt; says whether it was queued, already queued or already done."""
        try:
            validate_prompt_id(prompt_id)
            record = await self.pocketbase.get_record(prompt_id)
        except InvalidPromptId as exc:
            return EnqueueReport(prompt_id, EnqueueOutcome.INVALID, str(exc))
        except RecordNotFound as exc:
            return EnqueueReport(prompt_id, EnqueueOutcome.NOT_FOUND, str(exc))
        return await self._enqueue_record(record, force)

    async def enqueue_where(self, record_filter: str, *, force: bool = False) -> list[EnqueueReport]:
        """Queue every record matching a PocketBase filter."""
        reports = []
        async for record in self.pocketbase.iter_records(record_filter):
            reports.append(await self._enqueue_record(record, force))
        return reports

    async def enqueue_pending(self) -> list[EnqueueReport]:
        """Queue every record without images that has not failed (also those whose queue state was lost)."""
        return await self.enqueue_where(self.pocketbase.pending_filter())

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
        with redis_errors(self.settings):
            report.tries = await self.state.attempts(prompt_id)
        if status is JobStatus.complete and isinstance(info, JobResult):
            report.started_at, report.finished_at = info.start_time, info.finish_time
            outcome = info.result if isinstance(info.result, dict) else {}
            report.tries = int(outcome.get("attempt", report.tries))
            if info.success and outcome.get("status") == "done":
                report.state = JobState.DONE
            else:
                report.state = JobState.FAILED
                report.error = str(outcome.get("error") or info.result)
        else:
            report.state = {
                JobStatus.queued: JobState.QUEUED,
                JobStatus.deferred: JobState.DEFERRED,
                JobStatus.in_progress: JobState.IN_PROGRESS,
            }.get(status, JobState.UNKNOWN)
        try:
            record = await self.pocketbase.get_record(prompt_id)
        except RecordNotFound:
            return report
        report.record_status = record.status
        report.image_url = record.image_url
        report.images = record.images
        report.record_error = record.error
        if not report.error and report.state is not JobState.DONE:
            report.error = record.error
        return report


@asynccontextmanager
async def open_control(settings: Settings) -> AsyncIterator[Control]:
    """Connect to Redis and PocketBase for the length of one command."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        with redis_errors(settings):
            redis = await create_pool(redis_settings(settings, retries=0), default_queue_name=settings.queue_name)
        stack.push_async_callback(redis.aclose)
        yield Control(settings, redis, PocketBaseClient(http, settings))


__all__ = ["Control", "EnqueueOutcome", "EnqueueReport", "ImagegenError", "JobReport", "StatusReport", "open_control"]
