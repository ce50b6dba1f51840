"""One prompt's way from a PocketBase record to hosted images.

read record -> mark processing -> generate (or reuse a remembered generation) -> download + upload each
image (skipping those already stored) -> remove leftovers of earlier runs -> patch the record done.
Errors propagate as ImagegenError; the job runner decides between retry, failure and pause.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from loguru import logger

from .download import describe_link, open_image
from .errors import FailureKind, ImagegenError, LinkExpiredError, QueuePaused, RecordNotFound
from .jimeng import JimengClient
from .ledger import GenerationLedger, GenerationRecord
from .models import PromptRecord, RecordStatus, StoredImage
from .pocketbase import PocketBaseClient
from .settings import Settings
from .state import PauseGate
from .storage import Storage


class PromptRejected(ImagegenError):
    """The record's prompt can't be sent as it is (empty or too long)."""

    kind = FailureKind.PERMANENT


@dataclass
class PipelineResult:
    """What one run of the pipeline did, for the job result and the log."""

    prompt_id: str
    images: list[StoredImage] = field(default_factory=list)
    generated: bool = False
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Services:
    """The long-lived clients a pipeline works with, created once per process."""

    settings: Settings
    http: aiohttp.ClientSession
    pocketbase: PocketBaseClient
    jimeng: JimengClient
    storage: Storage
    ledger: GenerationLedger
    gate: PauseGate


def check_prompt(record: PromptRecord, max_chars: int) -> str:
    prompt = record.prompt.strip()
    if not prompt:
        raise PromptRejected(f"record {record.id} has an empty prompt; write one in its prompt field")
    if len(prompt) > max_chars:
        raise PromptRejected(
            f"record {record.id} has a {len(prompt)}-character prompt, over PROMPT_MAX_CHARS={max_chars}; shorten it"
        )
    return prompt


class Pipeline:
    """Runs prompts through generation and hosting; one instance per worker process."""

    def __init__(self, services: Services) -> None:
        self._s = services

    async def run(self, prompt_id: str, *, force: bool = False) -> PipelineResult:
        """Bring one record to `done`; raises ImagegenError (classified) when a step fails."""
        result = PipelineResult(prompt_id)
        log = logger.bind(prompt_id=prompt_id)
        started = time.monotonic()
        record = await self._s.pocketbase.get_record(prompt_id)
        if record.is_done and not force:
            log.info("already done, nothing to generate ({})", record.image_url)
            result.skipped = True
            return result
        prompt = check_prompt(record, self._s.settings.prompt_max_chars)
        await self._s.pocketbase.set_status(prompt_id, RecordStatus.PROCESSING)
        generation = await self._s.ledger.load(prompt_id)
        if generation is not None:
            log.info(
                "reusing the generation of an earlier attempt ({} images, {} stored)",
                len(generation.urls),
                len(generation.stored),
            )
        else:
            generation = await self._generate(prompt_id, prompt, record.negative_prompt, result)
        try:
            await self._store_all(prompt_id, generation, result)
        except LinkExpiredError as exc:
            # The links live for hours only: a resumed job may find them gone. Paying again is the only way.
            log.warning("image links have expired ({}); generating again", exc)
            await self._s.ledger.forget(prompt_id)
            generation = await self._generate(prompt_id, prompt, record.negative_prompt, result)
            await self._store_all(prompt_id, generation, result)
        keys = [image.key for image in result.images]
        removed = await self._s.storage.remove_others(prompt_id, keys)
        if removed:
            log.info("removed {} leftover objects of an earlier run", len(removed))
        t0 = time.monotonic()
        try:
            await self._s.pocketbase.set_done(prompt_id, [image.public_url for image in result.images])
        except RecordNotFound:
            # Deleted while we worked: its images would be orphans in the bucket.
            await self._s.storage.remove_others(prompt_id, [])
            await self._s.ledger.forget(prompt_id)
            log.warning("record was deleted during the job; its images were removed")
            raise
        await self._s.ledger.forget(prompt_id)
        result.timings["patch"] = time.monotonic() - t0
        result.timings["total"] = time.monotonic() - started
        return result

    async def _generate(self, prompt_id: str, prompt: str, negative: str, result: PipelineResult) -> GenerationRecord:
        # The last look before paying: a pause set since the job started stops it here.
        paused = await self._s.gate.current()
        if paused is not None:
            raise QueuePaused(f"waiting: queue paused ({paused.reason})")
        t0 = time.monotonic()
        generation = await self._s.jimeng.generate(prompt, negative)
        elapsed = time.monotonic() - t0
        record = GenerationRecord(created=generation.created, urls=generation.urls)
        await self._s.ledger.save(prompt_id, record)
        result.generated = True
        result.timings["generate"] = result.timings.get("generate", 0.0) + elapsed
        logger.bind(prompt_id=prompt_id).info("generated {} images in {:.1f}s", len(generation.urls), elapsed)
        return record

    async def _store_all(self, prompt_id: str, generation: GenerationRecord, result: PipelineResult) -> None:
        t0 = time.monotonic()
        log = logger.bind(prompt_id=prompt_id)
        settings = self._s.settings
        stored: list[StoredImage] = []
        for index, url in enumerate(generation.urls):
            image = generation.stored.get(index)
            if image is None:
                async with open_image(
                    self._s.http,
                    url,
                    max_bytes=settings.download_max_bytes,
                    time_limit=settings.download_timeout,
                ) as download:
                    key = self._s.storage.object_key(prompt_id, index, download.image_type.extension)
                    size = await self._s.storage.upload_image(key, download)
                image = StoredImage(
                    source_url=describe_link(url),
                    key=key,
                    public_url=self._s.storage.public_url(key),
                    content_type=download.image_type.value,
                    size=size,
                )
                generation.stored[index] = image
                await self._s.ledger.save(prompt_id, generation)
                log.debug("stored image {} as {} ({} bytes, {})", index, key, size, image.content_type)
            stored.append(image)
        result.images = stored
        result.timings["store"] = time.monotonic() - t0
