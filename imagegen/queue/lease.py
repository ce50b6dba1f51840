"""A per-prompt lease with an owner: only the run holding it may pay, commit a result or delete objects.

The lease is one Redis key holding a random owner token, with a short expiry (WORKER_LEASE). Its owner
renews it (every WORKER_LEASE / 4 from the heartbeat, and at each check) with a compare-and-set script that
also keeps arq's in-progress key of the job alive, so a killed worker's job can be picked up elsewhere within
one lease period instead of arq's job timeout. A run whose lease was taken by another run is told so at its
next check and stops without paying and without deleting anything.

A lease that is simply gone (expired while nobody took it, or Redis was flushed) is taken back by its owner:
no other run can have started in between, because starting requires taking the lease first.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from imagegen.errors import LeaseLost

from .keys import RedisKeys

# KEYS: lease, arq in-progress key; ARGV: token, ttl ms. Returns 1 renewed, 2 taken (was free), 0 held by another.
# The renewal reads before it writes, so it works even while Redis refuses writes (PEXPIRE is allowed then).
_CLAIM = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  redis.call('pexpire', KEYS[2], ARGV[2])
  return 1
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('set', KEYS[2], '1', 'PX', ARGV[2])
  return 2
end
return 0
"""

# KEYS: a lease; ARGV: token. Deletes the lease only while the token holds it (also used by `watch`).
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class PromptLease:
    """The lease of one run (one job execution) on one prompt."""

    def __init__(self, redis: Redis, keys: RedisKeys, prompt_id: str, job_id: str, ttl: float) -> None:
        self._redis = redis
        self._key = keys.lease(prompt_id)
        self.prompt_id = prompt_id
        self.job_id = job_id
        self._ttl_ms = int(ttl * 1000)
        self.token = secrets.token_hex(12)
        self.held = False
        self.released = False
        self._ttl = ttl
        self._confirmed = float("-inf")  # monotonic time of the last renewal Redis confirmed
        self._lock = asyncio.Lock()
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(RELEASE)

    async def claim(self) -> bool:
        """Take or renew the lease; False when another run holds it (then this run has lost it)."""
        async with self._lock:
            if self.released:
                return False
            result = await self._claim(
                keys=[self._key, in_progress_key_prefix + self.job_id], args=[self.token, self._ttl_ms]
            )
            self.held = int(result) > 0
            if self.held:
                self._confirmed = time.monotonic()
            return self.held

    async def ensure(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (renewing it); call before paying or committing.

        A lease renewed less than a third of its life ago can't have passed to another run yet (that takes
        it expiring first), so the check is free then; otherwise it renews in Redis. The heartbeat renews every
        lease a quarter of its life after the last renewal, so a run that waited for a generation slot finds
        its lease fresh and starts its call the moment the slot frees, without a round trip."""
        if self.held and not self.released and time.monotonic() - self._confirmed < self._ttl / 3:
            return
        if not await self.claim():
            raise LeaseLost(f"another run holds the lease on {self.prompt_id}; this run stops without paying")

    async def release(self) -> None:
        """Give the lease up (only if still ours); later renewals do nothing."""
        async with self._lock:
            self.released = True
            if self.held:
                await self._release(keys=[self._key], args=[self.token])
                self.held = False


async def lease_ttl(redis: Redis, keys: RedisKeys, prompt_id: str) -> float:
    """Seconds until another run's lease on the prompt expires (0 when there is none)."""
    remaining = int(await redis.pttl(keys.lease(prompt_id)))
    return max(0.0, remaining / 1000)
