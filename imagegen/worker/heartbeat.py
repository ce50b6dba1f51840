"""A worker process's pulse: its heartbeat key, the leases of the runs it holds, and outage pauses to lift.

Every WORKER_LEASE / 4 seconds it renews each run's prompt lease (which also keeps arq's in-progress key of
the job alive: a killed worker's jobs are picked up elsewhere within about one lease period) and the call
permit of each run inside its paid call (JIMENG_MAX_INFLIGHT), writes the
worker's heartbeat (what each run is doing, the outages it sees) for `imagegen status`, lifts an outage
pause whose service answers again, and lifts the daily-limit pause once its day is over (`spend`).

The heartbeat is what `status` counts running jobs from (`beats`), so besides its beat it is also written
within PUBLISH_SETTLE seconds of a job starting, ending, or starting or stopping to wait for a resume: one
write for a whole burst of starts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import suppress

from loguru import logger
from redis.exceptions import RedisError

from imagegen.queue.beats import WorkerBeat
from imagegen.queue.permits import CallPermits
from imagegen.queue.spend import Clock
from imagegen.queue.state import QueueState

from .outages import Outages
from .periodic import Periodic, cancel_and_wait
from .runs import Phase, Runs

# How long after a change of its jobs the heartbeat is written: the changes of a burst go out together.
PUBLISH_SETTLE = 0.2


class Heartbeat(Periodic):
    """Renews leases and the worker's heartbeat every lease / 4 seconds."""

    name = "heartbeat"

    def __init__(
        self,
        state: QueueState,
        runs: Runs,
        outages: Outages,
        permits: CallPermits,
        queue_name: str,
        lease: float,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(lease / 4)
        self._clock = clock
        self._state = state
        self._permits = permits
        self._runs = runs
        self._outages = outages
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._queue_name = queue_name
        self._started = time.time()
        self._publisher: asyncio.Task[None] | None = None

    async def step(self) -> None:
        for run in self._runs:
            if run.lease.held and not await run.lease.claim() and not run.lease.released:
                logger.bind(prompt_id=run.prompt_id).warning(
                    "lost the lease: another run has this prompt; this run will stop before its next paid call or write"
                )
            if run.phase is Phase.GENERATING:
                await self._permits.renew(run.lease.token)
        await self.publish()
        await self._outages.lift_recovered_pause()
        if await self._state.lift_limit_pause(self._clock()):
            logger.info("queue resumed: a new day of the daily limits (JIMENG_DAILY_LIMIT, ARK_DAILY_LIMIT) has begun")

    def beat(self) -> WorkerBeat:
        """What this worker's heartbeat says now."""
        runs = list(self._runs)
        return WorkerBeat(
            id=self.worker_id,
            queue=self._queue_name,
            started=self._started,
            running=sorted(run.job_id for run in runs if run.phase is not Phase.WAITING),
            waiting=sorted(run.job_id for run in runs if run.phase is Phase.WAITING),
            jobs=[run.describe() for run in runs],
            outages=self._outages.snapshot(),
            stopping=self._runs.stopping,
            jobs_done=self._runs.jobs_done,
            seen=time.time(),
        )

    async def publish(self) -> None:
        """Write the heartbeat now."""
        await self._state.heartbeat(self.beat(), ttl=self._interval * 3)

    def start(self) -> None:
        super().start()
        self._publisher = asyncio.create_task(self._publish_changes(), name="imagegen-heartbeat-changes")

    async def _publish_changes(self) -> None:
        while True:
            await self._runs.changed.wait()
            await asyncio.sleep(PUBLISH_SETTLE)
            self._runs.changed.clear()
            try:
                await self.publish()
            except (RedisError, OSError) as exc:  # the periodic beat says so and tries again
                logger.debug("heartbeat after a change of jobs not written: {}", exc)

    async def stop(self) -> None:
        publisher, self._publisher = self._publisher, None
        await cancel_and_wait(publisher)
        await super().stop()
        with suppress(RedisError, OSError):
            await self._state.stop_heartbeat(self.worker_id)
