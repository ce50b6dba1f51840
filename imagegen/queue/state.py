"""Queue-wide state in Redis, shared by every worker process on every host and by the CLI.

- pause: one JSON value with the reason, since when and who paused; while it exists no generation starts.
  `source` is "manual" (an operator), "auto" (account trouble or a failure streak: a human resumes) or
  "outage" (a shared service down too long: lifted by the workers themselves once it answers again) or
  "limit" (the day's JIMENG_DAILY_LIMIT used up: lifted by the workers themselves once `until` has passed,
  the next midnight in JIMENG_DAILY_LIMIT_TZ) or "accounts" (no jimeng account can take a call: lifted once
  `until`, the first account's return, has passed, or when a worker starts with a usable account).
- consecutive failures: jobs that exhausted their attempts in a row; QUEUE_MAX_FAILED of them pause.
- attempts: real attempts per prompt run; waiting while paused never counts, and a give-back stops at zero.
- verdicts: a final outcome decided while the record store was down, written by the job's next run.
- worker heartbeats: one key per live worker process, expiring shortly after it dies, and an index of them
  (a sorted set scored by expiry) so that reading them costs a look at the live workers only, never a scan of
  the keyspace (which holds a key per queued job).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

from loguru import logger
from pydantic import ValidationError
from redis.asyncio import Redis

from .beats import WorkerBeat
from .keys import RedisKeys

ATTEMPTS_TTL = 14 * 24 * 3600
VERDICT_TTL = 14 * 24 * 3600

# DECR that never goes below zero.
_GIVE_BACK = """
local n = tonumber(redis.call('get', KEYS[1]) or '0')
if n > 0 then return redis.call('decr', KEYS[1]) end
return 0
"""

# Delete the pause only if it is still the outage pause of that service.
_LIFT_OUTAGE = """
local raw = redis.call('get', KEYS[1])
if not raw then return 0 end
local pause = cjson.decode(raw)
if pause['source'] == 'outage' and pause['service'] == ARGV[1] then
  redis.call('del', KEYS[1])
  return 1
