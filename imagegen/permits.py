"""A cap on concurrent jimeng calls shared by every worker process and host, kept in Redis.

JIMENG_MAX_INFLIGHT (0: no cap) is what the account allows at once, whatever the number of workers. A run takes
a permit right before its paid call and gives it back as soon as the call returns; the permits live in one
sorted set whose scores are expiry times (Redis's own clock), renewed with the run's lease. A worker that is
killed mid-call leaks nothing: its permits expire within WORKER_LEASE and the cap is whole again.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from .keys import RedisKeys

# KEYS: permits; ARGV: token, ttl ms, cap. 1 taken (or renewed), 0 full. Expired permits are dropped first.
_TAKE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now_ms)
if redis.call('zscore', KEYS[1], ARGV[1]) or redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""

# KEYS: permits; ARGV: token, ttl ms. Renews a permit still held.
_RENEW = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
return redis.call('zadd', KEYS[1], 'XX', 'CH', now_ms + tonumber(ARGV[2]), ARGV[1])
"""

WAIT_STEP = 0.2


class CallPermits:
    """The shared cap of one deployment; `cap` 0 means no cap (every call goes at once)."""

    def __init__(self, redis: Redis, keys: RedisKeys, cap: int, ttl: float) -> None:
        self._redis = redis
        self._key = keys.inflight_calls
        self.cap = cap
        self._ttl_ms = int(ttl * 1000)
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)

    async def try_take(self, token: str) -> bool:
        if not self.cap:
            return True
        return bool(await self._take(keys=[self._key], args=[token, self._ttl_ms, self.cap]))

    async def take(self, token: str, can_wait: float) -> bool:
        """Wait for a permit up to `can_wait` seconds; False when none came free in time."""
        loop = asyncio.get_running_loop()
        end = loop.time() + can_wait
        while not await self.try_take(token):
            if loop.time() + WAIT_STEP > end:
                return False
            await asyncio.sleep(WAIT_STEP)
        return True

    async def renew(self, token: str) -> None:
        if self.cap:
            await self._renew(keys=[self._key], args=[token, self._ttl_ms])

    async def give_back(self, token: str) -> None:
        if self.cap:
            await self._redis.zrem(self._key, token)

    async def in_use(self) -> int:
        """Permits held now (expired ones not counted)."""
        if not self.cap:
            return 0
        now = await self._redis.time()
        return int(await self._redis.zcount(self._key, now[0] * 1000 + now[1] // 1000, "+inf"))
