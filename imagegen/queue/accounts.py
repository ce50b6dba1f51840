"""The jimeng accounts of a deployment and their health, shared by every worker through Redis.

JIMENG_API_KEY may hold several keys, comma-separated: each is one account's web session. A session expires
after days or weeks (every call then answers -2002) and a free account runs out of credits each day (-2009).
The proxy itself, given all keys at once, picks one at random per request with no health tracking; here each
call sends one key, chosen by these rules:

- a call takes the usable account with the fewest calls in flight across every worker, under
  JIMENG_ACCOUNT_CONCURRENCY calls at once and JIMENG_ACCOUNT_DAILY_LIMIT calls a day per account (0: none);
- -2002 sets the account aside as **expired** until its key changes (a changed key is a new account: accounts
  are known by a fingerprint of their key);
- -2009 sets it aside **out of credits** until the day turns in JIMENG_DAILY_LIMIT_TZ;
- any other account-level refusal (risk control, a gateway's 401/403) sets it aside **refused** for
  REFUSED_FOR seconds;
- COOL_AFTER transient failures in a row from one account **cool** it down, COOL_FIRST seconds, doubling with
  each further failure up to COOL_MAX, while another account is usable (the last one is never cooled: the
  failure streak, QUEUE_MAX_FAILED, judges those failures); a call with images ends the streak.

Only when no account can take a call does the queue pause (`AccountsUnavailable`, pause source "accounts");
the pause lifts by itself at the first time an account comes back, and at a worker's start when its keys
include a usable account (a replaced key).

Keys (`keys`): `account:<fp>` a hash (state, until ms, since ms, reason, streak); `account:<fp>:inflight` the
tokens of calls in flight scored by expiry (a killed worker's calls expire); `account-calls:<day>` calls
started per account that day. A key itself is never stored, logged or shown: only `label` (its position and
last four characters) and the fingerprint.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from enum import StrEnum

from pydantic import SecretStr
from redis.asyncio import Redis

from imagegen.errors import AccountsUnavailable, FailureKind, JimengError
from imagegen.settings import Settings

from .keys import RedisKeys
from .spend import Spend

COOL_AFTER = 3
COOL_FIRST = 30.0
COOL_MAX = 1800.0
REFUSED_FOR = 3600.0
ACCOUNT_CALLS_TTL = 3 * 86_400
CLAIM_MARKER_TTL = 2 * 86_400
EXPIRED_CODE = -2002
NO_CREDITS_CODE = -2009


class AccountState(StrEnum):
    HEALTHY = "healthy"
    COOLING = "cooling"
    NO_CREDITS = "out of credits"
    EXPIRED = "expired"
    REFUSED = "refused"
    BUSY = "at its cap"
    DAILY_CAP = "daily cap reached"


class NoUsableAccount(Exception):
    """Every account is set aside or capped for the day (see `AccountPool.unavailable` for the words)."""


@dataclass(frozen=True)
class Account:
    """One key of JIMENG_API_KEY: `index` from 1, `fingerprint` names it in Redis, `label` in words."""

    index: int
    total: int
    key: SecretStr
    fingerprint: str

    @property
    def label(self) -> str:
        return f"key {self.index} of {self.total} (…{self.key.get_secret_value()[-4:]})"


def accounts_of(keys: list[SecretStr]) -> list[Account]:
    return [
        Account(index, len(keys), key, hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:12])
        for index, key in enumerate(keys, start=1)
    ]


@dataclass(frozen=True)
class AccountHealth:
    """What `imagegen accounts`, status and the API show of one account."""

    account: Account
    state: AccountState
    until: float | None  # epoch seconds it comes back; None: not set aside, or until its key changes
    since: float | None
    reason: str
    in_flight: int
    calls_today: int
    streak: int
    credits: int | None = None  # from the proxy's /token/points, when asked (`imagegen accounts`)

    def to_json(self) -> dict[str, object]:
        return {
            "account": self.account.label,
            "fingerprint": self.account.fingerprint,
            "state": self.state.value,
            "until": self.until,
            "since": self.since,
            "reason": self.reason,
            "in_flight": self.in_flight,
            "calls_today": self.calls_today,
            "transient_streak": self.streak,
            "credits": self.credits,
        }


# ARGV: prefix, token, ttl ms, cap, daily cap, day, now ms (the deployment's clock: `Spend.clock`), then the
# fingerprints in order.
# Returns {'ok', fp} with the call's place taken, {'busy'} when every usable account is at its cap, {'none'}
# when no account is usable. A set-aside account whose time has come is healthy again (its streak stays, so a
# cooled account that fails once more cools longer).
_TAKE = """
local ACCOUNT_CALLS_TTL = {ttl}
local now = tonumber(ARGV[7])
local prefix, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cap, daily, calls = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[1] .. 'account-calls:' .. ARGV[6]
local best, best_load, busy = nil, nil, 0
for i = 8, #ARGV do
  local fp = ARGV[i]
  local info = prefix .. 'account:' .. fp
  local usable = true
  if redis.call('hexists', info, 'state') == 1 then
    local back = tonumber(redis.call('hget', info, 'until') or '0')
    if back > 0 and back <= now then
      redis.call('hdel', info, 'state', 'until', 'since', 'reason')
    else
      usable = false
    end
  end
  if usable and daily > 0 and tonumber(redis.call('hget', calls, fp) or '0') >= daily then
    usable = false
  end
  if usable then
    local inflight = info .. ':inflight'
    redis.call('zremrangebyscore', inflight, '-inf', now)
    local load = redis.call('zcard', inflight)
    if cap > 0 and load >= cap then
      busy = busy + 1
    elseif best == nil or load < best_load then
      best, best_load = fp, load
    end
  end
