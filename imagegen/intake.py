"""How a worker takes jobs: at once when one is queued, without polling hard while idle.

arq polls its queue every 0.5 s, so every job waits 250 ms on average before it starts and a freed slot stays
empty until the next poll; polling faster burns CPU while idle. Instead:

- whoever queues jobs (`imagegen add`, `add-pending`, the reconcile sweep) publishes one message on the
  queue's wake channel; each worker listens on it (a blocking read, no CPU while idle) and polls at once;
- a worker also polls the moment one of its jobs ends or hands back its slot (`slots`);
- arq's poll every QUEUE_POLL_INTERVAL seconds (0.5) stays as the fallback (deferred retries, a lost message).

arq also re-reads the head of its queue on every poll and checks the jobs there one at a time, although the
head is mostly jobs already running (they stay in the queue until they finish); with a hundred running jobs
that is hundreds of round trips per job started. Here one script returns just the due jobs nobody runs, as
many as the worker has room for, and arq's own start (with its check against a double start) takes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.asyncio import Redis

from .keys import RedisKeys
from .periodic import Periodic

# How far into the due part of the queue one pick looks for jobs nobody runs.
SCAN_LIMIT = 5000

# KEYS: queue; ARGV: now ms, how many wanted, scan limit, in-progress key prefix.
_PICK = """
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local wanted = tonumber(ARGV[2])
local found = {}
for _, id in ipairs(ids) do
  if redis.call('exists', ARGV[4] .. id) == 0 then
    found[#found + 1] = id
    if #found >= wanted then break end
  end
end
return found
"""


async def announce(redis: Redis, keys: RedisKeys) -> None:
    """Tell idle workers of this queue that jobs were queued."""
    await redis.publish(keys.wake, b"1")


class Intake(Periodic):
    """Wakes one arq worker's poll loop; its background step listens on the wake channel."""

    name = "wake-up listener"

    def __init__(self, redis: Redis, keys: RedisKeys, queue_name: str, fallback_poll: float) -> None:
        super().__init__(1.0)
        self._fallback_poll = fallback_poll
        self._redis = redis
        self._channel = keys.wake
        self._queue = queue_name
        self._event = asyncio.Event()
        self._pick = redis.register_script(_PICK)

    def wake(self) -> None:
        self._event.set()

    async def step(self) -> None:
        """Listen until the connection fails (the loop then logs it and listens again)."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            self.wake()  # whatever was queued while nobody listened
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self.wake()
        finally:
            with suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self) -> None:
        with suppress(TimeoutError):
            async with asyncio.timeout(self._fallback_poll):
                await self._event.wait()

    def install(self, worker: Worker) -> None:
        """Make `worker` poll when woken (or after the fallback interval) and pick only jobs nobody runs."""
        poll_iteration: Callable[[], Awaitable[None]] = worker._poll_iteration
        start_jobs: Callable[[list[bytes]], Awaitable[None]] = worker.start_jobs
        job_ended: Callable[[], None] = worker._release_sem_dec_counter_on_complete

        async def iteration() -> None:
            self._event.clear()
            await poll_iteration()
            await self._wait()

        async def start_free_jobs(head: list[bytes]) -> None:
            room = worker.max_jobs - worker.job_counter
            if not head or room <= 0:  # nothing due, or no room
                return
            now_ms = int(time.time() * 1000)
            free = await self._pick(keys=[self._queue], args=[now_ms, room, SCAN_LIMIT, in_progress_key_prefix])
            if free:
                await start_jobs(list(free))

        def ended() -> None:
            job_ended()
            self.wake()

        # arq reads these attributes on every use, so replacing them on the instance changes its loop; it
        # reads the poll delay once, right after on_startup, where this runs.
        worker.poll_delay_s = 0
        worker.queue_read_limit = 1  # arq's own read only tells whether anything is due
        setattr(worker, "_poll_iteration", iteration)  # noqa: B010
        setattr(worker, "start_jobs", start_free_jobs)  # noqa: B010
        setattr(worker, "_release_sem_dec_counter_on_complete", ended)  # noqa: B010
