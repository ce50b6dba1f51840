"""What the front ends answer: one pydantic model per answer, giving both its JSON and its schema.

`imagegen ... --json` and the web API print the same answers; each is built here from the report it shows
(`Answer.of(...)`), dumped with `to_json()`, and described in the OpenAPI document by the model's own JSON
Schema (`web/openapi.py`), so what is sent and what is documented can't drift apart. Times are ISO 8601
strings as the reports format them (`date-time` in the schema).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.models import JobState, iso_time
from imagegen.queue.accounts import AccountHealth, AccountState
from imagegen.queue.beats import WorkerBeat
from imagegen.queue.enqueue import EnqueueOutcome, EnqueueReport, EnqueueTally
from imagegen.queue.stages import Stage, StageTiming, StageView
from imagegen.queue.state import PauseInfo
from imagegen.queue.throughput import Throughput

from .control import JobReport, StatusReport
from .listing import TaskItem, TaskPage, TaskState

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Counts = dict[str, int]
PauseSource = Literal["manual", "auto", "outage", "limit", "accounts"]


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class Answer(BaseModel):
    """An answer of the API and of `--json`: frozen, and dumped by its field aliases (`imageUrl`)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class ErrorAnswer(Answer):
    """Every error: one readable line."""

    error: str


class HealthAnswer(Answer):
    """`redis` and `error` only for a caller with the token (or when none is configured)."""

    ok: bool
    status: Literal["ok", "unavailable"]
    redis: Literal["ok", "unreachable"] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class PauseAnswer(Answer):
    """Why the queue is paused, since when, and who paused it."""

    reason: str
    since: Time
    source: PauseSource

    @classmethod
    def of(cls, info: PauseInfo) -> PauseAnswer:
        return cls(reason=info.reason, since=iso_time(info.since), source=info.source)

    @classmethod
    def maybe(cls, info: PauseInfo | None) -> PauseAnswer | None:
        return None if info is None else cls.of(info)


class PausedAnswer(Answer):
    """The pause in force (an existing pause keeps its reason)."""

    paused: PauseAnswer


class ResumedAnswer(Answer):
    """Whether a pause was lifted, and which."""

    resumed: bool
    was_paused: PauseAnswer | None


class EnqueueResultAnswer(Answer):
    """One prompt's enqueue outcome."""

    id: str
    outcome: EnqueueOutcome
    detail: str

    @classmethod
    def of(cls, report: EnqueueReport) -> EnqueueResultAnswer:
        return cls(id=report.prompt_id, outcome=report.outcome, detail=report.detail)


class EnqueueCountsAnswer(Answer):
    """How many records had each outcome."""

    counts: Counts

    @classmethod
    def of(cls, tally: EnqueueTally) -> EnqueueCountsAnswer:
        return cls(counts=dict(tally.counts))


class EnqueueResultsAnswer(Answer):
    """One outcome per id, in the order given, and the counts."""

    results: list[EnqueueResultAnswer]
    counts: Counts

    @classmethod
    def of(cls, tally: EnqueueTally, reports: list[EnqueueReport]) -> EnqueueResultsAnswer:
        return cls(results=[EnqueueResultAnswer.of(r) for r in reports], counts=dict(tally.counts))


class StageTimingAnswer(Answer):
    """Seconds the job spent in one stage (over all its runs) and when it first entered it."""

    stage: Stage
    seconds: float = Field(ge=0)
    started: Time

    @classmethod
    def of(cls, timing: StageTiming) -> StageTimingAnswer:
        return cls(stage=timing.stage, seconds=round(timing.seconds, 3), started=iso_time(timing.started))


class TaskRecordAnswer(Answer):
    """The record as PocketBase holds it."""

    status: str
    prompt: str
    image_url: str = Field(alias="imageUrl")
    images: list[str]
    error: str