end
if best == nil then
  if busy > 0 then return {'busy'} end
  return {'none'}
end
local inflight = prefix .. 'account:' .. best .. ':inflight'
redis.call('zadd', inflight, now + ttl, token)
redis.call('pexpire', inflight, ttl)
redis.call('hincrby', calls, best, 1)
redis.call('expire', calls, ACCOUNT_CALLS_TTL)
return {'ok', best}
""".replace("{ttl}", str(ACCOUNT_CALLS_TTL))

# KEYS: the account's hash; ARGV: state, until ms (0: until the key changes), reason, now ms.
# Sets it aside unless it already is (the first reason and time stay: several calls may fail at once).
_SET_ASIDE = """
if redis.call('hexists', KEYS[1], 'state') == 1 then return 0 end
redis.call('hset', KEYS[1], 'state', ARGV[1], 'until', ARGV[2], 'since', ARGV[4], 'reason', ARGV[3])
return 1
"""


class AccountPool:
    """The accounts of one deployment: which one takes a call, and what a call's failure does to it."""

    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        accounts: list[Account],
        spend: Spend,
        *,
        concurrency: int = 0,
        daily_limit: int = 0,
        call_ttl: float = 3600.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.accounts = accounts
        self._by_fingerprint = {account.fingerprint: account for account in accounts}
        self._spend = spend
        self.concurrency = concurrency
        self.daily_limit = daily_limit
        self._call_ttl_ms = int(call_ttl * 1000)
        self._take = redis.register_script(_TAKE)
        self._set_aside = redis.register_script(_SET_ASIDE)

    def _info(self, account: Account) -> str:
        return f"{self._keys.prefix}account:{account.fingerprint}"

    def _now_ms(self) -> int:
        return int(self._spend.clock() * 1000)

    def claim_marker(self, account: Account) -> str:
        """Set once a day per account by the worker that claims its free credits (JIMENG_CLAIM_DAILY)."""
        return f"{self._keys.prefix}account-claim:{self._spend.day().isoformat()}:{account.fingerprint}"

    def _calls(self) -> str:
        return f"{self._keys.prefix}account-calls:{self._spend.day().isoformat()}"

    async def take(self, token: str, wait: float) -> Account | None:
        """An account for the call of run `token`, its place in flight taken; None when every usable account
        stayed at its cap for `wait` seconds. NoUsableAccount when no account is usable at all (`unavailable`
        then says why, for a caller that pauses on it: one falling back to another provider needn't ask)."""
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            args: list[str | int] = [
                self._keys.prefix,
                token,
                self._call_ttl_ms,
                self.concurrency,
                self.daily_limit,
                self._spend.day().isoformat(),
                self._now_ms(),
                *(account.fingerprint for account in self.accounts),
            ]
            answer = [part.decode() if isinstance(part, bytes) else str(part) for part in await self._take(args=args)]
            if answer[0] == "ok":
                return self._by_fingerprint[answer[1]]
            if answer[0] == "none":
                raise NoUsableAccount
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.1)

    async def release(self, account: Account, token: str, *, images: bool) -> None:
        """The call of run `token` ended; with `images`, the account's streak of transient failures ends too."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(f"{self._info(account)}:inflight", token)
            if images:
                pipe.hdel(self._info(account), "streak")
            await pipe.execute()

    async def failed(self, account: Account, exc: JimengError) -> AccountState | None:
        """Judge a failed call for its account; the state it was set aside in, or None when it stays usable."""
        if exc.kind is FailureKind.ACCOUNT:
            if exc.code == EXPIRED_CODE:
                state, until = AccountState.EXPIRED, 0.0
            elif exc.code == NO_CREDITS_CODE:
                state, until = AccountState.NO_CREDITS, self._spend.day_end(self._spend.day())
            else:
                state, until = AccountState.REFUSED, self._spend.clock() + REFUSED_FOR
            args = [state.value, int(until * 1000), exc.message, self._now_ms()]
            await self._set_aside(keys=[self._info(account)], args=args)
            return state
        if exc.kind is FailureKind.TRANSIENT and exc.reached and not exc.moderated:
            streak = int(await self._redis.hincrby(self._info(account), "streak", 1))  # type: ignore[misc]
            # Never the last usable account: cooling it would only pause the queue, which the failure streak
            # (QUEUE_MAX_FAILED) already decides for failures that aren't an account's.
            if streak >= COOL_AFTER and await self._others_usable(account):
                seconds = min(COOL_MAX, COOL_FIRST * 2 ** (streak - COOL_AFTER))
                reason = f"{streak} transient failures in a row (the last: {exc.message}); cooling {seconds:.0f} s"
                until = self._now_ms() + int(seconds * 1000)
                args = [AccountState.COOLING.value, until, reason, self._now_ms()]
                await self._set_aside(keys=[self._info(account)], args=args)
                return AccountState.COOLING
        return None

    async def reinstate(self, *accounts: Account) -> None:
        """These accounts (default: every one) usable again (`imagegen resume`, credits seen back): the next
        call tells whether they really are."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for account in accounts or self.accounts:
                pipe.hdel(self._info(account), "state", "until", "since", "reason", "streak")
            await pipe.execute()

    async def health(self) -> list[AccountHealth]:
        """Every account's state, in the order of JIMENG_API_KEY."""
        now_ms = self._now_ms()
        async with self._redis.pipeline(transaction=False) as pipe:
            for account in self.accounts:
                pipe.hgetall(self._info(account))
                pipe.zcount(f"{self._info(account)}:inflight", now_ms, "+inf")
            pipe.hgetall(self._calls())
            answers = await pipe.execute()
        calls = {key.decode(): int(value) for key, value in answers[-1].items()}
        found = []
        for position, account in enumerate(self.accounts):
            raw = {key.decode(): value.decode() for key, value in answers[2 * position].items()}
            in_flight = int(answers[2 * position + 1])
            until_ms = int(raw.get("until") or 0)
            state = AccountState(raw["state"]) if "state" in raw and (not until_ms or until_ms > now_ms) else None
            today = calls.get(account.fingerprint, 0)
            if state is None:
                if self.daily_limit and today >= self.daily_limit:
                    state = AccountState.DAILY_CAP
                elif self.concurrency and in_flight >= self.concurrency:
                    state = AccountState.BUSY
                else:
                    state = AccountState.HEALTHY
            set_aside = "state" in raw and state is not AccountState.HEALTHY
            found.append(
                AccountHealth(
                    account,
                    state,
                    until_ms / 1000 if set_aside and until_ms else None,
                    int(raw["since"]) / 1000 if set_aside and raw.get("since") else None,
                    raw.get("reason", "") if set_aside else "",
                    in_flight,
                    today,
                    int(raw.get("streak") or 0),
                )
            )
        return found

    async def _others_usable(self, account: Account) -> bool:
        usable = (AccountState.HEALTHY, AccountState.BUSY)
        return any(h.state in usable for h in await self.health() if h.account != account)

    async def usable(self) -> bool:
        """Whether any account could take a call now (or once its cap of calls at once frees)."""
        return any(h.state in (AccountState.HEALTHY, AccountState.BUSY) for h in await self.health())

    async def unavailable(self) -> AccountsUnavailable:
        """The error that pauses the queue: every account's state in one line, and when the first comes back."""
        health = await self.health()
        returns = [h.until for h in health if h.until]
        if self.daily_limit:
            returns.append(self._spend.day_end(self._spend.day()))
        parts = [f"{h.account.label} {h.state.value}{_until(h)}{f' ({h.reason})' if h.reason else ''}" for h in health]
        return AccountsUnavailable(
            f"no jimeng account can take a call: {'; '.join(parts)}", until=min(returns) if returns else 0.0
        )


def account_pool(redis: Redis, keys: RedisKeys, settings: Settings, spend: Spend) -> AccountPool:
    """The pool of JIMENG_API_KEY's accounts with the settings' caps; a call's place in flight outlives its
    longest possible call (a killed worker's place expires after that)."""
    return AccountPool(
        redis,
        keys,
        accounts_of(settings.jimeng_keys()),
        spend,
        concurrency=settings.jimeng_account_concurrency,
        daily_limit=settings.jimeng_account_daily_limit,
        call_ttl=settings.jimeng_timeout_seconds + 60,
    )


def _until(health: AccountHealth) -> str:
    if health.state is AccountState.EXPIRED:
        return ": replace its session id in JIMENG_API_KEY"
    if health.until:
        return f" until {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(health.until))}"
    return ""
