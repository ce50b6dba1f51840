"""Paid jimeng calls counted by day and outcome, and the daily limit on them (JIMENG_DAILY_LIMIT).

A day runs from midnight to midnight in JIMENG_DAILY_LIMIT_TZ (default UTC). Every call a worker or
`imagegen generate` makes is counted under the day it started, by outcome:

- `images`: the API delivered images;
- `moderated`: refused by content moderation (-2006, or -2007 with 2038): still a call;
- `failed`: any other failure once the request may have left this host: an error code, an HTTP error status
  (401, 429, 5xx, ...), an empty or unreadable answer, a timeout, a connection dropped mid-request, a call
  cancelled while in flight. Whether such a call is billed can't be known here, so it counts.

A request that can't have left (the connection was never made: refused, DNS, TLS handshake) and a run that
stops before its call (paused, interrupted, out of time, lease lost) count nothing.

With a daily limit, a place under it is reserved in the same Lua script that takes the call's permit
(`permits`): the day's counted calls plus its reservations must stay below the limit, so no number of workers
can exceed it. The reservation becomes a counted call when the call ends, or is released when no call was
made, in one round trip with the permit's return. A worker killed during its call (SIGKILL, power loss) leaves
its reservation behind: it keeps counting against that day's limit (the call may have been paid) and shows
as `reserved`.

Keys (`keys`): `spend:<day>` a hash of the three outcomes, `spend:<day>:reserved` a set of run tokens; both
expire SPEND_TTL after the day's last write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from imagegen.errors import DailyLimitReached, ProviderError

from .keys import RedisKeys

SPEND_TTL = 400 * 24 * 3600

Clock = Callable[[], float]


class CallOutcome(StrEnum):
    IMAGES = "images"
    MODERATED = "moderated"
    FAILED = "failed"


def call_outcome(error: ProviderError | None) -> CallOutcome | None:
    """How a finished call counts (None for a request that never left this host: no call)."""
    if error is None:
        return CallOutcome.IMAGES
    if not error.reached:
        return None
    return CallOutcome.MODERATED if error.moderated else CallOutcome.FAILED


@dataclass(frozen=True)
class Reservation:
    """One run's claim on a call: the day it counts under and whether it holds a place under the limit."""

    token: str
    day: date
    limited: bool


@dataclass(frozen=True)
class DaySpend:
    """The calls of one day by outcome, and the reservations not yet counted."""

    day: date
    images: int = 0
    moderated: int = 0
    failed: int = 0
    reserved: int = 0

    @property
    def calls(self) -> int:
        return self.images + self.moderated + self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "calls": self.calls,
            "images": self.images,
            "moderated": self.moderated,
            "failed": self.failed,
            "reserved": self.reserved,
        }


def total(days: list[DaySpend]) -> dict[str, int]:
    """The sums over some days, for a total line."""
    return {
        "calls": sum(d.calls for d in days),
        "images": sum(d.images for d in days),
        "moderated": sum(d.moderated for d in days),
        "failed": sum(d.failed for d in days),
        "reserved": sum(d.reserved for d in days),
    }


class Spend:
    """The spend counts and the daily limit of one deployment; `clock` (epoch seconds) decides the day."""

    def __init__(self, redis: Redis, keys: RedisKeys, limit: int, zone: ZoneInfo, clock: Clock = time.time) -> None:
        self._redis = redis
        self._keys = keys
        self.limit = limit
        self.zone = zone
        self.clock = clock

    def day(self, at: float | None = None) -> date:
        """The day (in the limit's time zone) at epoch `at`, by default now."""
        return datetime.fromtimestamp(self.clock() if at is None else at, self.zone).date()

    def day_end(self, day: date) -> float:
        """Epoch seconds of the midnight that ends `day`."""
        return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=self.zone).timestamp()

    def day_keys(self, day: date) -> list[str]:
        """The counts hash and the reservation set of one day."""
        return [self._keys.spend(day.isoformat()), self._keys.spend_reserved(day.isoformat())]

    def reservation(self, token: str) -> Reservation:
        """A claim for a call starting now, under today's limit if there is one."""
        return Reservation(token, self.day(), self.limit > 0)

    def limit_reached(self, day: date) -> DailyLimitReached:
        return DailyLimitReached(
            f"daily limit of {self.limit} jimeng calls reached for {day.isoformat()} (JIMENG_DAILY_LIMIT); "
            f"resumes at 00:00 {self.zone.key}",
            until=self.day_end(day),
        )

    def add_settle(self, pipe: Pipeline, reservation: Reservation, outcome: CallOutcome | None) -> None:
        """Queue on `pipe` the end of a call: count it under `outcome` (None: no call was made) and drop its
        reservation."""
        counts, reserved = self.day_keys(reservation.day)
        if reservation.limited:
            pipe.srem(reserved, reservation.token)
        if outcome is not None:
            pipe.hincrby(counts, outcome.value, 1)
            pipe.expire(counts, SPEND_TTL)

    async def days(self, count: int) -> list[DaySpend]:
        """The last `count` days, today first."""
        today = self.day()
        wanted = [today - timedelta(days=back) for back in range(count)]
        fields = [outcome.value for outcome in CallOutcome]
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in wanted:
                counts, reserved = self.day_keys(day)
                pipe.hmget(counts, fields)
                pipe.scard(reserved)
            answers = await pipe.execute()
        found = []
        for index, day in enumerate(wanted):
            images, moderated, failed = (int(v or 0) for v in answers[2 * index])
            found.append(DaySpend(day, images, moderated, failed, reserved=int(answers[2 * index + 1])))
        return found

    async def today(self) -> DaySpend:
        [day] = await self.days(1)
        return day


def limit_json(spend: Spend, today: DaySpend) -> dict[str, Any]:
    """Today's calls against the limit, as `imagegen status --json` shows them."""
    return {**today.to_json(), "timezone": spend.zone.key, "limit": spend.limit or None}
