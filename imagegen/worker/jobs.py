"""The job boundary and its failure policy: retry, fail the prompt, wait, or pause the whole queue.

Whatever a job raises (an ImagegenError, a Redis, botocore or aiohttp error, a bug) ends here in one
classified outcome, and the record is left in a state that matches a job that exists, or `failed` with the
reason:

- transient failure, attempts left: back to the queue after exponential backoff with jitter (or Retry-After),
  the record `queued` with the reason;
- transient failure, attempts used up: the record fails; QUEUE_MAX_FAILED such jobs in a row pause the queue;
- the job's own deadline (QUEUE_JOB_TIMEOUT minus a reserve): a transient failure that uses an attempt;
- permanent failure: the record fails at once with the reason;
- account-level failure: the queue pauses at once and the job waits, its attempt given back;
- queue paused, a shared service down past the job's budget, the worker stopping before the paid call:
  back to the queue without using an attempt and without any paid call;
- another run holds the prompt's lease: this run stops, writing nothing; the other run decides.

A `failed` outcome that can't be written because PocketBase is down is kept in Redis and written first
thing by the job's next run, so a record never stays `processing` with no job behind it.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, NoReturn

from arq import Retry
from loguru import logger

from imagegen.errors import (
    AccountsUnavailable,
    FailureKind,
    ImagegenError,
    InternalError,
    JobInterrupted,
    JobTimeout,
    LeaseLost,
    QueuePaused,
    RecordNotFound,
    ServiceDown,
    excerpt,
)
from imagegen.models import JobOutcome, OutcomeStatus, RecordStatus
from imagegen.ops.metrics import WorkerMetrics
from imagegen.queue.lease import PromptLease, lease_ttl
from imagegen.queue.stages import Stage, StageLog
from imagegen.queue.state import QueueState, Verdict
from imagegen.queue.throughput import OutcomeCounter
from imagegen.settings import FINISH_RESERVE, Settings

from .outages import POCKETBASE, outage_service
from .pipeline import Pipeline, Services
from .runs import JobRun, Phase, Runs

PAUSED_RECHECK = 1.0
OUTAGE_RECHECK = 5.0
# How long a best-effort note on the record may take before the job moves on without it.
NOTE_TIMEOUT = 3.0


class Requeue(Retry):
    """arq's Retry, with the reason the job goes back to the queue (for the metrics)."""

    def __init__(self, reason: str, defer: float) -> None:
        super().__init__(defer=defer)
        self.reason = reason


