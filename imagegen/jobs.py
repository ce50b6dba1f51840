"""The job and its failure policy: retry, fail the prompt, or pause the whole queue.

- transient failure, attempts left: back to the queue after exponential backoff with jitter (or Retry-After);
- transient failure, attempts used up: the record fails; QUEUE_MAX_FAILED such jobs in a row pause the queue;
- permanent failure: the record fails at once with the reason;
- account-level failure: the queue pauses at once and the job waits, its attempt given back;
- queue paused: the job waits without using an attempt and without any paid call.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, NoReturn

from arq import Retry
from loguru import logger

from .errors import FailureKind, ImagegenError, QueuePaused, RecordNotFound
from .heartbeat import Heartbeat
from .models import RecordStatus
from .pipeline import Pipeline, Services
from .settings import Settings
from .state import QueueState

PAUSED_RECHECK = 1.0


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff from QUEUE_BACKOFF (capped at QUEUE_BACKOFF_MAX) with up to 25% jitter;
    a longer Retry-After wins."""
    base = min(settings.queue_backoff * (2 ** (attempt - 1)), settings.queue_backoff_max)
    delay: float = base * random.uniform(1.0, 1.25)
    return max(delay, retry_after or 0.0)


def pause_wait_limit(settings: Settings) -> float:
    """How long a job may wait for a resume before going back to the queue (well inside the job timeout)."""
    return float(max(5, min(300, settings.queue_job_timeout - 60)))


async def mark_record(services: Services, prompt_id: str, status: RecordStatus, error: str) -> None:
    """Write a status onto the record; a record store that is down too must not hide the first error."""
    try:
        await services.pocketbase.set_status(prompt_id, status, error[:4000])
    except RecordNotFound:
        logger.bind(prompt_id=prompt_id).warning("record was deleted; nothing to mark")
    except ImagegenError as exc:
        logger.bind(prompt_id=prompt_id).warning("could not mark the record {}: {}", status.value, exc)


class JobRunner:
    """Runs one prompt job with the failure policy above; one per worker process."""

    def __init__(self, services: Services, pipeline: Pipeline, state: QueueState, heartbeat: Heartbeat) -> None:
        self._s = services
        self._settings = services.settings
        self._pipeline = pipeline
        self._state = state
        self._heartbeat = heartbeat

    async def run(self, prompt_id: str, force: bool) -> dict[str, Any]:
        log = logger.bind(prompt_id=prompt_id)
        await self._heartbeat.take_lease(prompt_id)
        try:
            if not await self._s.gate.wait_open(pause_wait_limit(self._settings)):
                raise Retry(defer=PAUSED_RECHECK)
            attempt = await self._state.begin_attempt(prompt_id)
            if attempt > self._settings.queue_attempts:
                # Only a worker dying mid-job gets here: each death used an attempt.
                return await self._final_failure(
                    prompt_id, attempt, f"gave up after {attempt - 1} attempts that never finished", exhausted=True
                )
            log.info("job started (attempt {}/{})", attempt, self._settings.queue_attempts)
            return await self._attempt(prompt_id, force, attempt)
        finally:
            self._heartbeat.release(prompt_id)

    async def _attempt(self, prompt_id: str, force: bool, attempt: int) -> dict[str, Any]:
        log = logger.bind(prompt_id=prompt_id)
        started = time.monotonic()
        try:
            result = await self._pipeline.run(prompt_id, force=force)
        except asyncio.CancelledError:
            # Shutdown past the grace period: arq puts the job back in the queue; the record says so too.
            await asyncio.shield(self._interrupted(prompt_id))
            raise
        except QueuePaused as exc:
            await self._wait_for_resume(prompt_id, str(exc))
        except ImagegenError as exc:
            return await self._failure(prompt_id, attempt, exc, time.monotonic() - started)
        await self._state.record_success()
        await self._state.forget_attempts(prompt_id)
        self._heartbeat.jobs_done += 1
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

    async def _wait_for_resume(self, prompt_id: str, note: str) -> NoReturn:
        """Back to the queue without using an attempt; the record says why it waits."""
        await self._state.give_back_attempt(prompt_id)
        await mark_record(self._s, prompt_id, RecordStatus.QUEUED, note)
        raise Retry(defer=PAUSED_RECHECK)

    async def _interrupted(self, prompt_id: str) -> None:
        await self._state.give_back_attempt(prompt_id)
        await mark_record(self._s, prompt_id, RecordStatus.QUEUED, "the worker stopped during this job; queued again")

    async def _failure(self, prompt_id: str, attempt: int, exc: ImagegenError, elapsed: float) -> dict[str, Any]:
        log = logger.bind(prompt_id=prompt_id)
        if exc.kind is FailureKind.ACCOUNT:
            info = await self._state.pause(str(exc), source="auto")
            self._s.gate.invalidate()
            log.error("queue paused: {}", info.reason)
            await self._wait_for_resume(prompt_id, f"waiting: queue paused ({exc})")
        if exc.kind is FailureKind.TRANSIENT and attempt < self._settings.queue_attempts:
            delay = retry_delay(self._settings, attempt, getattr(exc, "retry_after", None))
            note = f"attempt {attempt} of {self._settings.queue_attempts} failed: {exc}; retrying in {delay:.0f}s"
            log.warning(note)
            await mark_record(self._s, prompt_id, RecordStatus.QUEUED, note)
            raise Retry(defer=delay)
        log.error("job failed after {:.1f}s ({} failure, attempt {}): {}", elapsed, exc.kind.value, attempt, exc)
        exhausted = exc.kind is FailureKind.TRANSIENT
        return await self._final_failure(
            prompt_id, attempt, str(exc), exhausted=exhausted, deleted=isinstance(exc, RecordNotFound), kind=exc.kind
        )

    async def _final_failure(
        self,
        prompt_id: str,
        attempt: int,
        error: str,
        *,
        exhausted: bool,
        deleted: bool = False,
        kind: FailureKind = FailureKind.TRANSIENT,
    ) -> dict[str, Any]:
        if not deleted:
            await mark_record(self._s, prompt_id, RecordStatus.FAILED, error)
        await self._state.forget_attempts(prompt_id)
        if exhausted:
            paused = await self._state.record_exhausted(error)
            if paused is not None:
                self._s.gate.invalidate()
                logger.error("queue paused: {}", paused.reason)
        return {"status": "failed", "kind": kind.value, "error": error, "attempt": attempt}