end
return 0
"""


# Delete the pause only if it is still a limit or accounts pause whose time (ARGV[1], epoch seconds) has come
# (an accounts pause without a time waits for a worker with a usable account: ARGV[2] = '1').
_LIFT_LIMIT = """
local raw = redis.call('get', KEYS[1])
if not raw then return 0 end
local pause = cjson.decode(raw)
local due = tonumber(pause['until'] or 0)
if (pause['source'] == 'limit' and due <= tonumber(ARGV[1]))
  or (pause['source'] == 'accounts' and ((due > 0 and due <= tonumber(ARGV[1])) or ARGV[2] == '1')) then
  redis.call('del', KEYS[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class PauseInfo:
    reason: str
    since: float
    source: str  # "manual", "auto", "outage", "limit" or "accounts"
    service: str = ""  # for an outage pause: the service that is down
    until: float = 0.0  # for a limit pause: when it lifts by itself (epoch seconds)


@dataclass(frozen=True)
class Verdict:
    """A job's final outcome waiting to be written onto its record."""

    error: str
    kind: str
    attempt: int


class QueueState:
    """Reads and changes the shared state; every method is one or two Redis round trips."""

    def __init__(self, redis: Redis, max_failed: int, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._redis = redis
        self._max_failed = max_failed
        self._give_back = redis.register_script(_GIVE_BACK)
        self._lift_outage = redis.register_script(_LIFT_OUTAGE)
        self._lift_limit = redis.register_script(_LIFT_LIMIT)

    async def pause(self, reason: str, source: str = "manual", service: str = "", until: float = 0.0) -> PauseInfo:
        """Pause the queue; an existing pause keeps its original reason and time."""
        info = PauseInfo(reason, time.time(), source, service, until)
        # `until` only where it means something: a pause without it still reads in a worker that predates it.
        stored = {name: value for name, value in asdict(info).items() if name != "until" or until}
        await self._redis.set(self.keys.pause, json.dumps(stored), nx=True)
        return await self.paused() or info

    async def resume(self) -> PauseInfo | None:
        """Lift the pause and reset the failure streak; returns the pause that was lifted."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.pause)
            pipe.delete(self.keys.pause)
            pipe.delete(self.keys.consecutive_failures)
            raw, _, _ = await pipe.execute()
        return PauseInfo(**json.loads(raw)) if raw else None

    async def lift_outage_pause(self, service: str) -> bool:
        """Lift the pause if it is the outage pause of `service` (a manual or account pause stays)."""
        return bool(await self._lift_outage(keys=[self.keys.pause], args=[service]))

    async def lift_limit_pause(self, now: float, *, accounts_usable: bool = False) -> bool:
        """Lift the pause if it is a daily-limit pause whose day is over at `now`, or an accounts pause whose
        first account is back at `now` (or at once with `accounts_usable`); any other pause stays."""
        return bool(await self._lift_limit(keys=[self.keys.pause], args=[now, "1" if accounts_usable else "0"]))

    async def paused(self) -> PauseInfo | None:
        raw = await self._redis.get(self.keys.pause)
        return PauseInfo(**json.loads(raw)) if raw else None

    async def consecutive_failures(self) -> int:
        return int(await self._redis.get(self.keys.consecutive_failures) or 0)

    async def record_success(self) -> None:
        await self._redis.set(self.keys.consecutive_failures, 0)

    async def record_exhausted(self, error: str) -> PauseInfo | None:
        """Count a job that used up its attempts; pauses the queue at QUEUE_MAX_FAILED in a row."""
        count = int(await self._redis.incr(self.keys.consecutive_failures))
        if count >= self._max_failed:
            return await self.pause(f"{count} jobs in a row failed after all their attempts; last: {error}", "auto")
        return None

    async def begin_attempt(self, prompt_id: str) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(self.keys.attempts(prompt_id))
            pipe.expire(self.keys.attempts(prompt_id), ATTEMPTS_TTL)
            count, _ = await pipe.execute()
        return int(count)

    async def give_back_attempt(self, prompt_id: str) -> None:
        await self._give_back(keys=[self.keys.attempts(prompt_id)])

    async def attempts(self, prompt_id: str) -> int:
        return int(await self._redis.get(self.keys.attempts(prompt_id)) or 0)

    async def forget_attempts(self, prompt_id: str) -> None:
        await self._redis.delete(self.keys.attempts(prompt_id))

    async def save_verdict(self, prompt_id: str, verdict: Verdict) -> None:
        await self._redis.set(self.keys.verdict(prompt_id), json.dumps(asdict(verdict)), ex=VERDICT_TTL)

    async def verdict(self, prompt_id: str) -> Verdict | None:
        raw = await self._redis.get(self.keys.verdict(prompt_id))
        return Verdict(**json.loads(raw)) if raw else None

    async def forget_verdict(self, prompt_id: str) -> None:
        await self._redis.delete(self.keys.verdict(prompt_id))

    async def heartbeat(self, beat: WorkerBeat, ttl: float) -> None:
        """Write a worker's heartbeat, alive for `ttl` seconds unless written again."""
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(beat.id), beat.model_dump_json(), px=int(ttl * 1000))
            pipe.zadd(self.keys.worker_index, {beat.id: now + ttl})
            pipe.zremrangebyscore(self.keys.worker_index, "-inf", now)  # workers that died without a word
            pipe.set(self.keys.worker_seen, str(now))
            await pipe.execute()

    async def last_worker_seen(self) -> float | None:
        """When a worker of this queue last beat (a Unix time), None if none ever did on this Redis."""
        raw = await self._redis.get(self.keys.worker_seen)
        return float(raw) if raw is not None else None

    async def stop_heartbeat(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.worker_index, worker_id)
            await pipe.execute()

    async def workers(self) -> list[WorkerBeat]:
        """The live workers' heartbeats, by id: two round trips, however long the queue."""
        ids = await self._redis.zrangebyscore(self.keys.worker_index, time.time(), "+inf")
        if not ids:
            return []
        found: list[WorkerBeat] = []
        for raw in await self._redis.mget([self.keys.worker(i.decode()) for i in ids]):
            if raw is None:
                continue  # expired since the index was read
            try:
                found.append(WorkerBeat.model_validate_json(raw))
            except ValidationError as exc:
                logger.debug("a worker heartbeat that does not parse is left out: {}", exc)
        return sorted(found, key=lambda beat: beat.id)


class PauseGate:
    """A worker's view of the pause, refreshed at most every `refresh` seconds."""

    def __init__(self, state: QueueState, refresh: float = 0.5) -> None:
        self._state = state
        self._refresh = refresh
        self._checked = float("-inf")
        self._info: PauseInfo | None = None
        self._reading = asyncio.Lock()

    async def current(self) -> PauseInfo | None:
        """The pause as read at most `refresh` seconds ago. Runs that ask while it is being read again wait for
        that one read: a wave of calls starting at once costs one round trip, not one each."""
        if time.monotonic() - self._checked >= self._refresh:
            async with self._reading:
                started = time.monotonic()
                if started - self._checked >= self._refresh:
                    self._info = await self._state.paused()
                    self._checked = started
        return self._info

    def invalidate(self) -> None:
        """Forget the cached view (after this process changed the pause itself)."""
        self._checked = float("-inf")

    async def close(self, reason: str, source: str, until: float = 0.0) -> PauseInfo:
        """Pause the queue from this process (an existing pause stays as it is) and see it at once."""
        info = await self._state.pause(reason, source=source, until=until)
        self.invalidate()
        return info

    async def wait_open(self, max_wait: float) -> bool:
        """Wait while the queue is paused; False when still paused after `max_wait` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max_wait
        while await self.current() is not None:
            if loop.time() >= end:
                return False
            await asyncio.sleep(self._refresh)
        return True
