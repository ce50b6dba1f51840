"""One prompt's way from a PocketBase record to hosted images.

read record -> mark processing -> generate (or reuse a remembered generation) -> download + upload each
image (skipping those already stored) -> remove leftovers of earlier runs -> patch the record done.

Every step against PocketBase or the bucket waits out an outage in place (`outages`); a download that fails
transiently is tried again in place (DOWNLOAD_TRIES) before it costs the job an attempt. The paid call and
every step that commits a result (storing an image, removing leftovers, marking the record done) happen only
while this run holds the prompt's lease. Errors propagate as ImagegenError; the job runner decides between
retry, failure and pause.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from loguru import logger

from imagegen.choices import Choices
from imagegen.clients.ark import LINK_LIFETIME as ARK_LINK_LIFETIME
from imagegen.clients.ark import PROVIDER as ARK_PROVIDER
from imagegen.clients.ark import ArkClient
from imagegen.clients.download import inline_source
from imagegen.clients.jimeng import JimengClient
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.provider import ImageLink
from imagegen.clients.storage import Storage
from imagegen.clients.transfer import store_image
from imagegen.errors import (
    DailyLimitReached,
    DownloadError,
    FailureKind,
    JimengError,
    JobInterrupted,
    LinkRefusedError,
    PromptRejected,
    ProviderError,
    QueuePaused,
    RecordNotFound,
)
from imagegen.models import PromptRecord, RecordStatus, StoredImage
from imagegen.ops.metrics import WorkerMetrics
from imagegen.queue.accounts import Account, AccountPool, NoUsableAccount
from imagegen.queue.ledger import GenerationLedger, GenerationRecord
from imagegen.queue.permits import CallPermits
from imagegen.queue.spend import CallOutcome, Reservation, call_outcome
from imagegen.queue.stages import Stage, StageClock
from imagegen.queue.state import PauseGate
from imagegen.settings import Settings

from .outages import POCKETBASE, STORAGE, Outages
from .runs import JobRun, Phase
from .slots import Slots


@dataclass
class PipelineResult:
    """What one run of the pipeline did, for the job result and the log."""

    prompt_id: str
    images: list[StoredImage] = field(default_factory=list)
    generated: bool = False
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # images the call refused (moderation), in words


@dataclass(frozen=True)
class Services:
    """The long-lived clients a pipeline works with, created once per process."""

    settings: Settings
    http: aiohttp.ClientSession
    pocketbase: PocketBaseClient
    jimeng: JimengClient
    accounts: AccountPool
    ark: ArkClient | None  # with `ark` in IMAGE_PROVIDERS
    storage: Storage
    ledger: GenerationLedger
    gate: PauseGate
    outages: Outages
    permits: CallPermits
    slots: Slots
    metrics: WorkerMetrics


def check_prompt(record: PromptRecord, max_chars: int) -> str:
    prompt = record.prompt.strip()
    if not prompt:
        raise PromptRejected(f"record {record.id} has an empty prompt; write one in its prompt field")
    if len(prompt) > max_chars:
        raise PromptRejected(
            f"record {record.id} has a {len(prompt)}-character prompt, over PROMPT_MAX_CHARS={max_chars}; shorten it"
        )
    return prompt


def check_choices(record: PromptRecord, settings: Settings) -> Choices:
    """The record's model, ratio and resolution, each empty one taken from its JIMENG_* setting; a value the
    API would not take fails the record (PromptRejected, permanent) before anything is paid."""
    fields = {
        "model": settings.pocketbase_field_model,
        "ratio": settings.pocketbase_field_ratio,
        "resolution": settings.pocketbase_field_resolution,
    }

    def describe(name: str, value: str, allowed: str) -> str:
        return (
            f"record {record.id} has {fields[name]}={value!r}, which {allowed}; "
            f"fix the field or empty it to use JIMENG_{name.upper()}"
        )

    return settings.default_choices.overridden(record.choices_given(), describe)


class Pipeline:
    """Runs prompts through generation and hosting; one instance per worker process."""

    def __init__(self, services: Services) -> None:
        self._s = services

    async def run(self, run: JobRun, *, force: bool = False) -> PipelineResult:
        """Bring one record to `done`; raises ImagegenError (classified) when a step fails."""
        s, prompt_id = self._s, run.prompt_id
        result = PipelineResult(prompt_id)
        log = logger.bind(prompt_id=prompt_id)
        started = time.monotonic()
        record = await s.outages.call(POCKETBASE, lambda: s.pocketbase.get_record(prompt_id), run)
        if record.is_done and not force:
            log.info("already done, nothing to generate ({})", record.image_url)
            result.skipped = True
            return result
        prompt = check_prompt(record, s.settings.prompt_max_chars)
        choices = check_choices(record, s.settings)
        # Every run marks the record `processing` before it can store anything, and nothing of ours ever marks
        # a record pending again: a pending record without images or a note, on a first attempt, has no objects
        # of an earlier run in the bucket, and listing them can be skipped.
        untouched = (
            not force
            and run.attempt <= 1
            and record.status == RecordStatus.PENDING.value
            and not (record.error or record.images or record.image_url)
        )
        await run.lease.ensure()
        await s.outages.call(POCKETBASE, lambda: s.pocketbase.set_status(prompt_id, RecordStatus.PROCESSING), run)
        generation = await s.ledger.load(prompt_id)
        if generation is not None:
            untouched = False
            run.generation_saved = True
            run.enter(Phase.STORING)
            log.info(
                "reusing the generation of an earlier attempt ({} images, {} stored, links {:.0f} s old)",
                len(generation.urls),
                len(generation.stored),
                generation.age(),
            )
        else:
            generation = await self._generate(run, prompt, record.negative_prompt, choices, result)
        regenerated = False
        while True:
            try:
                await self._store_all(run, generation, result)
                break
            except LinkRefusedError as exc:
                lifetime, named = link_lifetime(generation, s.settings)
                age = generation.age()
                if age <= lifetime or regenerated:
                    raise DownloadError(
                        f"{exc.message} although the generation is only {age:.0f} s old (links live "
                        f"{named}): something between this host and the image host refuses it, e.g. a CDN or "
                        "firewall rule",
                        status=exc.status,
                    ) from None
                # Expired for real: paying again is the only way, and at most once per job.
                log.warning("image links are {:.0f} s old, past {}; generating again", age, named)
                await s.ledger.forget(prompt_id)
                run.generation_saved = False
                run.enter(Phase.PREPARING)
                generation = await self._generate(run, prompt, record.negative_prompt, choices, result)
                regenerated = True
                untouched = False
        run.enter(Phase.FINISHING)
        await self._finish(run, result, leftovers_possible=not untouched)
        result.timings["total"] = time.monotonic() - started
        return result

    async def _generate(
        self, run: JobRun, prompt: str, negative: str, choices: Choices, result: PipelineResult
    ) -> GenerationRecord:
        s, prompt_id = self._s, run.prompt_id
        run.enter(Phase.READY)
        await s.slots.take_call_slot(run)
        # A failure keeps the slot until the job's outcome is decided (see `slots`).
        generation, elapsed, reservation, account = await self._call(run, prompt, negative, choices)
        s.slots.free_call_slot(run)
        # The slot is free the moment the call returned: the next prompt's call starts while this one stores,
        # and the call is counted meanwhile (its place under the limit stays reserved until then).
        s.slots.hand_back(run)
        run.set_phase(Phase.STORING)
        result.generated = True
        result.timings["generate"] = result.timings.get("generate", 0.0) + elapsed
        blocked = f", {len(generation.blocked)} blocked" if generation.blocked else ""
        logger.bind(prompt_id=prompt_id).info(
            "generated {} images with {} in {:.1f}s{}", len(generation.urls), generation.provider, elapsed, blocked
        )
        try:
            # Remembered first: should Redis fail the count, the job's next run still reuses what was paid for.
            await s.ledger.save(prompt_id, generation)
            run.generation_saved = True
            await asyncio.shield(s.permits.finish(reservation, CallOutcome.IMAGES))
        finally:
            if account is not None:
                await asyncio.shield(s.accounts.release(account, run.lease.token, images=True))
        return generation

    async def _call(
        self, run: JobRun, prompt: str, negative: str, choices: Choices
    ) -> tuple[GenerationRecord, float, Reservation, Account | None]:
        """The last checks and the paid call, inside a generation slot: its images, the seconds it took and its
        reservation, which the caller settles (a failed call's is settled here).

        Few Redis round trips here (the pause is cached, the lease renewed recently): the slot was just freed
        by a call that returned, and the next call should start at once. One script takes the call's permit
        and its place under the daily limit when either is set, and one round trip after the call gives the
        permit back and counts the call (`spend`). The remembered generation was read after the lease was
        taken; while the lease stays ours, no other run can have paid since."""
        s, prompt_id = self._s, run.prompt_id
        # The last look before paying: a pause set since the job started stops it here.
        paused = await s.gate.current()
        if paused is not None:
            raise QueuePaused(f"waiting: queue paused ({paused.reason})")
        needed = s.settings.call_timeout + s.settings.download_timeout
        if run.remaining() < needed:
            raise JobInterrupted(
                f"only {run.remaining():.0f} s of this job's time left, too little for a paid call and its "
                f"images ({needed:.0f} s); queued again"
            )
        await run.lease.ensure()
        try:
            reservation = await s.permits.take(run.lease.token, run.remaining() - needed, prompt_id)
        except DailyLimitReached as exc:
            info = await s.gate.close(exc.message, source="limit", until=exc.until)
            raise QueuePaused(f"waiting: queue paused ({info.reason})") from None
        if reservation is None:
            raise JobInterrupted(
                f"no jimeng call could start in time (JIMENG_MAX_INFLIGHT={s.permits.cap}, "
                f"JIMENG_RATE_LIMIT={s.permits.rate}); queued again"
            )
        outcome: CallOutcome | None = None  # no call made (yet): the reservation is released
        succeeded = False
        account: Account | None = None
        try:
            account = await self._choose(run, run.remaining() - needed)
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
                s.metrics.call_ended(exc, *provider_labels(account))
                if account is not None and isinstance(exc, JimengError):
                    await self._judge_account(account, exc)
                raise
            s.metrics.call_ended(None, *provider_labels(account))
            elapsed = time.monotonic() - t0
            succeeded = True
        finally:
            # A call with images is counted, and its account's place given back, by the caller once its
            # generation slot is free.
            if not succeeded:
                if account is not None:
                    await asyncio.shield(s.accounts.release(account, run.lease.token, images=False))
                await asyncio.shield(s.permits.finish(reservation, outcome))
        return generation, elapsed, reservation, account

    async def _choose(self, run: JobRun, wait: float) -> Account | None:
        """Where the call goes, in IMAGE_PROVIDERS' order: a jimeng account (its place in flight taken), or
        None for Ark. With no jimeng account left and Ark behind it, the call goes to Ark."""
        s = self._s
        for name in s.settings.providers():
            if name == ARK_PROVIDER:
                return None
            try:
                account = await s.accounts.take(run.lease.token, wait)
            except NoUsableAccount:
                if s.ark is None:
                    raise await s.accounts.unavailable() from None
                continue
            if account is None:
                raise JobInterrupted(
                    f"every jimeng account stayed at JIMENG_ACCOUNT_CONCURRENCY={s.accounts.concurrency}; queued again"
                )
            return account
        raise AssertionError("IMAGE_PROVIDERS is never empty")

    async def _ask(self, account: Account | None, prompt: str, negative: str, choices: Choices) -> GenerationRecord:
        """The paid call itself, to the account's jimeng or to Ark; what it delivered, to be remembered."""
        s = self._s
        if account is not None:
            found = await s.jimeng.generate(prompt, negative, choices, key=account.key)
            return GenerationRecord(created=found.created, urls=found.urls)
        assert s.ark is not None
        result = await s.ark.generate(prompt, negative, choices)
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
        pool = self._s.accounts
        state = await pool.failed(account, exc)
        if state is None:
            return
        logger.warning("jimeng {} set aside: {} ({})", account.label, state.value, exc.message)
        if exc.kind is not FailureKind.ACCOUNT:
            return  # cooling after transient failures: this prompt's attempt was a real one
        if await pool.usable():
            raise JobInterrupted(f"jimeng {account.label} is {state.value}; another account takes the prompt") from exc
        if self._s.ark is not None:
            raise JobInterrupted(
                f"jimeng {account.label} is {state.value}, the last account: Ark takes the prompt"
            ) from exc
        raise await pool.unavailable() from exc

    async def _store_all(self, run: JobRun, generation: GenerationRecord, result: PipelineResult) -> None:
        s, prompt_id = self._s, run.prompt_id
        result.blocked = generation.blocked
        t0 = time.monotonic()
        for index, url in enumerate(generation.urls):
            if index in generation.stored:
                continue
            await run.lease.ensure()

            async def store(index: int = index, url: str = url) -> StoredImage:
                return await self._store_one(prompt_id, index, url, run.clock)

            generation.stored[index] = await s.outages.call(STORAGE, store, run)
            await s.ledger.save(prompt_id, generation)
            image = generation.stored[index]
            logger.bind(prompt_id=prompt_id).debug(
                "stored image {} as {} ({} bytes, {})", index, image.key, image.size, image.content_type
            )
        result.images = [generation.stored[i] for i in range(len(generation.urls))]
        result.timings["store"] = result.timings.get("store", 0.0) + time.monotonic() - t0

    async def _store_one(self, prompt_id: str, index: int, url: str, clock: StageClock) -> StoredImage:
        """Download one image into the bucket, trying a transient download failure again in place."""
        s = self._s
        image = await store_image(
            s.http,
            s.storage,
            s.settings,
            url,
            lambda extension: s.storage.object_key(prompt_id, index, extension),
            slot=s.slots.transfer,
            log_id=prompt_id,
            index=index,
            on_download=lambda: clock.enter(Stage.DOWNLOADING),
            on_upload=lambda: clock.enter(Stage.UPLOADING),
        )
        s.metrics.stored(image.size)
        return image

    async def _finish(self, run: JobRun, result: PipelineResult, *, leftovers_possible: bool) -> None:
        s, prompt_id = self._s, run.prompt_id
        log = logger.bind(prompt_id=prompt_id)
        keys = [image.key for image in result.images]
        if leftovers_possible:
            await run.lease.ensure()
            removed = await s.outages.call(STORAGE, lambda: s.storage.remove_others(prompt_id, keys), run)
            if removed:
                log.info("removed {} leftover objects of an earlier run", len(removed))
        t0 = time.monotonic()
        await run.lease.ensure()
        urls = [image.public_url for image in result.images]
        try:
            await s.outages.call(POCKETBASE, lambda: s.pocketbase.set_done(prompt_id, urls, blocked_note(result)), run)
        except RecordNotFound:
            # Deleted while we worked: its images would be orphans in the bucket.
            await run.lease.ensure()
            await s.outages.call(STORAGE, lambda: s.storage.remove_others(prompt_id, []), run)
            await s.ledger.forget(prompt_id)
            log.warning("record was deleted during the job; its images were removed")
            raise
        run.committed = True
        await s.ledger.forget(prompt_id)
        result.timings["patch"] = time.monotonic() - t0


def link_lifetime(generation: GenerationRecord, settings: Settings) -> tuple[float, str]:
    """How long a generation's links live, and the words that say where that comes from."""
    if generation.lifetime is not None:
        return generation.lifetime, f"{generation.lifetime:.0f} s ({generation.provider}'s links)"
    return float(settings.jimeng_link_lifetime), f"JIMENG_LINK_LIFETIME={settings.jimeng_link_lifetime} s"


def blocked_note(result: PipelineResult) -> str:
    """What a done record says when its call refused some images (a partial success), else nothing."""
    if not result.blocked:
        return ""
    total = len(result.images) + len(result.blocked)
    return f"{len(result.blocked)} of {total} images blocked by content moderation: {'; '.join(result.blocked)}"


def provider_labels(account: Account | None) -> tuple[str, str]:
    """The metric labels of a call: its provider, and the fingerprint of its jimeng account (none for Ark)."""
    return ("jimeng", account.fingerprint) if account is not None else (ARK_PROVIDER, "")
