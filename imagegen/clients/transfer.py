"""One generated image moved from its link into the bucket: the pipeline and `imagegen generate` share it.

The body streams from the download into the upload (`download.open_source`: a link, or an image sent inline;
`Storage.upload_image`), its key chosen once the real type is known. A transient download failure (5xx, cut
off, not an image) is tried again in place, DOWNLOAD_TRIES times with backoff, before it reaches the caller; a
refused link (403/404/410) never is: whether it expired is the caller's question.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import aiohttp
from loguru import logger

from imagegen.errors import DownloadError, FailureKind, LinkRefusedError
from imagegen.models import StoredImage
from imagegen.settings import Settings

from .download import describe_link, open_source
from .storage import Storage

DOWNLOAD_RETRY_DELAY = 0.5


async def store_image(
    http: aiohttp.ClientSession,
    storage: Storage,
    settings: Settings,
    url: str,
    key_for: Callable[[str], str],
    *,
    slot: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext,
    log_id: str = "",
    index: int = 0,
    on_download: Callable[[], None] | None = None,
    on_upload: Callable[[], None] | None = None,
) -> StoredImage:
    """Download the image at `url` into the bucket under `key_for(extension)`; each try holds `slot()`.

    `log_id` and `index` only name the image in the log line of a retry; `on_download` is called as each try
    starts and `on_upload` when its first bytes go to the bucket (a job's stages)."""
    tries = settings.download_tries
    for number in range(1, tries + 1):
        if on_download is not None:
            on_download()
        try:
            async with (
                slot(),
                open_source(
                    http, url, max_bytes=settings.download_max_bytes, time_limit=settings.download_timeout
                ) as download,
            ):
                key = key_for(download.image_type.extension)
                size = await storage.upload_image(key, download, on_upload)
            return StoredImage(
                source_url=describe_link(url),
                key=key,
                public_url=storage.public_url(key),
                content_type=download.image_type.value,
                size=size,
            )
        except LinkRefusedError:
            raise
        except DownloadError as exc:
            if exc.kind is not FailureKind.TRANSIENT or number == tries:
                raise
            delay = DOWNLOAD_RETRY_DELAY * 2 ** (number - 1)
            logger.bind(prompt_id=log_id).info(
                "image {}: {}; trying again in {:.1f}s ({}/{})", index, exc, delay, number + 1, tries
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
