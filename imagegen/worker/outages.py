"""Waiting out a shared service that is down, instead of failing the prompt.

PocketBase, the bucket and Redis serve every prompt alike: when one of them refuses connections, times out
or answers 5xx, the prompt is not at fault. A job then retries the same step in place with capped exponential
backoff (0.5 s doubling to 5 s) and carries on where it stopped when the service answers. The worker logs one
line when an outage starts and one when the service is back, and lists the outage in its heartbeat for
`imagegen status`.

An outage longer than OUTAGE_PAUSE_AFTER seconds pauses the queue (source "outage"), so no worker starts a
paid call whose images could not be stored or recorded; the pause is lifted by the workers themselves as soon
as the service answers again (a manual or account pause is never lifted this way). A job whose own deadline
comes first goes back to the queue without using an attempt (`ServiceDown`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from loguru import logger
from redis.exceptions import RedisError

from imagegen.errors import FailureKind, PocketBaseError, QueueError, ServiceDown, StorageError
from imagegen.queue.beats import OutageSeen
from imagegen.queue.connections import is_redis_outage
from imagegen.queue.state import PauseGate, QueueState

from .runs import JobRun

T = TypeVar("T")

FIRST_DELAY = 0.5
MAX_DELAY = 5.0
REDIS = "redis"
POCKETBASE = "pocketbase"
STORAGE = "storage"


def outage_service(exc: BaseException) -> str | None:
    """The shared service an error says is down, or None when the error is about this prompt or a bug."""
    if isinstance(exc, PocketBaseError) and exc.kind is FailureKind.TRANSIENT:
        return POCKETBASE
    if isinstance(exc, StorageError) and exc.kind is FailureKind.TRANSIENT:
        return STORAGE
    if isinstance(exc, QueueError) or is_redis_outage(exc):
        return REDIS
    return None


@dataclass
class Outage:
    service: str
    since: float  # wall clock
    started: float  # monotonic
    error: str
    paused: bool = False


class Outages:
    """The outages one worker process sees, and the waiting loop its jobs use."""

    def __init__(
        self,
        state: QueueState,
        gate: PauseGate,
        pause_after: float,
        probes: dict[str, Callable[[], Awaitable[object]]],
    ) -> None:
        self._state = state
        self._gate = gate
        self._pause_after = pause_after
        self._probes = probes
        self._down: dict[str, Outage] = {}

    def snapshot(self) -> dict[str, OutageSeen]:
        """The current outages, for the heartbeat."""
        return {name: OutageSeen(since=o.since, error=o.error) for name, o in self._down.items()}

    async def call(self, service: str, step: Callable[[], Awaitable[T]], run: JobRun | None = None) -> T:
        """Run one step against `service`, waiting out outages; raises ServiceDown past the run's deadline."""
        delay = FIRST_DELAY
        while True:
            try:
                value = await step()
            except Exception as exc:
                down = outage_service(exc)
                if down is None:
                    raise
                self._went_down(down, exc)
                if run is not None:
                    run.waits_for(down)
                    run.check_stop()
                    if run.remaining() <= delay + 1:
                        raise ServiceDown(
                            f"{down} is down ({exc}); this job's time ran out while waiting - queued again",
                            service=down,
                        ) from None
                await self._pause_if_long(down)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            waited_for = run.service_back() if run is not None else None
            if waited_for is not None:
                await self.came_back(waited_for)
            await self.came_back(service)
            return value

    def _went_down(self, service: str, exc: BaseException) -> None:
        if service in self._down:
            return
        text = str(exc)
        self._down[service] = Outage(service, time.time(), time.monotonic(), text)
        logger.warning("{} is down ({}); jobs wait for it and carry on where they stopped", service, text)

    async def came_back(self, service: str) -> None:
        outage = self._down.pop(service, None)
        if outage is None:
            return
        logger.info("{} answers again after {:.1f} s", service, time.monotonic() - outage.started)
        if outage.paused:
            await self._lift(service)

    async def _pause_if_long(self, service: str) -> None:
        outage = self._down.get(service)
        if outage is None or outage.paused or service == REDIS or self._pause_after <= 0:
            return
        seconds = time.monotonic() - outage.started
        if seconds < self._pause_after:
            return
        outage.paused = True
        reason = f"{service} down for {seconds:.0f} s ({outage.error}); lifts by itself when it answers again"
        try:
            info = await self._state.pause(reason, source="outage", service=service)
        except RedisError as exc:
            logger.warning("could not pause the queue for the {} outage: {}", service, exc)
            return
        self._gate.invalidate()
        logger.error("queue paused: {}", info.reason)

    async def _lift(self, service: str) -> None:
        try:
            if await self._state.lift_outage_pause(service):
                self._gate.invalidate()
                logger.info("queue resumed: {} answers again", service)
        except RedisError as exc:
            logger.warning("could not lift the {} outage pause: {}", service, exc)

    async def lift_recovered_pause(self) -> None:
        """Lift an outage pause whose service answers a probe again: the jobs that saw it go down may all be
        parked behind the pause by now, or their worker gone."""
        pause = await self._state.paused()
        if pause is None or pause.source != "outage":
            return
        probe = self._probes.get(pause.service)
        if probe is None:
            return
        try:
            await probe()
        except Exception as exc:
            if outage_service(exc) is None:
                raise
            return
        await self.came_back(pause.service)
        await self._lift(pause.service)
