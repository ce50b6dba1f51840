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
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.storage import Storage
from imagegen.clients.transfer import store_image
from imagegen.errors import (
    DownloadError,
    LinkRefusedError,
    PromptRejected,
    RecordNotFound,
)
from imagegen.models import PromptRecord, RecordStatus, StoredImage
from imagegen.ops.metrics import WorkerMetrics
from imagegen.queue.ledger import GenerationLedger, GenerationRecord
from imagegen.queue.stages import Stage, StageClock
from imagegen.settings import Settings

from .calls import PaidCalls
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

    def __init__(
        self,
        settings: Settings,
        *,
        calls: PaidCalls,
        pocketbase: PocketBaseClient,
        http: aiohttp.ClientSession,
        storage: Storage,
        ledger: GenerationLedger,
        outages: Outages,
        slots: Slots,
        metrics: WorkerMetrics,
    ) -> None:
        self._settings = settings
        self._calls = calls
        self._pocketbase = pocketbase
        self._http = http
        self._storage = storage
        self._ledger = ledger
        self._outages = outages
        self._slots = slots
        self._metrics = metrics

    async def run(self, run: JobRun, *, force: bool = False) -> PipelineResult:
        """Bring one record to `done`; raises ImagegenError (classified) when a step fails."""
        prompt_id = run.prompt_id
        result = PipelineResult(prompt_id)
        log = logger.bind(prompt_id=prompt_id)
        started = time.monotonic()
        record = await self._outages.call(POCKETBASE, lambda: self._pocketbase.get_record(prompt_id), run)
        if record.is_done and not force:
            log.info("already done, nothing to generate ({})", record.image_url)
            result.skipped = True
            return result
        prompt = check_prompt(record, self._settings.prompt_max_chars)
        choices = check_choices(record, self._settings)
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
        await self._outages.call(
            POCKETBASE, lambda: self._pocketbase.set_status(prompt_id, RecordStatus.PROCESSING), run
        )
        generation = await self._ledger.load(prompt_id)
        if generation is not None:
            untouched = False
            run.generation_remembered()
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
                lifetime, named = link_lifetime(generation, self._settings)
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
                await self._ledger.forget(prompt_id)
                run.generation_remembered(False)
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
        prompt_id = run.prompt_id
        run.enter(Phase.READY)
        await self._slots.take_call_slot(run)
        # A failure keeps the slot until the job's outcome is decided (see `slots`).
        call = await self._calls.make(run, prompt, negative, choices)
        generation, elapsed = call.generation, call.elapsed
        self._slots.free_call_slot(run)
        # The slot is free the moment the call returned: the next prompt's call starts while this one stores,
        # and the call is counted meanwhile (its place under the limit stays reserved until then).
        self._slots.hand_back(run)
        run.set_phase(Phase.STORING)
        result.generated = True
        result.timings["generate"] = result.timings.get("generate", 0.0) + elapsed
        blocked = f", {len(generation.blocked)} blocked" if generation.blocked else ""
        logger.bind(prompt_id=prompt_id).info(
            "generated {} images with {} in {:.1f}s{}", len(generation.urls), generation.provider, elapsed, blocked
        )
        try:
            # Remembered first: should Redis fail the count, the job's next run still reuses what was paid for.
            await self._ledger.save(prompt_id, generation)
            run.generation_remembered()
            await asyncio.shield(self._calls.count_images(call))
        finally:
            await asyncio.shield(self._calls.release_account(call, run.lease.token))
        return generation

    async def _store_all(self, run: JobRun, generation: GenerationRecord, result: PipelineResult) -> None:
        prompt_id = run.prompt_id
        result.blocked = generation.blocked
        t0 = time.monotonic()
        for index, url in enumerate(generation.urls):
            if index in generation.stored:
                continue
            await run.lease.ensure()

            async def store(index: int = index, url: str = url) -> StoredImage:
                return await self._store_one(prompt_id, index, url, run.clock)

            generation.stored[index] = await self._outages.call(STORAGE, store, run)
            await self._ledger.save(prompt_id, generation)
            image = generation.stored[index]
            logger.bind(prompt_id=prompt_id).debug(
                "stored image {} as {} ({} bytes, {})", index, image.key, image.size, image.content_type
            )
        result.images = [generation.stored[i] for i in range(len(generation.urls))]
        result.timings["store"] = result.timings.get("store", 0.0) + time.monotonic() - t0

    async def _store_one(self, prompt_id: str, index: int, url: str, clock: StageClock) -> StoredImage:
        """Download one image into the bucket, trying a transient download failure again in place."""
        image = await store_image(
            self._http,
            self._storage,
            self._settings,
            url,
            lambda extension: self._storage.object_key(prompt_id, index, extension),
            slot=self._slots.transfer,
            log_id=prompt_id,
            index=index,
            on_download=lambda: clock.enter(Stage.DOWNLOADING),
            on_upload=lambda: clock.enter(Stage.UPLOADING),
        )
        self._metrics.stored(image.size)
        return image

    async def _finish(self, run: JobRun, result: PipelineResult, *, leftovers_possible: bool) -> None:
        prompt_id = run.prompt_id
        log = logger.bind(prompt_id=prompt_id)
        keys = [image.key for image in result.images]
        if leftovers_possible:
            await run.lease.ensure()
            removed = await self._outages.call(STORAGE, lambda: self._storage.remove_others(prompt_id, keys), run)
            if removed:
                log.info("removed {} leftover objects of an earlier run", len(removed))
        t0 = time.monotonic()
        await run.lease.ensure()
        urls = [image.public_url for image in result.images]
        try:
            await self._outages.call(
                POCKETBASE, lambda: self._pocketbase.set_done(prompt_id, urls, blocked_note(result)), run
            )
        except RecordNotFound:
            # Deleted while we worked: its images would be orphans in the bucket.
            await run.lease.ensure()
            await self._outages.call(STORAGE, lambda: self._storage.remove_others(prompt_id, []), run)
            await self._ledger.forget(prompt_id)
            log.warning("record was deleted during the job; its images were removed")
            raise
        run.commit()
        await self._ledger.forget(prompt_id)
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
