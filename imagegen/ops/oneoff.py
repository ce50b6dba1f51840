"""`imagegen generate`: one paid generation for a prompt given on the command line, no PocketBase, no queue.

Everything that can be checked is checked before paying: the prompt and the choices (`OneOffRequest.build`),
the settings the call needs and, when the images are to be hosted, that the bucket answers. The images are
stored with the pipeline's own transfer (`transfer.store_image`) under `<TOS_KEY_PREFIX>generate/`.

The call counts in the day's spend like a worker's (`spend`), and takes its place under JIMENG_DAILY_LIMIT the
same way: when the day's limit is used up the command refuses (DailyLimitReached) before calling. Without a
daily limit Redis is optional: when it can't be reached the call goes ahead, uncounted, and says so.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from imagegen.choices import Choices
from imagegen.clients.jimeng import JimengClient
from imagegen.clients.storage import Storage, open_s3_client
from imagegen.clients.transfer import store_image
from imagegen.errors import ImagegenError, JimengError, PromptRejected, QueueError
from imagegen.models import StoredImage, iso_time
from imagegen.queue.accounts import Account, AccountPool, NoUsableAccount, account_pool
from imagegen.queue.keys import RedisKeys
from imagegen.queue.permits import CallPermits
from imagegen.queue.spend import CallOutcome, Clock, Spend, call_outcome
from imagegen.settings import Settings, require
from imagegen.target import Target

from .control import connect_queue

JIMENG_REQUIRED = ("jimeng_api_key", "jimeng_api_url")
UPLOAD_REQUIRED = ("tos_bucket", "tos_endpoint")


@dataclass(frozen=True)
class OneOffRequest:
    """What to generate, already checked: nothing in it can make the API refuse the call."""

    prompt: str
    negative_prompt: str
    choices: Choices
    upload: bool

    @classmethod
    def build(
        cls, settings: Settings, prompt: str, negative_prompt: str, given: Mapping[str, str], *, upload: bool
    ) -> OneOffRequest:
        """Check the prompt and the options (`given`: model, ratio, resolution; empty ones take the
        settings); PromptRejected names the option, the value and what is allowed."""
        prompt = prompt.strip()
        if not prompt:
            raise PromptRejected("the prompt is empty")
        if len(prompt) > settings.prompt_max_chars:
            raise PromptRejected(
                f"the prompt has {len(prompt)} characters, over PROMPT_MAX_CHARS={settings.prompt_max_chars}"
            )

        def describe(name: str, value: str, allowed: str) -> str:
            return f"--{name} {value!r}: {allowed}"

        choices = settings.default_choices.overridden(given, describe)
        return cls(prompt, negative_prompt.strip(), choices, upload)


@dataclass(frozen=True)
class OneOffResult:
    """One generation's links and, when uploaded, the objects now hosted in the bucket."""

    request: OneOffRequest
    created: float
    links: list[str]
    images: list[StoredImage] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        """What a user opens: the public URLs when the images were uploaded, else the API's links."""
        return [image.public_url for image in self.images] if self.request.upload else list(self.links)

    def to_json(self) -> dict[str, Any]:
        choices = self.request.choices
        return {
            "prompt": self.request.prompt,
            "negative_prompt": self.request.negative_prompt,
            "model": choices.model,
            "ratio": choices.ratio,
            "resolution": choices.resolution,
            "created": iso_time(self.created),
            "uploaded": self.request.upload,
            "urls": self.urls,
            "links": self.links,
            "images": [
                {"url": i.public_url, "key": i.key, "content_type": i.content_type, "size": i.size} for i in self.images
            ],
        }


def one_off_run_id(now: float | None = None) -> str:
    """When the run started (UTC, to the second) and a random part: keys of two runs never meet."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(4)}"


async def _open_counter(
    settings: Settings, resources: AsyncExitStack, clock: Clock
) -> tuple[CallPermits, AccountPool] | None:
    """The spend counter, with no cap or rate of its own, and the accounts' health; None when Redis can't be
    reached and no daily limit depends on it (a QueueError when one does)."""
    try:
        redis = await connect_queue(settings)
    except QueueError as exc:
        if settings.jimeng_daily_limit:
            raise QueueError(f"{exc.message}; JIMENG_DAILY_LIMIT can't be checked, so no call was made") from None
        return None
    resources.push_async_callback(redis.aclose)
    keys = RedisKeys(settings.queue_name)
    spend = Spend(redis, keys, settings.jimeng_daily_limit, settings.daily_limit_zone, clock)
    return CallPermits(redis, keys, 0, 0, settings.worker_lease, spend), account_pool(redis, keys, settings, spend)


async def generate_once(
    settings: Settings, request: OneOffRequest, announce: Callable[[str], None], *, clock: Clock = time.time
) -> OneOffResult:
    """Call the API exactly once and, with `request.upload`, host the images; `announce` is told, just before
    the paid call, what it is about to spend. Raises ImagegenError (ConfigError for a missing setting,
    DailyLimitReached when today's JIMENG_DAILY_LIMIT is used up: no call made)."""
    require(settings, *JIMENG_REQUIRED, *(UPLOAD_REQUIRED if request.upload else ()))
    async with AsyncExitStack() as resources:
        http = await resources.enter_async_context(aiohttp.ClientSession())
        storage: Storage | None = None
        if request.upload:
            storage = Storage(await resources.enter_async_context(open_s3_client(settings)), settings)
            await storage.check()  # an unreachable bucket costs nothing yet
        opened = await _open_counter(settings, resources, clock)
        counter, pool = opened if opened is not None else (None, None)
        token = secrets.token_hex(12)
        reservation = await counter.take(token, 0.0) if counter is not None else None
        # The workers' usable account with the fewest calls in flight; without Redis, the first key.
        account: Account | None = None
        if pool is not None:
            try:
                account = await pool.take(token, wait=0.0)
            except NoUsableAccount:
                if counter is not None and reservation is not None:
                    await counter.finish(reservation, None)
                raise await pool.unavailable() from None
        target = Target.of(settings, records=False).describe()
        counted = f", counted on {target}" if counter is not None else f" (not counted: {target} unreachable)"
        announce(
            f"calling jimeng at {settings.jimeng_api_url} ({request.choices.describe()}): this spends a jimeng "
            f"credit{counted}"
        )
        outcome: CallOutcome | None = CallOutcome.FAILED
        try:
            generation = await JimengClient(http, settings).generate(
                request.prompt, request.negative_prompt, request.choices, key=account.key if account else None
            )
            outcome = CallOutcome.IMAGES
        except JimengError as exc:
            outcome = call_outcome(exc)
            if pool is not None and account is not None:
                await pool.failed(account, exc)
            raise
        finally:
            if counter is not None and reservation is not None:
                await asyncio.shield(counter.finish(reservation, outcome))
            if pool is not None and account is not None:
                await asyncio.shield(pool.release(account, token, images=outcome is CallOutcome.IMAGES))
        result = OneOffResult(request, generation.created, generation.urls)
        if storage is None:
            return result
        run_id = one_off_run_id(generation.created)
        for index, url in enumerate(generation.urls):
            try:
                image = await store_image(
                    http,
                    storage,
                    settings,
                    url,
                    functools.partial(storage.one_off_key, run_id, index),
                    log_id=run_id,
                    index=index,
                )
            except ImagegenError as exc:
                # Paid for: the links are all that is left of it, so they go with the error.
                raise ImagegenError(
                    f"storing image {index + 1} of {len(generation.urls)} failed: {exc}; the generated images stay at "
                    f"their links for about two hours: {' '.join(generation.urls)}"
                ) from exc
            result.images.append(image)
        return result
