"""A worker's watch over its jimeng accounts' credits, through the proxy's free routes.

Every CHECK_EVERY seconds:
- with JIMENG_CLAIM_DAILY, the day's free credits of each live account are claimed (`/token/receive`), once a
  day per account across every worker (a marker in Redis, set by whichever worker claims first);
- each live account is asked for its credits (`/token/points`), kept as its last known credits (status, the
  API and the dashboard show them); an account set aside `out of credits` whose credits are back (bought, or
  claimed) returns to service before the day turns, and lifts an accounts pause;
- each change of an account's standing since it was last told is logged once across every worker
  (`AccountPool.announce`): a return to service (credits back, its day turned, its cooling or refusal over, a
  resume), a key replaced in JIMENG_API_KEY, and a setting aside (which the call that caused it has most
  likely told already).
"""

from __future__ import annotations

from loguru import logger
from redis.asyncio import Redis

from imagegen.clients.jimeng import AccountRoutes
from imagegen.queue.accounts import CLAIM_MARKER_TTL, Account, AccountPool, AccountState
from imagegen.queue.spend import Clock
from imagegen.queue.state import QueueState

from .periodic import Periodic

CHECK_EVERY = 300.0


class CreditWatch(Periodic):
    name = "jimeng credit watch"

    def __init__(
        self,
        redis: Redis,
        pool: AccountPool,
        routes: AccountRoutes,
        state: QueueState,
        clock: Clock,
        *,
        claim_daily: bool,
        interval: float = CHECK_EVERY,
    ) -> None:
        super().__init__(interval)
        self._redis = redis
        self._pool = pool
        self._routes = routes
        self._state = state
        self._clock = clock
        self._claim_daily = claim_daily

    async def step(self) -> None:
        back: dict[str, str] = {}  # fingerprint: what brought the account back
        known: dict[str, int] = {}  # fingerprint: credits the proxy reports
        for entry in await self._pool.health():
            if entry.state is AccountState.EXPIRED:
                continue
            fingerprint = entry.account.fingerprint
            claimed = self._claim_daily and await self._claim(entry.account)
            points = await self._routes.points(entry.account.key)
            if points is not None:
                known[fingerprint] = points
            if entry.state is AccountState.NO_CREDITS and claimed:
                back[fingerprint] = "the day's free credits claimed"
            elif entry.state is AccountState.NO_CREDITS and (points or 0) > 0:
                back[fingerprint] = "its credits are back"
        await self._pool.note_credits(known)
        if back:
            await self._pool.reinstate(*(a for a in self._pool.accounts if a.fingerprint in back))
        for level, line in await self._pool.announce(back):
            logger.log(level, line)
        if back and await self._state.lift_limit_pause(self._clock(), accounts_usable=True):
            logger.info("queue resumed: a jimeng account has credits again")

    async def _claim(self, account: Account) -> bool:
        """Claim the day's free credits once a day; whether they were claimed now."""
        marker = self._pool.claim_marker(account)
        if not await self._redis.set(marker, b"1", nx=True, ex=CLAIM_MARKER_TTL):
            return False
        claimed = await self._routes.receive(account.key)
        if claimed is None:
            await self._redis.delete(marker)  # the proxy did not answer: the next round tries again
            logger.warning("jimeng {}: claiming the day's free credits got no answer; trying again", account.label)
            return False
        if claimed:
            logger.info("jimeng {}: claimed the day's free credits", account.label)
        else:
            logger.warning("jimeng {}: the proxy refused to claim the day's free credits", account.label)
        return claimed
