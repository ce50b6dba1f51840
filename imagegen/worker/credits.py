"""A worker's watch over its jimeng accounts' credits, through the proxy's free routes.

Every CHECK_EVERY seconds:
- with JIMENG_CLAIM_DAILY, the day's free credits of each live account are claimed (`/token/receive`), once a
  day per account across every worker (a marker in Redis, set by whichever worker claims first);
- each account set aside `out of credits` is asked for its credits (`/token/points`): credits back (bought,
  or claimed) return it to service before the day turns, and lift an accounts pause;
- an account back in service since the last round (its day turned, its cooling ended) is logged once: the
  setting aside itself is logged by the call that caused it.
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
        self._aside: set[str] = set()  # fingerprints of the accounts set aside at the last round

    async def step(self) -> None:
        health = await self._pool.health()
        aside = {entry.account.fingerprint for entry in health if entry.until or entry.state is AccountState.EXPIRED}
        for entry in health:
            if entry.account.fingerprint in self._aside - aside:
                logger.info("jimeng {}: back in service ({})", entry.account.label, entry.state.value)
        self._aside = aside
        back: list[Account] = []
        for entry in health:
            if entry.state is AccountState.EXPIRED:
                continue
            if self._claim_daily and await self._claim(entry.account) and entry.state is AccountState.NO_CREDITS:
                back.append(entry.account)
            elif entry.state is AccountState.NO_CREDITS and (await self._routes.points(entry.account.key) or 0) > 0:
                logger.info("jimeng {}: credits are back", entry.account.label)
                back.append(entry.account)
        if back:
            await self._pool.reinstate(*back)
            if await self._state.lift_limit_pause(self._clock(), accounts_usable=True):
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
