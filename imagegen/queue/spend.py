"""Paid calls counted by day, provider, account and outcome, and each provider's daily limit (JIMENG_DAILY_LIMIT,
ARK_DAILY_LIMIT).

A day runs from midnight to midnight in JIMENG_DAILY_LIMIT_TZ (default UTC) for every provider. Every call a
worker or `imagegen generate` makes is counted under the day it started, its provider (jimeng, ark) and its
account (a fingerprint of the key it was made with, never the key), by outcome:

- `images`: the API delivered images;
- `moderated`: refused by content moderation (-2006, or -2007 with 2038): still a call;
- `failed`: any other failure once the request may have left this host: an error code, an HTTP error status
  (401, 429, 5xx, ...), an empty or unreadable answer, a timeout, a connection dropped mid-request, a call
  cancelled while in flight. Whether such a call is billed can't be known here, so it counts.

A request that can't have left (the connection was never made: refused, DNS, TLS handshake) and a run that
stops before its call (paused, interrupted, out of time, lease lost) count nothing.

Each provider's limit holds on its own. With a daily limit, a place under it is reserved in the same Lua
script that takes the call's permit (`permits`): the day's counted calls of that provider plus its
reservations must stay below its limit, so no number of workers can exceed it. The script is given the
providers in IMAGE_PROVIDERS' order and reserves under the first one with room: a provider whose limit is used
up is passed over like one with no usable account, so with `jimeng,ark` calls go on to Ark once jimeng's limit
is reached, and the queue pauses only when every provider's is. The reservation becomes a counted call when
the call ends, or is released when no call was made, in one round trip with the permit's return. A worker
killed during its call (SIGKILL, power loss) leaves its reservation behind: it keeps counting against that
day's limit (the call may have been paid) and shows as `reserved`.

Keys (`keys`): a provider's day is a hash of the three outcomes (field `images`, ...) and of the same per
account (field `images:<fingerprint>`, ...), and a set of reserved run tokens; both expire SPEND_TTL after the
day's last write. jimeng's keep the names they had when it was the only provider (`spend:<day>`,
`spend:<day>:reserved`), so the counts of a deployment upgraded mid-day go on; Ark's are `spend:<day>:ark` and
`spend:<day>:ark:reserved`. Calls counted before accounts were (or by an older worker) show under no account.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
    """One run's claim on a call: the day and provider it counts under, whether it holds a place under that
    provider's limit, and the account the call was made with (set once chosen)."""

    token: str
    day: date
    provider: str
    limited: bool
    account: str = ""


@dataclass(frozen=True, kw_only=True)
class Counts:
    """Calls by outcome, and the reservations not yet counted."""

    images: int = 0
    moderated: int = 0
    failed: int = 0
    reserved: int = 0

    @property
    def calls(self) -> int:
        return self.images + self.moderated + self.failed

    def counts_json(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "images": self.images,
            "moderated": self.moderated,
            "failed": self.failed,
            "reserved": self.reserved,
        }


def summed(parts: Sequence[Counts]) -> dict[str, int]:
    """The counts of `parts` added up, as `Counts` takes them."""
    return {name: sum(getattr(part, name) for part in parts) for name in ("images", "moderated", "failed", "reserved")}


@dataclass(frozen=True, kw_only=True)
class AccountSpend(Counts):
    """One account's calls of a day; `account` is its fingerprint, empty for calls counted without one."""

    account: str

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account or None, **self.counts_json()}


@dataclass(frozen=True, kw_only=True)
class ProviderSpend(Counts):
    """One provider's calls of a day against its daily limit (0: none), and per account."""

    provider: str
    limit: int = 0
    accounts: tuple[AccountSpend, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "limit": self.limit or None,
            **self.counts_json(),
            "accounts": [account.to_json() for account in self.accounts],
        }


@dataclass(frozen=True, kw_only=True)
class DaySpend(Counts):
    """The calls of one day across every provider, and per provider (in IMAGE_PROVIDERS' order)."""

    day: date
    providers: tuple[ProviderSpend, ...] = ()

    def provider(self, name: str) -> ProviderSpend:
        return next(p for p in self.providers if p.provider == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            **self.counts_json(),
            "providers": [provider.to_json() for provider in self.providers],
        }


def total(days: list[DaySpend]) -> dict[str, Any]:
    """The sums over some days, overall and per provider, for a total line."""
    names = [p.provider for p in days[0].providers] if days else []
    per = {name: Counts(**summed([day.provider(name) for day in days])).counts_json() for name in names}
    return {**Counts(**summed(days)).counts_json(), "providers": per}