class TaskAnswer(Answer):
    """What `imagegen inspect --json` prints."""

    id: str
    state: JobState
    tries: int
    priority: int | None = Field(
        default=None, description="the priority of its job while in the queue (higher runs first), else null"
    )
    stage: Stage | None = None
    stage_since: Time | None = None
    stages: list[StageTimingAnswer] = []
    enqueued_at: Time | None = None
    started_at: Time | None = None
    finished_at: Time | None = None
    scheduled_for: Time | None = None
    duration_seconds: float | None = None
    error: str
    record_unavailable: str | None = None
    record: TaskRecordAnswer | None

    @classmethod
    def of(cls, report: JobReport) -> TaskAnswer:
        started, finished = report.started_at, report.finished_at
        return cls(
            id=report.prompt_id,
            state=report.state,
            tries=report.tries,
            priority=report.priority,
            **cls.stage_fields(report.stage),
            enqueued_at=iso(report.enqueued_at),
            started_at=iso(started),
            finished_at=iso(finished),
            scheduled_for=iso(report.scheduled_for),
            duration_seconds=(finished - started).total_seconds() if finished and started else None,
            error=report.error,
            record_unavailable=report.record_unavailable or None,
            record=None
            if report.record_status is None
            else TaskRecordAnswer(
                status=report.record_status or "pending",
                prompt=report.prompt,
                image_url=report.image_url,
                images=report.images,
                error=report.record_error,
            ),
        )

    @staticmethod
    def stage_fields(view: StageView | None) -> dict[str, Any]:
        if view is None:
            return {"stage": None, "stage_since": None, "stages": []}
        return {
            "stage": view.stage,
            "stage_since": iso_time(view.since),
            "stages": [StageTimingAnswer.of(timing) for timing in view.timings],
        }


class TaskUnreadableAnswer(Answer):
    """The task as far as Redis knows it, when its record could not be read (503)."""

    error: str
    task: TaskAnswer


class TaskItemAnswer(Answer):
    """One task of a list: a record, a deferred job or a job in progress."""

    id: str
    prompt: str | None
    status: str | None
    error: str | None
    images: list[str]
    scheduled_for: Time | None
    phase: str | None
    worker: str | None
    updated: Time | None = Field(description="records: when PocketBase last changed them, where it says")

    @classmethod
    def of(cls, item: TaskItem) -> TaskItemAnswer:
        return cls(
            id=item.id,
            prompt=item.prompt,
            status=item.status,
            error=item.error,
            images=item.images,
            scheduled_for=None if item.scheduled_for is None else iso_time(item.scheduled_for),
            phase=item.phase,
            worker=item.worker,
            updated=item.updated,
        )


class TaskPageAnswer(Answer):
    """One page of the tasks in one state."""

    state: TaskState
    page: int
    per_page: int
    total: int
    items: list[TaskItemAnswer]

    @classmethod
    def of(cls, page: TaskPage) -> TaskPageAnswer:
        return cls(
            state=page.state,
            page=page.page,
            per_page=page.per_page,
            total=page.total,
            items=[TaskItemAnswer.of(item) for item in page.items],
        )


class ActivityAnswer(Answer):
    """The records changed last, in every state, newest first (by their `updated` field)."""

    limit: int
    items: list[TaskItemAnswer]

    @classmethod
    def of(cls, limit: int, items: list[TaskItem]) -> ActivityAnswer:
        return cls(limit=limit, items=[TaskItemAnswer.of(item) for item in items])


class MinuteCountAnswer(Answer):
    minute: Time
    done: int
    failed: int


class ThroughputAnswer(Answer):
    """The last hour's outcomes, per minute and in all."""

    window_minutes: int
    done: int
    failed: int
    failure_rate: float | None = Field(ge=0, le=1)
    minutes: list[MinuteCountAnswer]

    @classmethod
    def of(cls, throughput: Throughput) -> ThroughputAnswer:
        return cls(
            window_minutes=len(throughput.minutes),
            done=throughput.done,
            failed=throughput.failed,
            failure_rate=throughput.failure_rate,
            minutes=[
                MinuteCountAnswer(minute=iso_time(m.minute * 60), done=m.done, failed=m.failed)
                for m in throughput.minutes
            ],
        )


Provider = Literal["jimeng", "ark"]


class CallCountsAnswer(Answer):
    """Paid calls by outcome; `reserved` are calls in flight or of a worker that died during its call."""

    calls: int
    images: int
    moderated: int
    failed: int
    reserved: int


class AccountSpendAnswer(CallCountsAnswer):
    """One account's calls today, by the fingerprint of its key (never the key); null for calls counted without
    an account (by a version before accounts were counted)."""

    account: str | None


class ProviderSpendAnswer(CallCountsAnswer):
    """One provider's paid calls today against its own daily limit (JIMENG_DAILY_LIMIT, ARK_DAILY_LIMIT; null:
    none), and per account."""

    provider: Provider
    limit: int | None
    accounts: list[AccountSpendAnswer]


