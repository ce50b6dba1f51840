"""How a worker takes jobs: at once when one is queued, without polling hard while idle.

arq polls its queue every 0.5 s, so every job waits 250 ms on average before it starts and a freed slot stays
empty until the next poll; polling faster burns CPU while idle. Instead:

- whoever queues jobs (`imagegen add`, `add-pending`, the reconcile sweep) publishes one message on the
  queue's wake channel; each worker listens on it (a blocking read, no CPU while idle) and polls at once;
- a worker also polls the moment one of its jobs ends or hands back its slot (`slots`);
- arq's poll every QUEUE_POLL_INTERVAL seconds (0.5) stays as the fallback (deferred retries, a lost message).

arq also re-reads the head of its queue on every poll and checks the jobs there one at a time, although the
head is mostly jobs already running (they stay in the queue until they finish); with a hundred running jobs
that is hundreds of round trips per job started. And arq starts the jobs it found one after the other, four
round trips each (watch, check, mark in progress), so the first wave of a batch trickles in. Here one script
finds the due jobs nobody runs, as many as the worker has room for, and marks each in progress in the same
step (`claim`: atomic in Redis, so no two workers start one job); the worker then starts them all at once.

`arqworker.ImagegenWorker` is what calls these: it waits on `wait()` between polls and starts what `pick()`
returns; this module holds no reference to arq's worker.

The queue's order is the jobs' priorities (`priority`): the same script first moves retries that came due
(arq scores them by plain time) back into the band of their priority, so every worker takes the highest
priority first, and first in first out within one.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from imagegen.queue.keys import RedisKeys
from imagegen.queue.priority import LUA_SHIFTED

from .periodic import Periodic

# How far into the due part of the queue one pick looks for jobs nobody runs (and for retries come due).
SCAN_LIMIT = 5000

# KEYS: queue; ARGV: now ms, how many wanted, scan limit, in-progress key prefix, priority key prefix, and the
# milliseconds a claimed job's in-progress key lives (0: only look, claim nothing). Returns id, score, id, ...
# Scores from 0 to now are arq's plain times come due (a retry after its backoff): each goes to the band of
# its priority, due since that time, unless it runs (arq keeps a running job's score and does its own sums).
_PICK = (
    LUA_SHIFTED
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
local plain = redis.call('zrangebyscore', KEYS[1], 0, now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #plain, 2 do
  local id = plain[i]
  if redis.call('exists', ARGV[4] .. id) == 0 then
    local priority = tonumber(redis.call('get', ARGV[5] .. id) or '0') or 0
    redis.call('zadd', KEYS[1], 'XX', shifted(tonumber(plain[i + 1]), priority), id)
  end
end
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local wanted, claim_ms = tonumber(ARGV[2]), tonumber(ARGV[6])
local found, taken = {}, 0
for _, id in ipairs(ids) do
  if taken >= wanted then break end
  if redis.call('exists', ARGV[4] .. id) == 0 then
    if claim_ms > 0 then redis.call('set', ARGV[4] .. id, '1', 'PX', claim_ms) end
    found[#found + 1] = id
    found[#found + 1] = redis.call('zscore', KEYS[1], id)
    taken = taken + 1
  end
end
return found
"""
)


class Intake(Periodic):
    """Wakes one arq worker's poll loop; its background step listens on the wake channel."""

    name = "wake-up listener"

    def __init__(self, redis: Redis, keys: RedisKeys, queue_name: str, fallback_poll: float) -> None:
        super().__init__(1.0)
        self._fallback_poll = fallback_poll
        self._redis = redis
        self._channel = keys.wake
        self._queue = queue_name
        self._priority_prefix = keys.priority("")
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

    async def pick(self, room: int, now_ms: int | None = None) -> list[bytes]:
        """Up to `room` due jobs nobody runs, highest priority first (retries come due re-scored first)."""
        return [job_id for job_id, _ in await self._find(room, 0, now_ms)]

    async def claim(self, room: int, in_progress_ms: int) -> list[tuple[bytes, int]]:
        """Like `pick`, and each job found is marked in progress (for `in_progress_ms`, as arq marks a job it
        starts) in the same atomic step; the jobs with their queue scores, for the worker to run."""
        return await self._find(room, in_progress_ms, None)

    async def _find(self, room: int, claim_ms: int, now_ms: int | None) -> list[tuple[bytes, int]]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        args: list[str | int] = [now_ms, room, SCAN_LIMIT, in_progress_key_prefix, self._priority_prefix, claim_ms]
        found = list(await self._pick(keys=[self._queue], args=args))
        return [(found[i], int(float(found[i + 1]))) for i in range(0, len(found), 2)]

    def clear(self) -> None:
        """A poll begins: what woke the worker until now is being handled by it."""
        self._event.clear()

    async def wait(self) -> None:
        """Until woken, or the fallback poll interval."""
        with suppress(TimeoutError):
            async with asyncio.timeout(self._fallback_poll):
                await self._event.wait()
