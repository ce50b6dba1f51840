"""The paid call: where it goes, what it may cost, and what it did cost.

`PaidCalls.make` is the one way a pipeline pays for images. It makes the last checks before paying (a pause
set since the job started, the job's time left, its lease), takes the call's permit and its place under the
daily limit of the first provider in IMAGE_PROVIDERS with room (`permits`), picks a usable jimeng account or
Ark (`accounts`), calls, and judges a failure: an account's error sets that account aside and sends the
prompt to another account or provider without spending an attempt; with none left the queue pauses until one
comes back. A call that delivered images is counted by `count_images` once its images are remembered, and
its account's place in flight is given back by `release_account` once its generation slot is free.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from loguru import logger

from imagegen.choices import Choices
from imagegen.clients.ark import LINK_LIFETIME as ARK_LINK_LIFETIME
from imagegen.clients.ark import PROVIDER as ARK_PROVIDER
from imagegen.clients.ark import ArkClient
from imagegen.clients.download import inline_source
from imagegen.clients.jimeng import JimengClient
from imagegen.clients.provider import ImageLink
from imagegen.errors import (
    AccountsUnavailable,
    DailyLimitReached,
    FailureKind,
    JimengError,
    JobInterrupted,
    ProviderError,
    QueuePaused,
)
from imagegen.ops.metrics import WorkerMetrics
from imagegen.queue.accounts import Account, AccountPool, NoUsableAccount
from imagegen.queue.ledger import GenerationRecord
from imagegen.queue.permits import CallPermits
from imagegen.queue.spend import CallOutcome, Reservation, call_outcome
from imagegen.queue.state import PauseGate
from imagegen.settings import Settings

from .runs import JobRun, Phase


@dataclass(frozen=True)
class PaidCall:
    """A call that delivered: its images, the seconds it took, the reservation it is counted under, and the
    jimeng account it went to (None: Ark)."""

    generation: GenerationRecord
    elapsed: float
    reservation: Reservation
    account: Account | None


class PaidCalls:
    """The providers of IMAGE_PROVIDERS behind one call; one per worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        jimeng: JimengClient,
        ark: ArkClient | None,
        accounts: AccountPool,
        permits: CallPermits,
        gate: PauseGate,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.jimeng = jimeng
        self.ark = ark  # with `ark` in IMAGE_PROVIDERS
        self.accounts = accounts
        self.permits = permits
        self.gate = gate
        self.metrics = metrics

    async def make(self, run: JobRun, prompt: str, negative: str, choices: Choices) -> PaidCall:
        """The last checks and the paid call, inside a generation slot: its images, the seconds it took and its
        reservation, which the caller settles (`count_images`, `release_account`; a failed call's is settled
        here).

        Few Redis round trips here (the pause is cached, the lease renewed recently): the slot was just freed
        by a call that returned, and the next call should start at once. One script takes the call's permit
        and its place under the daily limit when either is set, and one round trip after the call gives the
        permit back and counts the call (`spend`). The remembered generation was read after the lease was
        taken; while the lease stays ours, no other run can have paid since."""
        prompt_id = run.prompt_id
        # The last look before paying: a pause set since the job started stops it here.
        paused = await self.gate.current()
        if paused is not None:
            raise QueuePaused(f"waiting: queue paused ({paused.reason})")
        needed = self.settings.call_timeout + self.settings.download_timeout
        if run.remaining() < needed:
            raise JobInterrupted(
                f"only {run.remaining():.0f} s of this job's time left, too little for a paid call and its "
                f"images ({needed:.0f} s); queued again"
            )
        await run.lease.ensure()
        try:
            reservation = await self.permits.take(
                run.lease.token, run.remaining() - needed, prompt_id, self.settings.providers()
            )
        except DailyLimitReached as exc:
            info = await self.gate.close(exc.message, source="limit", until=exc.until)
            raise QueuePaused(f"waiting: queue paused ({info.reason})") from None
        if reservation is None:
            raise JobInterrupted(
                f"no jimeng call could start in time (JIMENG_MAX_INFLIGHT={self.permits.cap}, "
                f"JIMENG_RATE_LIMIT={self.permits.rate}); queued again"
            )
        outcome: CallOutcome | None = None  # no call made (yet): the reservation is released
        succeeded = False
        account: Account | None = None
        try:
            reservation, account = await self._choose(run, run.remaining() - needed, reservation)
            run.check_stop()
            # No await between the stop check and the call: a stop either sends this run back or waits for it.
            run.enter(Phase.GENERATING)
            t0 = time.monotonic()
            # From here the request may reach the API: even a cancelled call counts, as failed (see `spend`).
            outcome = CallOutcome.FAILED
            try:
                generation = await self._ask(account, prompt, negative, choices)
            except ProviderError as exc:
                outcome = call_outcome(exc)
                self.metrics.call_ended(exc, reservation.provider, reservation.account)
                if account is not None and isinstance(exc, JimengError):
                    await self._judge_account(account, exc)
                raise
            self.metrics.call_ended(None, reservation.provider, reservation.account)
            elapsed = time.monotonic() - t0
            succeeded = True
        finally:
            # A call with images is counted, and its account's place given back, by the caller once its
            # generation slot is free.
            if not succeeded:
                if account is not None:
                    await asyncio.shield(self.accounts.release(account, run.lease.token, images=False))
                await asyncio.shield(self.permits.finish(reservation, outcome))
        return PaidCall(generation, elapsed, reservation, account)

    async def _choose(self, run: JobRun, wait: float, reservation: Reservation) -> tuple[Reservation, Account | None]:
        """Where the call goes: the provider `reservation` was taken under (the first in IMAGE_PROVIDERS' order
        under its daily limit) and for jimeng a usable account, its place in flight taken (None for Ark). With no
        jimeng account left, the reservation moves on to the next provider; the reservation returned names the
        account the call is counted under."""
        providers = self.settings.providers()
        while reservation.provider != ARK_PROVIDER:
            try:
                account = await self.accounts.take(run.lease.token, wait)
            except NoUsableAccount:
                rest = providers[providers.index(reservation.provider) + 1 :]
                if not rest:
                    raise await self.accounts.unavailable() from None
                try:
                    reservation = await self.permits.move(reservation, rest)
                except DailyLimitReached as exc:
                    # No account, and the rest at their limits: back with an account or the next day.
                    accounts = await self.accounts.unavailable()
                    until = min(t for t in (accounts.until, exc.until) if t)
                    raise AccountsUnavailable(f"{accounts.message}; {exc.message}", until=until) from None
                continue
            if account is None:
                raise JobInterrupted(
                    "every jimeng account stayed at "
                    f"JIMENG_ACCOUNT_CONCURRENCY={self.accounts.concurrency}; queued again"
                )
            return replace(reservation, account=account.fingerprint), account
        return replace(reservation, account=self.ark.fingerprint if self.ark is not None else ""), None

    async def _ask(self, account: Account | None, prompt: str, negative: str, choices: Choices) -> GenerationRecord:
        """The paid call itself, to the account's jimeng or to Ark; what it delivered, to be remembered."""
        if account is not None:
            found = await self.jimeng.generate(prompt, negative, choices, key=account.key)
            return GenerationRecord(created=found.created, urls=found.urls)
        assert self.ark is not None
        result = await self.ark.generate(prompt, negative, choices)
        urls = [image.url if isinstance(image, ImageLink) else inline_source(image.b64) for image in result.images]
        return GenerationRecord(
            created=time.time(),
            urls=urls,
            provider=result.provider,
            lifetime=ARK_LINK_LIFETIME,
            blocked=[f"image {failure.index + 1}: {failure.code} ({failure.message})" for failure in result.failures],
        )

    async def _judge_account(self, account: Account, exc: JimengError) -> None:
        """After a failed call: set its account aside when the failure is the account's. An account error with
        another account still usable sends the prompt back at once, without an attempt, to be called there;
        with none left the queue pauses until the first comes back (`AccountsUnavailable`)."""
        pool = self.accounts
        state = await pool.failed(account, exc)
        if state is None:
            return
        # Told once across every worker, though several calls may have met the same dead account at once.
        for level, line in await pool.announce():
            logger.log(level, line)
        if exc.kind is not FailureKind.ACCOUNT:
            return  # cooling after transient failures: this prompt's attempt was a real one
        if await pool.usable():
            raise JobInterrupted(f"jimeng {account.label} is {state.value}; another account takes the prompt") from exc
        if self.ark is not None:
            raise JobInterrupted(
                f"jimeng {account.label} is {state.value}, the last account: Ark takes the prompt"
            ) from exc
        raise await pool.unavailable() from exc

    async def count_images(self, call: PaidCall) -> None:
        """Count a call that delivered images (its place under the limit was held until now)."""
        await self.permits.finish(call.reservation, CallOutcome.IMAGES)

    async def release_account(self, call: PaidCall, token: str) -> None:
        """Give the call's place in flight back to its jimeng account."""
        if call.account is not None:
            await self.accounts.release(call.account, token, images=True)