class SpendAnswer(CallCountsAnswer):
    """Today's paid calls (in JIMENG_DAILY_LIMIT_TZ) by outcome, of every provider and per provider; `limit`
    is JIMENG_DAILY_LIMIT (null: none)."""

    day: str = Field(json_schema_extra={"format": "date"})
    timezone: str
    limit: int | None
    providers: list[ProviderSpendAnswer]


class AccountAnswer(Answer):
    """One jimeng account of JIMENG_API_KEY, named by its position and last four characters (never the key), or
    Ark's key (ARK_API_KEY, when ark is in IMAGE_PROVIDERS: healthy, or `daily cap reached` at ARK_DAILY_LIMIT);
    `until`/`since` in epoch seconds while it is set aside; `credits` as the workers' credit watch last read
    them from the proxy (every 5 minutes; null: not known, and always for Ark)."""

    provider: Provider
    account: str
    fingerprint: str
    state: AccountState
    until: float | None
    since: float | None
    reason: str
    in_flight: int
    calls_today: int
    transient_streak: int
    credits: int | None

    @classmethod
    def of(cls, health: AccountHealth) -> AccountAnswer:
        return cls(
            provider=health.account.provider,
            account=health.account.label,
            fingerprint=health.account.fingerprint,
            state=health.state,
            until=health.until,
            since=health.since,
            reason=health.reason,
            in_flight=health.in_flight,
            calls_today=health.calls_today,
            transient_streak=health.streak,
            credits=health.credits,
        )


class AccountsAnswer(Answer):
    """Every jimeng account, in JIMENG_API_KEY's order, then Ark's."""

    accounts: list[AccountAnswer]

    @classmethod
    def of(cls, found: list[AccountHealth]) -> AccountsAnswer:
        return cls(accounts=[AccountAnswer.of(health) for health in found])


class JobCountsAnswer(Answer):
    queued: int
    deferred: int
    in_progress: int
    waiting: int


class OutageAnswer(Answer):
    """A service some worker waits for, since when (the earliest), and how many workers see it."""

    service: str
    since: Time
    error: str
    workers: int


class QueueAnswer(Answer):
    """What `imagegen status --json` prints (less its `target`). Job counts are read in O(log n) Redis work
    (running jobs from the workers' heartbeats)."""

    jobs: JobCountsAnswer
    records: Counts | None
    records_as_of: Time | None = Field(
        description="when the record counts were counted: they are shared by every viewer for "
        "RECORD_COUNTS_MAX_AGE seconds; null without counts"
    )
    records_age_seconds: float | None = Field(description="seconds since `records_as_of`; null without counts")
    records_error: str | None
    paused: PauseAnswer | None
    outages: list[OutageAnswer]
    consecutive_failures: int
    max_failed: int
    spend: SpendAnswer
    accounts: list[AccountAnswer]
    workers: list[WorkerBeat] = Field(
        description="each live worker's heartbeat: the job ids it runs and those waiting for a resume, each job's "
        "phase and stage, the outages it sees; times in epoch seconds"
    )
    last_worker_seen: Time | None = Field(
        description="when a worker of this queue last beat; null: never on this Redis"
    )
    warnings: list[str]

    @classmethod
    def fields_of(cls, report: StatusReport) -> dict[str, Any]:
        return {
            "jobs": JobCountsAnswer.model_validate(report.jobs, from_attributes=True),
            "records": report.records,
            "records_as_of": None if report.records_as_of is None else iso_time(report.records_as_of),
            "records_age_seconds": report.age_of_records(),
            "records_error": report.records_error or None,
            "paused": PauseAnswer.maybe(report.paused),
            "outages": [OutageAnswer.model_validate(outage) for outage in report.outages()],
            "consecutive_failures": report.consecutive_failures,
            "max_failed": report.max_failed,
            "spend": SpendAnswer.model_validate(report.spend),
            "accounts": [AccountAnswer.of(health) for health in report.accounts],
            "workers": report.workers,
            "last_worker_seen": None if report.last_worker_seen is None else iso_time(report.last_worker_seen),
            "warnings": [warning] if (warning := report.worker_warning()) else [],
        }

    @classmethod
    def of(cls, report: StatusReport) -> QueueAnswer:
        return cls(**cls.fields_of(report))


class QueueSummaryAnswer(QueueAnswer):
    """The queue's status with the last hour's outcomes per minute (GET /api/queue)."""

    throughput: ThroughputAnswer

    @classmethod
    def of_both(cls, report: StatusReport, throughput: Throughput) -> QueueSummaryAnswer:
        return cls(**QueueAnswer.fields_of(report), throughput=ThroughputAnswer.of(throughput))
