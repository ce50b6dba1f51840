"""Tasks listed by state, a page at a time, for the front ends.

Record-level states (pending, queued, processing, done, failed) page through PocketBase, searchable by id
or prompt text. Queue-level states read Redis: `deferred` jobs wait in arq's queue for their retry time,
`in_progress` jobs run in a live worker (from the workers' heartbeats, with each job's phase); their search
matches the id only. Recent activity is the records changed last, in every state, newest first: the
dashboard's first view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from imagegen.models import PromptRecord, RecordStatus

from .control import Control, redis_errors
from .record_states import list_status

MAX_PER_PAGE = 100
MAX_RECENT = 100


class TaskState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    DEFERRED = "deferred"
    IN_PROGRESS = "in_progress"

    @property
    def record_status(self) -> RecordStatus | None:
        """The record status this state lists, None for the queue-level states."""
        return {
            TaskState.PENDING: RecordStatus.PENDING,
            TaskState.QUEUED: RecordStatus.QUEUED,
            TaskState.PROCESSING: RecordStatus.PROCESSING,
            TaskState.DONE: RecordStatus.DONE,
            TaskState.FAILED: RecordStatus.FAILED,
        }.get(self)


@dataclass(frozen=True)
class TaskItem:
    id: str
    prompt: str | None = None
    status: str | None = None
    error: str | None = None
    images: list[str] = field(default_factory=list)
    scheduled_for: float | None = None  # deferred jobs: when they run next
    phase: str | None = None  # jobs in progress: what they are doing
    worker: str | None = None
    updated: str | None = None  # records: when PocketBase last changed them (ISO 8601), where it says

    @classmethod
    def of_record(cls, record: PromptRecord) -> TaskItem:
        images = record.images or ([record.image_url] if record.image_url else [])
        return cls(record.id, record.prompt, record.shown_status, record.error, images, updated=record.updated or None)


@dataclass(frozen=True)
class TaskPage:
    state: TaskState
    page: int
    per_page: int
    total: int
    items: list[TaskItem]


async def list_tasks(control: Control, state: TaskState, *, page: int, per_page: int, search: str = "") -> TaskPage:
    """One page (from 1) of the tasks in `state`; `search` narrows by id (and prompt text for records)."""
    status = state.record_status
    if status is not None:
        pocketbase = control.pocketbase
        found = await list_status(pocketbase, status, page=page, per_page=per_page, search=search)
        return TaskPage(state, page, per_page, found.total, [TaskItem.of_record(r) for r in found.items])
    if state is TaskState.DEFERRED and not search:
        return await _deferred_page(control, page, per_page)
    every = await (_deferred(control) if state is TaskState.DEFERRED else _in_progress(control))
    matching = [item for item in every if search.lower() in item.id]
    start = (page - 1) * per_page
    return TaskPage(state, page, per_page, len(matching), matching[start : start + per_page])


async def recent_activity(control: Control, limit: int) -> list[TaskItem]:
    """The `limit` records changed last, in every state, newest first (done ones with their images)."""
    return [TaskItem.of_record(record) for record in await control.pocketbase.recent(limit)]


async def _deferred(control: Control, page: int = 1, per_page: int | None = None) -> list[TaskItem]:
    """Jobs in arq's queue whose time has not come, soonest first: all of them, or one page."""
    start, count = (None, None) if per_page is None else ((page - 1) * per_page, per_page)
    with redis_errors(control.settings):
        members = await control.redis.zrangebyscore(
            control.settings.queue_name, f"({time.time() * 1000:.0f}", "+inf", start, count, withscores=True
        )
    return [TaskItem(member.decode(), scheduled_for=score / 1000) for member, score in members]


async def _deferred_page(control: Control, page: int, per_page: int) -> TaskPage:
    """One page of the deferred jobs without reading the others (a search reads them all)."""
    items = await _deferred(control, page, per_page)
    with redis_errors(control.settings):
        total = await control.redis.zcount(control.settings.queue_name, f"({time.time() * 1000:.0f}", "+inf")
    return TaskPage(TaskState.DEFERRED, page, per_page, int(total), items)


async def _in_progress(control: Control) -> list[TaskItem]:
    """Jobs that live workers run (not those only waiting for a resume), oldest first."""
    with redis_errors(control.settings):
        workers = await control.state.workers()
    items = [
        (job.since, TaskItem(job.job, phase=job.phase, worker=worker.id))
        for worker in workers
        for job in worker.jobs
        if job.phase != "waiting"
    ]
    return [item for _, item in sorted(items, key=lambda pair: pair[0])]
