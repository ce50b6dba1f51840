"""Limits on jimeng calls shared by every worker process and host, kept in Redis.

- JIMENG_MAX_INFLIGHT (0: no cap) is how many calls may be in flight at once, whatever the number of workers.
  A run takes a permit right before its paid call and gives it back as soon as the call returns; the permits
  live in one sorted set whose scores are expiry times (Redis's own clock), renewed with the run's lease. A
  worker killed mid-call leaks nothing: its permits expire within WORKER_LEASE and the cap is whole again.
- JIMENG_RATE_LIMIT (0: none) is how many calls may start in any 60 seconds: a sliding window of call start
  times, checked and written in the same script as the permit, so no two workers can both take the last call.
- JIMENG_DAILY_LIMIT (0: none) is how many calls a day may make: the same script reserves a place under the
  day's limit (`spend`), so a call that may start holds its permit, its rate slot and its place at once, in
  one round trip; `finish` gives the permit back and counts (or releases) the reservation in one more.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from imagegen.errors import DailyLimitReached

from .keys import RedisKeys
from .spend import SPEND_TTL, CallOutcome, Reservation, Spend

# KEYS: permits, call window, the day's spend counts, the day's reservations;
# ARGV: token, ttl ms, cap, rate, window ms, daily limit, spend ttl s, then the outcome fields of the counts.
# Returns 0 when the call may start (permit taken, start recorded, place reserved), -2 when the day's limit is
# used up, -1 when the cap is full, or else the milliseconds until the rate window has room.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cap, rate, window, limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if limit > 0 then
  local used = redis.call('scard', KEYS[4])
  for i = 8, #ARGV do
    used = used + (tonumber(redis.call('hget', KEYS[3], ARGV[i])) or 0)
  end
  if used >= limit then
    return -2
  end
end
if cap > 0 then
  redis.call('zremrangebyscore', KEYS[1], '-inf', now)
  if not redis.call('zscore', KEYS[1], ARGV[1]) and redis.call('zcard', KEYS[1]) >= cap then
    return -1
  end
end
if rate > 0 then
  redis.call('zremrangebyscore', KEYS[2], '-inf', now - window)
  if redis.call('zcard', KEYS[2]) >= rate then
    local oldest = redis.call('zrange', KEYS[2], 0, 0, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + window - now)
  end
  redis.call('zadd', KEYS[2], now, ARGV[1] .. ':' .. now)
  redis.call('pexpire', KEYS[2], window)
end
if cap > 0 then
  redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
if limit > 0 then
  redis.call('sadd', KEYS[4], ARGV[1])
  redis.call('expire', KEYS[4], ARGV[7])
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
RATE_WINDOW = 60.0


class CallPermits:
    """The shared limits of one deployment; 0 for `cap` or `rate` means none (every call goes at once), and
    `spend` holds the daily limit and counts every call."""

    def __init__(self, redis: Redis, keys: RedisKeys, cap: int, rate: int, ttl: float, spend: Spend) -> None:
        self._redis = redis
        self._spend = spend
        self._key = keys.inflight_calls
        self._window_key = keys.call_window
        self.cap = cap
        self.rate = rate
        self._ttl_ms = int(ttl * 1000)
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)

    async def try_take(self, reservation: Reservation) -> float:
        """0 when the call may start now (its place under the daily limit reserved), else seconds to wait
        before trying again; raises DailyLimitReached when the day's limit is used up."""
        if not self.cap and not self.rate and not reservation.limited:
            return 0.0
        window_ms = int(RATE_WINDOW * 1000)
        limit = self._spend.limit if reservation.limited else 0
        fields = [outcome.value for outcome in CallOutcome]
        answer = int(
            await self._take(
                keys=[self._key, self._window_key, *self._spend.day_keys(reservation.day)],
                args=[reservation.token, self._ttl_ms, self.cap, self.rate, window_ms, limit, SPEND_TTL, *fields],
            )
        )
        if answer == -2:
            raise self._spend.limit_reached(reservation.day)
        return 0.0 if answer == 0 else WAIT_STEP if answer < 0 else answer / 1000

    async def take(self, token: str, can_wait: float, prompt_id: str = "-") -> Reservation | None:
        """Wait up to `can_wait` seconds until a call may start; None when none could in time. The reservation
        returned must go to `finish` whatever happens next. Raises DailyLimitReached (nothing held)."""
        reservation = self._spend.reservation(token)
        loop = asyncio.get_running_loop()
        end = loop.time() + can_wait
        told = False
        try:
            while wait := await self.try_take(reservation):
                if loop.time() + wait > end:
                    return None
                if wait >= 1 and not told:
                    logger.bind(prompt_id=prompt_id).info(
                        "waiting {:.0f}s: JIMENG_RATE_LIMIT={} calls a minute reached", wait, self.rate
                    )
                    told = True
                await asyncio.sleep(wait)
                reservation = self._spend.reservation(token)  # a wait may cross midnight
        except DailyLimitReached:
            raise
        except BaseException:
            # Cancelled or cut off mid-round-trip: the script may have run, so give back what it may have taken.
            with suppress(RedisError, OSError):
                await asyncio.shield(self.finish(reservation, None))
            raise
        return reservation

    async def finish(self, reservation: Reservation, outcome: CallOutcome | None) -> None:
        """The call is over: give the permit back and count the call under `outcome` in its day, or release
        the reservation when no call was made (`outcome` None). One round trip."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if self.cap:
                pipe.zrem(self._key, reservation.token)
            self._spend.add_settle(pipe, reservation, outcome)
            if len(pipe):
                await pipe.execute()

    async def renew(self, token: str) -> None:
        if self.cap:
            await self._renew(keys=[self._key], args=[token, self._ttl_ms])

    async def in_use(self) -> int:
        """Permits held now (expired ones not counted)."""
        if not self.cap:
            return 0
        now = await self._redis.time()
        return int(await self._redis.zcount(self._key, now[0] * 1000 + now[1] // 1000, "+inf"))
