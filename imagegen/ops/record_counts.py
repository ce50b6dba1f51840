"""Record counts by status, counted once for every viewer and shared for RECORD_COUNTS_MAX_AGE seconds.

Counting costs PocketBase one query over the whole collection per status. `imagegen status`, `GET /api/queue`
(every open dashboard polls it every 2 s) and every `/metrics` scrape want the counts, so they are kept in
Redis with the time they were counted, expiring after RECORD_COUNTS_MAX_AGE seconds: whoever asks within
that time gets them from there, with their age. When they are missing, one viewer counts (it holds a short
lock in Redis); the others, in this process or any other, wait for its result instead of counting too. A
viewer whose counter died or failed counts itself once the lock is gone. A count that failed (PocketBase down
or slow) is not tried again by the same process for RECORD_COUNTS_MAX_AGE seconds: its viewers get the same
error at once rather than each waiting out PocketBase's timeout in turn.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.errors import ImagegenError
from imagegen.queue.keys import RedisKeys

from .record_states import count_by_status

# How long one count may hold the lock; past it another viewer counts.
LOCK_SECONDS = 10.0
# How often a viewer waiting for another's count looks for it.
WAIT_STEP = 0.05

# Delete the lock only if it is still this viewer's.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class CountsSeen:
    """Records by status, as counted at `as_of` (epoch seconds)."""

    counts: dict[str, int]
    as_of: float

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.as_of)


class RecordCounts:
    """The shared record counts of one deployment."""

    def __init__(self, redis: Redis, keys: RedisKeys, pocketbase: PocketBaseClient, max_age: float) -> None:
        self._redis = redis
        self._keys = keys
        self._pocketbase = pocketbase
        self._max_age = max_age
        self._local = asyncio.Lock()  # viewers of one process wait here rather than in Redis
        self._failed: tuple[float, ImagegenError] | None = None  # when this process's last count failed, and why
        self._release = redis.register_script(_RELEASE)

    async def read(self) -> CountsSeen:
        """The counts, from the shared copy while it is fresh, else counted (by this viewer or another);
        raises what PocketBase or Redis raise."""
        if self._max_age <= 0:
            return await self._count()
        async with self._local:
            if self._failed is not None and time.monotonic() - self._failed[0] < self._max_age:
                raise self._failed[1]
            try:
                seen = await self._shared_or_counted()
            except ImagegenError as exc:
                self._failed = (time.monotonic(), exc)
                raise
            self._failed = None
            return seen

    async def _shared_or_counted(self) -> CountsSeen:
        deadline = time.monotonic() + LOCK_SECONDS
        while True:
            shared = await self._shared()
            if shared is not None:
                return shared
            token = secrets.token_hex(8)
            if await self._redis.set(self._keys.record_counts_lock, token, nx=True, px=int(LOCK_SECONDS * 1000)):
                return await self._count_and_share(token)
            if time.monotonic() >= deadline:
                return await self._count()  # the lock outlived its holder's count: count without it
            await asyncio.sleep(WAIT_STEP)

    async def _shared(self) -> CountsSeen | None:
        raw = await self._redis.get(self._keys.record_counts)
        if raw is None:
            return None
        stored = json.loads(raw)
        return CountsSeen({str(k): int(v) for k, v in stored["counts"].items()}, float(stored["as_of"]))

    async def _count(self) -> CountsSeen:
        as_of = time.time()
        return CountsSeen(await count_by_status(self._pocketbase), as_of)

    async def _count_and_share(self, token: str) -> CountsSeen:
        try:
            seen = await self._count()
            stored = json.dumps({"counts": seen.counts, "as_of": seen.as_of})
            await self._redis.set(self._keys.record_counts, stored, px=max(1, int(self._max_age * 1000)))
            return seen
        finally:
            await asyncio.shield(self._release(keys=[self._keys.record_counts_lock], args=[token]))