# The stage a job's run ends in, by its outcome; a superseded run writes nothing (the other run decides).
_FINAL_STAGE = {
    OutcomeStatus.DONE: Stage.DONE,
    OutcomeStatus.FAILED: Stage.FAILED,
}


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff from QUEUE_BACKOFF (capped at QUEUE_BACKOFF_MAX) with up to 25% jitter;
    a longer Retry-After wins."""
    base = min(settings.queue_backoff * (2 ** (attempt - 1)), settings.queue_backoff_max)
    delay: float = base * random.uniform(1.0, 1.25)
    return max(delay, retry_after or 0.0)


def pause_wait_limit(settings: Settings) -> float:
    """How long a job may wait for a resume and still have time for a paid call and its images."""
    spare = settings.job_budget - settings.jimeng_timeout_seconds - settings.download_timeout
    return float(max(1.0, min(300.0, spare)))


class JobRunner:
    """Runs prompt jobs with the failure policy above; one per worker process."""

    def __init__(
        self, services: Services, pipeline: Pipeline, state: QueueState, runs: Runs, metrics: WorkerMetrics
    ) -> None:
        self._s = services
        self._settings = services.settings
        self._pipeline = pipeline
        self._state = state
        self._runs = runs
        self._metrics = metrics
        self._outcomes = OutcomeCounter(state.redis, state.keys)
        self._stages = StageLog(state.redis, state.keys, services.settings.queue_keep_result)

    async def run(
        self, job_id: str, prompt_id: str, force: bool, *, queued_since: float | None = None, fresh: bool = True
    ) -> dict[str, Any]:
        """Run one job to a classified outcome (or a Retry for arq); never lets anything else escape.

        `queued_since` (epoch) times the job's wait in the queue; `fresh` says this is the job's first run."""
        lease = PromptLease(self._state.redis, self._state.keys, prompt_id, job_id, self._settings.worker_lease)
        run = self._runs.open(job_id, prompt_id, lease, self._settings.job_budget, queued_since)
        outcome: JobOutcome | None = None
        try:
            outcome = await self._guarded(run, force)
        except Requeue as exc:
            self._metrics.retries.labels(exc.reason).inc()
            raise
        except asyncio.CancelledError:
            self._metrics.retries.labels("cancelled").inc()
            raise
        finally:
            self._runs.close(run)
            self._s.slots.job_ended(run)
            await asyncio.shield(self._end(run, outcome, fresh))
            await asyncio.shield(self._release(lease))
        return outcome.to_dict()

    async def _end(self, run: JobRun, outcome: JobOutcome | None, fresh: bool) -> None:
        """Count the run's outcome and record its stages (one round trip, best effort: the job is decided)."""
        if outcome is not None:
            label = "skipped" if outcome.skipped else outcome.status.value
            self._metrics.jobs.labels(label).inc()
        stage = Stage.QUEUED if outcome is None else _FINAL_STAGE.get(outcome.status)
        if stage is None:
            return
        seconds = run.clock.finish(stage)
        self._metrics.run_ended(seconds)
        try:
            async with self._state.redis.pipeline(transaction=False) as pipe:
                if outcome is not None and not outcome.skipped:
                    self._outcomes.add(pipe, outcome.status)
                # Only the run holding the prompt's lease speaks for it; one that never got it wrote nothing.
                if run.lease.held:
                    self._stages.add_record(pipe, run.prompt_id, run.clock, seconds, run.attempt, fresh)
                if len(pipe):
                    await pipe.execute()
        except Exception as exc:
            logger.bind(prompt_id=run.prompt_id).debug("could not record the run's end: {}", exc)

    @staticmethod
    async def _release(lease: PromptLease) -> None:
        try:
            await lease.release()
        except Exception as exc:  # the lease expires by itself; nothing is lost
            logger.bind(prompt_id=lease.prompt_id).debug("lease release failed: {}", exc)

    async def _guarded(self, run: JobRun, force: bool) -> JobOutcome:
        log = logger.bind(prompt_id=run.prompt_id)
        try:
            try:
                async with asyncio.timeout_at(run.deadline) as budget:
                    return await self._work(run, force)
            except TimeoutError:
                if not budget.expired():
                    raise
                raise self._deadline_error(run) from None
        except Retry:
            raise
        except asyncio.CancelledError:
            if not run.interrupted:
                # arq cancelled the job (its own timeout, or the end of the shutdown grace).
                await asyncio.shield(self._cut_off(run))
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return await self._decide(run, JobInterrupted("the worker is stopping; queued again"))
        except ImagegenError as exc:
            return await self._decide(run, exc)
        except Exception as exc:
            service = outage_service(exc)
            if service is not None:
                return await self._decide(run, ServiceDown(f"{service}: {type(exc).__name__}: {exc}", service=service))
            log.opt(exception=exc).error("unexpected error in the job: {}", exc)
            return await self._decide(
                run,
                InternalError(f"internal error {type(exc).__name__}: {excerpt(str(exc), 160)} (see the worker log)"),
            )

    def _deadline_error(self, run: JobRun) -> ImagegenError:
        if run.outage is not None:
            return ServiceDown(f"{run.outage} is down and this job's time ran out; queued again", service=run.outage)
        return JobTimeout(
            f"the job ran out of time while {run.phase.value} (QUEUE_JOB_TIMEOUT={self._settings.queue_job_timeout} s, "
            "of which it keeps some to record the outcome)"
        )

    async def _work(self, run: JobRun, force: bool) -> JobOutcome:
        s, prompt_id = self._s, run.prompt_id
        log = logger.bind(prompt_id=prompt_id)
        run.check_stop()
        if not await run.lease.claim():
            wait = max(PAUSED_RECHECK, await lease_ttl(self._state.redis, self._state.keys, prompt_id))
            log.info("another run holds this prompt's lease; trying again in {:.0f}s", wait)
            raise Requeue("busy", defer=wait)
        verdict = await self._state.verdict(prompt_id)
        if verdict is not None:
            return await self._write_verdict(run, verdict)
        run.enter(Phase.WAITING)
        if not await s.gate.wait_open(pause_wait_limit(self._settings)):
            raise Requeue("paused", defer=PAUSED_RECHECK)
        run.enter(Phase.PREPARING)
        await run.lease.ensure()
        run.attempt = await self._state.begin_attempt(prompt_id)
        if run.attempt > self._settings.queue_attempts:
            # Only runs that died or were cut off get here (each used an attempt); one may have finished first.
            record = await s.outages.call(POCKETBASE, lambda: s.pocketbase.get_record(prompt_id), run)
            if record.is_done and not force:
                await self._state.forget_attempts(prompt_id)
                return JobOutcome(OutcomeStatus.DONE, run.attempt, skipped=True)
            error = f"gave up after {run.attempt - 1} attempts that never finished"
            return await self._final_failure(run, error, FailureKind.TRANSIENT, exhausted=True)
        log.info("job started (attempt {}/{})", run.attempt, self._settings.queue_attempts)
        result = await self._pipeline.run(run, force=force)
        await self._state.record_success()
        await self._state.forget_attempts(prompt_id)
        self._runs.jobs_done += 1
        if result.skipped:
            return JobOutcome(OutcomeStatus.DONE, run.attempt, skipped=True)
        timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
        log.info("job done: {} images ({})", len(result.images), timings)
        return JobOutcome(
            OutcomeStatus.DONE,
            run.attempt,
            images=[image.public_url for image in result.images],
            generated=result.generated,
            timings=result.timings,
        )

    async def _decide(self, run: JobRun, exc: ImagegenError) -> JobOutcome:
        """Turn a failure into an outcome, a wait or a retry (raised as arq's Retry)."""
        log = logger.bind(prompt_id=run.prompt_id)
        if isinstance(exc, LeaseLost):
            log.warning("{}; it carries on, this one writes nothing", exc)
            await self._give_back(run)
            return JobOutcome(OutcomeStatus.SUPERSEDED, run.attempt, error=str(exc))
        if isinstance(exc, JobInterrupted | ServiceDown):
            log.warning("{}", exc)
            await self._give_back(run)
            await self._note(run, RecordStatus.QUEUED, str(exc))
            if isinstance(exc, JobInterrupted):
                raise Requeue("interrupted", defer=0)
            raise Requeue("outage", defer=OUTAGE_RECHECK)
        if isinstance(exc, QueuePaused):
            await self._wait_for_resume(run, str(exc))
        if isinstance(exc, AccountsUnavailable):
            info = await self._s.gate.close(str(exc), source="accounts", until=exc.until)
            log.error("queue paused: {}", info.reason)
            await self._wait_for_resume(run, f"waiting: queue paused ({exc})")
        if exc.kind is FailureKind.ACCOUNT:
            info = await self._s.gate.close(str(exc), source="auto")
            log.error("queue paused: {}", info.reason)
            await self._wait_for_resume(run, f"waiting: queue paused ({exc})")
        attempts = self._settings.queue_attempts
        if exc.kind is FailureKind.TRANSIENT and run.attempt < attempts:
            delay = retry_delay(self._settings, run.attempt, getattr(exc, "retry_after", None))
            note = f"attempt {run.attempt} of {attempts} failed: {exc}; retrying in {delay:.0f}s"
            log.warning(note)
            await self._note(run, RecordStatus.QUEUED, note)
            raise Requeue("failed_attempt", defer=delay)
        log.error("job failed ({} failure, attempt {}): {}", exc.kind.value, run.attempt, exc)
        if isinstance(exc, RecordNotFound):
            await self._state.forget_attempts(run.prompt_id)
            return JobOutcome(OutcomeStatus.FAILED, run.attempt, kind=exc.kind.value, error=str(exc))
        exhausted = exc.kind is FailureKind.TRANSIENT
        return await self._final_failure(run, str(exc), exc.kind, exhausted=exhausted)

    async def _wait_for_resume(self, run: JobRun, note: str) -> NoReturn:
        """Back to the queue without using an attempt; the record says why it waits."""
        await self._give_back(run)
        await self._note(run, RecordStatus.QUEUED, note)
        raise Requeue("paused", defer=PAUSED_RECHECK)

    async def _give_back(self, run: JobRun) -> None:
        if run.attempt:
            await self._state.give_back_attempt(run.prompt_id)
            run.attempt = 0

    async def _note(self, run: JobRun, status: RecordStatus, note: str) -> None:
        """Best effort: tell the record why its job waits; the job goes on existing either way.

        Never once the record is marked done: a later hiccup (Redis, a cancellation) must not undo it."""
        if run.committed:
            return
        try:
            if not await run.lease.claim():
                return
            async with asyncio.timeout(NOTE_TIMEOUT):
                await self._s.pocketbase.set_status(run.prompt_id, status, note[:4000])
        except RecordNotFound:
            logger.bind(prompt_id=run.prompt_id).warning("record was deleted; nothing to mark")
        except (ImagegenError, TimeoutError) as exc:
            logger.bind(prompt_id=run.prompt_id).info("could not note {} on the record: {}", status.value, exc)

    async def _final_failure(self, run: JobRun, error: str, kind: FailureKind, *, exhausted: bool) -> JobOutcome:
        verdict = Verdict(error=error, kind=kind.value, attempt=run.attempt)
        if exhausted:
            paused = await self._state.record_exhausted(error)
            if paused is not None:
                self._s.gate.invalidate()
                logger.error("queue paused: {}", paused.reason)
        return await self._write_verdict(run, verdict)

    async def _write_verdict(self, run: JobRun, verdict: Verdict) -> JobOutcome:
        """Mark the record failed; if PocketBase is down, keep the verdict for the job's next run."""
        prompt_id = run.prompt_id
        run.set_phase(Phase.FINISHING)
        try:
            await run.lease.ensure()
            async with asyncio.timeout(FINISH_RESERVE / 2):
                await self._s.outages.call(
                    POCKETBASE,
                    lambda: self._s.pocketbase.set_failed(prompt_id, verdict.error[:4000]),
                )
        except LeaseLost as exc:
            return await self._decide(run, exc)
        except RecordNotFound:
            logger.bind(prompt_id=prompt_id).warning("record was deleted; nothing to mark")
        except (TimeoutError, ServiceDown) as exc:
            await self._state.save_verdict(prompt_id, verdict)
            logger.bind(prompt_id=prompt_id).warning(
                "the record can't be marked failed now ({}); the job's next run writes it", exc or "PocketBase is down"
            )
            raise Requeue("outage", defer=OUTAGE_RECHECK) from None
        await self._state.forget_verdict(prompt_id)
        await self._state.forget_attempts(prompt_id)
        return JobOutcome(OutcomeStatus.FAILED, verdict.attempt, kind=verdict.kind, error=verdict.error)

    async def _cut_off(self, run: JobRun) -> None:
        """arq cancelled the job: give the attempt back and say so on the record; the reconcile step (or arq's
        own retry on shutdown) runs it again, reusing any paid generation."""
        why = "the worker stopped during this job" if self._runs.stopping else "arq cancelled the job"
        if run.committed:
            # The record is done already; arq's retry of the job finds it so and does nothing.
            logger.bind(prompt_id=run.prompt_id).info("{} after the record was marked done", why)
            return
        logger.bind(prompt_id=run.prompt_id).warning("{}; it will run again", why)
        try:
            await self._give_back(run)
            await self._note(run, RecordStatus.QUEUED, f"{why}; queued again")
        except Exception as exc:  # shutting down: the reconcile step covers what this could not write
            logger.bind(prompt_id=run.prompt_id).debug("could not record the cut-off: {}", exc)
