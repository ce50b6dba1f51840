"""Job outcomes per minute, for throughput and failure rate over the last hour.

The job boundary counts each final outcome (`done` or `failed`) in a Redis hash per minute bucket that
expires after two hours (readers sum the buckets they want) and in one hash of totals since the queue began
(the queue's Prometheus counters). Written in the round trip that ends the job; no growing keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from imagegen.models import OutcomeStatus, iso_time

from .keys import RedisKeys

BUCKET_TTL = 2 * 3600
WINDOW_MINUTES = 60
COUNTED = (OutcomeStatus.DONE, OutcomeStatus.FAILED)


@dataclass(frozen=True)
class MinuteCount:
    minute: int  # minutes since the epoch (UTC)
    done: int
    failed: int


@dataclass(frozen=True)
class Throughput:
    """The last `minutes` minutes, oldest first, with their totals."""

    minutes: list[MinuteCount]

    @property
    def done(self) -> int:
        return sum(m.done for m in self.minutes)

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self.minutes)

    @property
    def failure_rate(self) -> float | None:
        """Failed among finished jobs (0..1); None when nothing finished."""
        finished = self.done + self.failed
        return self.failed / finished if finished else None

    def to_json(self) -> dict[str, object]:
        return {
            "window_minutes": len(self.minutes),
            "done": self.done,
            "failed": self.failed,
            "failure_rate": self.failure_rate,
            "minutes": [{"minute": iso_time(m.minute * 60), "done": m.done, "failed": m.failed} for m in self.minutes],
        }


class OutcomeCounter:
    """Counts job outcomes per minute in Redis; shared by the worker (writes) and front ends (reads)."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys

    def add(self, pipe: Pipeline, status: OutcomeStatus, *, now: float | None = None) -> None:
        """Queue the count of one outcome on `pipe`, for the caller to execute with its other writes."""
        if status not in COUNTED:
            return
        key = self._keys.outcomes(int((time.time() if now is None else now) // 60))
        pipe.hincrby(key, status.value, 1)
        pipe.expire(key, BUCKET_TTL)
        pipe.hincrby(self._keys.outcome_totals, status.value, 1)

    async def totals(self) -> dict[str, int]:
        """Jobs ended done and failed since the queue began."""
        fields = [status.value for status in COUNTED]
        raw: list[bytes | None] = await self._redis.hmget(self._keys.outcome_totals, fields)  # type: ignore[misc]
        return {status.value: int(value or 0) for status, value in zip(COUNTED, raw, strict=True)}

    async def last(self, minutes: int = WINDOW_MINUTES, *, now: float | None = None) -> Throughput:
        """Done and failed counts of each of the last `minutes` minutes, the current one included."""
        current = int((time.time() if now is None else now) // 60)
        span = range(current - minutes + 1, current + 1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for minute in span:
                pipe.hmget(self._keys.outcomes(minute), [OutcomeStatus.DONE.value, OutcomeStatus.FAILED.value])
            rows = await pipe.execute()
        return Throughput(
            [
                MinuteCount(minute, int(done or 0), int(failed or 0))
                for minute, (done, failed) in zip(span, rows, strict=True)
            ]
        )