def _account_counts(raw: dict[str, int]) -> tuple[AccountSpend, ...]:
    """The per-account fields of a provider's day hash; calls its totals hold beyond them have no account."""
    outcomes = [outcome.value for outcome in CallOutcome]
    by_account: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        outcome, _, account = field.partition(":")
        if account and outcome in outcomes:
            by_account.setdefault(account, {})[outcome] = value
    found = [AccountSpend(account=account, **counts) for account, counts in sorted(by_account.items())]
    rest = {o: raw.get(o, 0) - sum(a.get(o, 0) for a in by_account.values()) for o in outcomes}
    if any(rest.values()):
        found.append(AccountSpend(account="", **{o: max(0, n) for o, n in rest.items()}))
    return tuple(found)


class Spend:
    """The spend counts and the daily limits of one deployment: `limits` by provider, in IMAGE_PROVIDERS'
    order (0: none); `clock` (epoch seconds) decides the day."""

    def __init__(
        self, redis: Redis, keys: RedisKeys, limits: dict[str, int], zone: ZoneInfo, clock: Clock = time.time
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.limits = limits
        self.zone = zone
        self.clock = clock

    def day(self, at: float | None = None) -> date:
        """The day (in the limit's time zone) at epoch `at`, by default now."""
        return datetime.fromtimestamp(self.clock() if at is None else at, self.zone).date()

    def day_end(self, day: date) -> float:
        """Epoch seconds of the midnight that ends `day`."""
        return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=self.zone).timestamp()

    def day_keys(self, day: date, provider: str) -> list[str]:
        """The counts hash and the reservation set of one provider's day."""
        counts = self._keys.spend(day.isoformat(), provider)
        return [counts, f"{counts}:reserved"]

    def reservation(self, token: str, provider: str) -> Reservation:
        """A claim for a call to `provider` starting now, under its limit for today if it has one."""
        return Reservation(token, self.day(), provider, self.limits.get(provider, 0) > 0)

    def limit_reached(self, day: date, providers: Sequence[str]) -> DailyLimitReached:
        """The error of a day whose every provider (of those a call may go to) has used up its limit."""
        reached = "; ".join(
            f"daily limit of {self.limits[name]} {name} calls reached for {day.isoformat()} "
            f"({name.upper()}_DAILY_LIMIT)"
            for name in providers
        )
        return DailyLimitReached(f"{reached}; resumes at 00:00 {self.zone.key}", until=self.day_end(day))

    def add_settle(self, pipe: Pipeline, reservation: Reservation, outcome: CallOutcome | None) -> None:
        """Queue on `pipe` the end of a call: count it under `outcome` (None: no call was made), for its
        provider and account, and drop its reservation."""
        counts, reserved = self.day_keys(reservation.day, reservation.provider)
        if reservation.limited:
            pipe.srem(reserved, reservation.token)
        if outcome is not None:
            pipe.hincrby(counts, outcome.value, 1)
            if reservation.account:
                pipe.hincrby(counts, f"{outcome.value}:{reservation.account}", 1)
            pipe.expire(counts, SPEND_TTL)

    async def days(self, count: int) -> list[DaySpend]:
        """The last `count` days, today first."""
        today = self.day()
        wanted = [today - timedelta(days=back) for back in range(count)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in wanted:
                for provider in self.limits:
                    counts, reservations = self.day_keys(day, provider)
                    pipe.hgetall(counts)
                    pipe.scard(reservations)
            answers = iter(await pipe.execute())
        found = []
        for day in wanted:
            providers = []
            for provider, limit in self.limits.items():
                raw = {key.decode(): int(value) for key, value in next(answers).items()}
                reserved = int(next(answers))
                outcomes = {outcome.value: raw.get(outcome.value, 0) for outcome in CallOutcome}
                providers.append(
                    ProviderSpend(
                        provider=provider,
                        limit=limit,
                        reserved=reserved,
                        accounts=_account_counts(raw),
                        **outcomes,
                    )
                )
            found.append(DaySpend(day=day, providers=tuple(providers), **summed(providers)))
        return found

    async def today(self) -> DaySpend:
        [day] = await self.days(1)
        return day


def limit_json(spend: Spend, today: DaySpend) -> dict[str, Any]:
    """Today's calls against the limits, as `imagegen status --json` shows them (`limit`: jimeng's)."""
    return {**today.to_json(), "timezone": spend.zone.key, "limit": spend.limits.get("jimeng") or None}
