"""Limits on jimeng calls shared by every worker process and host, kept in Redis.

- JIMENG_MAX_INFLIGHT (0: no cap) is how many calls may be in flight at once, whatever the number of workers.
  A run takes a permit right before its paid call and gives it back as soon as the call returns; the permits
  live in one sorted set whose scores are expiry times (Redis's own clock), renewed with the run's lease. A
  worker killed mid-call leaks nothing: its permits expire within WORKER_LEASE and the cap is whole again.
- JIMENG_RATE_LIMIT (0: none) is how many calls may start in any 60 seconds: a sliding window of call start
  times, checked and written in the same script as the permit, so no two workers can both take the last call.
- JIMENG_DAILY_LIMIT and ARK_DAILY_LIMIT (0: none) are how many calls a day each provider may take: the same
  script reserves a place under the limit of the first provider, in IMAGE_PROVIDERS' order, whose day has room
  (`spend`), so a call that may start holds its permit, its rate slot and its place at once, in one round
  trip; `finish` gives the permit back and counts (or releases) the reservation in one more. A call whose
  provider turns out to have no usable account moves its reservation to the next provider (`move`), keeping
  its permit and its rate slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import suppress

from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from imagegen.errors import DailyLimitReached

from .keys import RedisKeys
from .spend import SPEND_TTL, CallOutcome, Reservation, Spend

# KEYS: permits, call window, then each candidate provider's day counts and day reservations;
# ARGV: token, ttl ms, cap, rate, window ms, spend ttl s, the number of outcome fields, the outcome fields, then
# each candidate's daily limit (0: none). With cap and rate 0 only a place is reserved (a reservation moved).
# Returns {0, i} when the call may start with a place under candidate i (from 1; permit taken, start recorded),
# {-2} when every candidate's limit is used up, {-1} when the cap is full, or else {ms} until the rate window
# has room.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cap, rate, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nfields = tonumber(ARGV[7])
local first_limit = 8 + nfields
local chosen, limit = nil, 0
for i = first_limit, #ARGV do
  local n = i - first_limit + 1
  limit = tonumber(ARGV[i])
  local used = 0
  if limit > 0 then
    used = redis.call('scard', KEYS[2 + 2 * n])
    for f = 8, first_limit - 1 do
      used = used + (tonumber(redis.call('hget', KEYS[1 + 2 * n], ARGV[f])) or 0)
    end
  end
  if limit == 0 or used < limit then
    chosen = n
    break
  end
end
if chosen == nil then
  return {-2}
end
if cap > 0 then
  redis.call('zremrangebyscore', KEYS[1], '-inf', now)
  if not redis.call('zscore', KEYS[1], ARGV[1]) and redis.call('zcard', KEYS[1]) >= cap then
    return {-1}
  end
end
if rate > 0 then
  redis.call('zremrangebyscore', KEYS[2], '-inf', now - window)
  if redis.call('zcard', KEYS[2]) >= rate then
    local oldest = redis.call('zrange', KEYS[2], 0, 0, 'WITHSCORES')
    return {math.max(1, tonumber(oldest[2]) + window - now)}
  end
  redis.call('zadd', KEYS[2], now, ARGV[1] .. ':' .. now)
  redis.call('pexpire', KEYS[2], window)
end
if cap > 0 then
  redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
if limit > 0 then
  redis.call('sadd', KEYS[2 + 2 * chosen], ARGV[1])
  redis.call('expire', KEYS[2 + 2 * chosen], ARGV[6])
end
return {0, chosen}
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

    async def try_take(
        self, token: str, providers: Sequence[str], *, cap: int | None = None, rate: int | None = None
    ) -> Reservation | float:
        """The reservation when the call may start now (its place under the limit of the first of `providers`
        with room reserved), else seconds to wait before trying again; raises DailyLimitReached when every one
        of `providers` has used up today's limit. `cap` and `rate` default to the deployment's."""
        cap = self.cap if cap is None else cap
        rate = self.rate if rate is None else rate
        spend = self._spend
        day = spend.day()
        limits = [spend.limits.get(provider, 0) for provider in providers]
        if not cap and not rate and not any(limits):
            return spend.reservation(token, providers[0])
        fields = [outcome.value for outcome in CallOutcome]
        answer = await self._take(
            keys=[self._key, self._window_key, *(key for p in providers for key in spend.day_keys(day, p))],
            args=[token, self._ttl_ms, cap, rate, int(RATE_WINDOW * 1000), SPEND_TTL, len(fields), *fields, *limits],
        )
        code = int(answer[0])
        if code == -2:
            raise spend.limit_reached(day, providers)
        if code == 0:
            provider = providers[int(answer[1]) - 1]
            return Reservation(token, day, provider, spend.limits.get(provider, 0) > 0)
        return WAIT_STEP if code < 0 else code / 1000

    async def take(
        self,
        token: str,
        can_wait: float,
        prompt_id: str = "-",
        providers: Sequence[str] = ("jimeng",),
        *,
        places_only: bool = False,
    ) -> Reservation | None:
        """Wait up to `can_wait` seconds until a call may start, reserved under the first of `providers` whose
        daily limit has room; None when none could in time. The reservation returned must go to `finish`
        whatever happens next. Raises DailyLimitReached when every one's limit is used up (nothing held).
        `places_only`: only a place under a limit is taken (the permit and rate slot are held already)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + can_wait
        told = False
        held = {"cap": 0, "rate": 0} if places_only else {}
        try:
            # A wait may cross midnight: each try reserves under the day it starts in.
            while not isinstance(taken := await self.try_take(token, providers, **held), Reservation):
                if loop.time() + taken > end:
                    return None
                if taken >= 1 and not told:
                    logger.bind(prompt_id=prompt_id).info(
                        "waiting {:.0f}s: JIMENG_RATE_LIMIT={} calls a minute reached", taken, self.rate
                    )
                    told = True
                await asyncio.sleep(taken)
        except DailyLimitReached:
            raise
        except BaseException:
            # Cancelled or cut off mid-round-trip: the script may have run, so give back what it may have taken.
            with suppress(RedisError, OSError):
                for provider in providers:
                    await asyncio.shield(self.finish(self._spend.reservation(token, provider), None))
            raise
        return taken

    async def move(self, reservation: Reservation, providers: Sequence[str]) -> Reservation:
        """The call of `reservation` goes elsewhere: its place under the first of `providers` whose limit has
        room, its permit and rate slot kept. Raises DailyLimitReached (its old place released either way)."""
        await self._release(reservation)
        taken = await self.take(reservation.token, 0.0, providers=providers, places_only=True)
        assert taken is not None, "with no cap and no rate a place is taken at once, or none is left"
        return taken

    async def _release(self, reservation: Reservation) -> None:
        if reservation.limited:
            _, reserved = self._spend.day_keys(reservation.day, reservation.provider)
            await self._redis.srem(reserved, reservation.token)  # type: ignore[misc]

    async def finish(self, reservation: Reservation, outcome: CallOutcome | None) -> None:
        """The call is over: give the permit back and count the call under `outcome` in its day, provider and
        account, or release the reservation when no call was made (`outcome` None). One round trip."""
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
